"""``forgelab forge``: forging attacks against the checkpoints of a trace."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from forgelab.cli.base import (
    cli,
    console,
    data_dir_option,
    parse_tolerance,
    positive_int,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED, ForgelabError


def forging_table(summaries, title: str) -> Table:  # noqa: ANN001 - summaries
    """A table of forging errors per checkpoint against the tolerance."""
    table = Table(title=title)
    replayed = any(s.reproduction_error is not None for s in summaries)
    for column in (
        "step",
        *(["reproduction error"] if replayed else []),
        "tolerance",
        "forging error min",
        "median",
        "max",
        "sqrt(eta)|dg| min",
        "margin",
        "detected",
    ):
        table.add_column(column, justify="right")
    for s in summaries:
        reproduction = (
            ["n/a" if s.reproduction_error is None else f"{s.reproduction_error:.2e}"]
            if replayed
            else []
        )
        table.add_row(
            str(s.step),
            *reproduction,
            f"{s.tolerance:.2e}",
            f"{s.minimum:.3e}",
            f"{s.median:.3e}",
            f"{s.maximum:.3e}",
            f"{s.paper_minimum:.3e}",
            f"{s.margin:.1f}",
            f"{s.num_detected}/{s.num_runs}",
        )
    return table


@cli.command()
@click.argument("trace_dir", metavar="TRACE", type=click.Path(path_type=Path))
@data_dir_option
@click.option("--attack", default="reeval", show_default=True, help="Attack name.")
@click.option(
    "-f",
    "num_replaced",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
    help="Examples replaced per batch.",
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=300,
    show_default=True,
    callback=positive_int,
    help="Candidates per forgery.",
)
@click.option(
    "--every",
    type=int,
    default=100,
    show_default=True,
    callback=positive_int,
    help="Attack every N-th checkpoint.",
)
@click.option(
    "--runs",
    type=int,
    default=10,
    show_default=True,
    callback=positive_int,
    help="Random batches per checkpoint.",
)
@click.option("--seed", type=int, default=2024, show_default=True)
@click.option(
    "--tolerance",
    default="auto",
    show_default=True,
    help="'auto' (calibrated on the trace) or a fixed L2 tolerance.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write forge.json and forge.png "
    "(default: forgelab-out/forge-<trace name>).",
)
def forge(
    trace_dir: Path,
    data_dir: Path | None,
    attack: str,
    num_replaced: int,
    num_candidates: int,
    every: int,
    runs: int,
    seed: int,
    tolerance: str,
    out: Path | None,
) -> int:
    """Run a forging attack at checkpoints of TRACE and compare with the tolerance."""
    from forgelab.attacks import attack_checkpoints
    from forgelab.data import load_dataset
    from forgelab.replay import Calibration, calibrate_tolerance, check_dataset
    from forgelab.report import plot_forging, summarise_forging, write_json
    from forgelab.trace import Trace

    fixed = parse_tolerance(tolerance)
    trace = Trace(trace_dir)
    data = load_dataset(trace.manifest["dataset"]["name"], data_dir)
    check_dataset(trace, data)
    calibration = (
        calibrate_tolerance(trace, data)
        if fixed is None
        else Calibration(tolerance=fixed, method="fixed", safety_factor=1)
    )
    with progress_bars() as tasks:
        records = attack_checkpoints(
            trace,
            data,
            attack=attack,
            every=every,
            num_runs=runs,
            num_replaced=num_replaced,
            num_candidates=num_candidates,
            seed=seed,
            callback=tasks("forging"),
        )
    if not records:
        raise ForgelabError(
            f"no checkpoint of {trace_dir} is at a multiple of --every {every}"
        )
    summaries = summarise_forging(records, calibration.tolerance)
    out = out or Path("forgelab-out") / f"forge-{trace_dir.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "forge.json",
        {
            "attack": attack,
            "tolerance": calibration.tolerance,
            "calibration": calibration.__dict__,
            "forgeries": [r.to_json() for r in records],
        },
    )
    plot_forging(
        records, calibration.tolerance, out / "forge.png", title=str(trace_dir)
    )
    console.print(
        forging_table(summaries, f"{attack}: f={num_replaced}, M={num_candidates}")
    )
    undetected = sum(1 for r in records if r.forging_error <= calibration.tolerance)
    margin = min(s.margin for s in summaries)
    console.print(
        f"{len(records)} forgeries, {undetected} within the tolerance "
        f"{calibration.tolerance:.3e}; margin min(forging error)/tolerance = "
        f"{margin:.1f}; "
        f"results in {out}"
    )
    return EXIT_ACCEPTED
