"""``forgelab bench``: speed ratios against the hardware floor and published code."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    cli,
    console,
    data_dir_option,
    positive_int,
    prepare_output,
)
from forgelab.errors import EXIT_ACCEPTED


def _summary_table(results: dict) -> Table:
    table = Table(title="forgelab bench (ratios are medians of interleaved rounds)")
    for column in ("measurement", "value", "target", "met", "note"):
        table.add_column(column, justify="left" if column != "value" else "right")
    for row in results["summary"]:
        table.add_row(
            row["label"],
            f"{row['value']:.2f}",
            row["target"],
            {True: "yes", False: "[red]no[/red]", None: "-"}[row["met"]],
            row["note"],
        )
    return table


@cli.command()
@data_dir_option
@click.option(
    "--models",
    default="lenet,mlp",
    show_default=True,
    help="Comma-separated models for the per-sample engine ratios.",
)
@click.option(
    "--batch-size", type=int, default=100, show_default=True, callback=positive_int
)
@click.option(
    "--repeats",
    type=int,
    default=5,
    show_default=True,
    callback=positive_int,
    help="Timed rounds (engine: 3x as many; reeval: at most 3; verify: at most 2).",
)
@click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
    help="Torch intra-op threads for every timing.",
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=300,
    show_default=True,
    callback=positive_int,
    help="Candidates of the reeval attack.",
)
@click.option(
    "-f",
    "num_replaced",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
    help="Replaced examples of the reeval attack.",
)
@click.option(
    "--large-pool",
    type=int,
    default=60_000,
    show_default=True,
    callback=positive_int,
    help="Examples in the large pool of the nearest search.",
)
@click.option(
    "--trace-steps",
    type=int,
    default=400,
    show_default=True,
    callback=positive_int,
    help="Steps of the trace recorded and verified (rounded up to whole epochs).",
)
@click.option("--seed", type=SEED, default=2024, show_default=True)
@click.option(
    "--only",
    default=",".join(("floor", "loop", "reeval", "nearest", "verify")),
    show_default=True,
    help="Comma-separated measurements to run.",
)
@click.option(
    "--profile",
    is_flag=True,
    help="Profile the per-sample engine and record its most expensive operators.",
)
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=Path("forgelab-out/bench"),
    show_default=True,
    help="Directory for bench.json.",
)
def bench(
    data_dir: Path | None,
    models: str,
    batch_size: int,
    repeats: int,
    threads: int,
    num_candidates: int,
    num_replaced: int,
    large_pool: int,
    trace_steps: int,
    seed: int,
    only: str,
    profile: bool,
    out: Path,
) -> int:
    """Measure speed ratios against the hardware floor and the published algorithms.

    Prints each ratio with its target and writes them all to OUT/bench.json.
    """
    from forgelab.bench import DIGIT_MODELS, BenchSettings, run_benchmark
    from forgelab.models import MODELS
    from forgelab.report import write_json

    chosen = tuple(dict.fromkeys(m.strip() for m in models.split(",") if m.strip()))
    for model in chosen:
        if model not in MODELS:
            raise click.BadParameter(
                f"unknown model {model!r}; choose from {', '.join(DIGIT_MODELS)}",
                param_hint="--models",
            )
    settings = BenchSettings(
        models=chosen,
        batch_size=batch_size,
        repeats=repeats,
        threads=threads,
        num_candidates=num_candidates,
        num_replaced=num_replaced,
        large_pool=large_pool,
        trace_steps=trace_steps,
        seed=seed,
        data_dir=data_dir,
        only=tuple(dict.fromkeys(m.strip() for m in only.split(",") if m.strip())),
        profile=profile,
    )
    destination = prepare_output(out, "bench.json")
    quiet = bool(click.get_current_context().find_root().params.get("quiet"))
    results = run_benchmark(
        settings,
        progress=(lambda name: None)
        if quiet
        else (lambda name: console.print(f"measuring {name} ...")),
    )
    console.print(_summary_table(results))
    write_json(destination, results)
    for entry in results.get("engine", []):
        if entry.get("engine_profile"):
            shares = ", ".join(
                f"{row['operator']} {row['share']:.0%}"
                for row in entry["engine_profile"]
            )
            console.print(f"{entry['model']} engine time by operator: {shares}")
    load = results["environment"]
    console.print(
        f"{load['cpu_count']} CPUs, {settings.threads} torch thread(s), load average "
        f"{load['load_average'][0]:.1f} before and {load['load_average_after'][0]:.1f} "
        f"after; {results['seconds']:.0f} s; details in {out / 'bench.json'}"
    )
    return EXIT_ACCEPTED
