"""``forgelab forge``: forging attacks against a trace.

Two modes. Without ``--remove``/``--remove-count``: the re-evaluation's checkpoint
experiment (random batches at every N-th checkpoint). With them: a complete forged
trace of the claimed dataset D' = D minus the removed examples.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    NonEmptyPath,
    cli,
    console,
    data_dir_option,
    parse_tolerance,
    positive_int,
    prepare_output,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED, ForgelabError

REMOVAL_ONLY = ("keep_checkpoints", "pool_size", "distance", "norm")
CHECKPOINT_ONLY = ("num_replaced", "every", "runs", "tolerance")


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
@click.argument("trace_dir", metavar="TRACE", type=NonEmptyPath(path_type=Path))
@data_dir_option
@click.option(
    "--attack",
    default="reeval",
    show_default=True,
    help="Attack name: thudi-batch, thudi, reeval, kong, zhang-sr, zhang-sn, "
    "baluta, nearest, greedy, swap.",
)
@click.option(
    "--remove",
    "remove_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Forge a complete trace without the examples listed in this file "
    "(indices into the training set, whitespace or comma separated).",
)
@click.option(
    "--remove-count",
    type=int,
    default=None,
    callback=positive_int,
    help="Forge a complete trace without this many random examples.",
)
@click.option(
    "--keep-checkpoints/--recompute",
    "keep_checkpoints",
    default=True,
    show_default=True,
    help="Forged trace: claim the original weights, or train along the forged batches.",
)
@click.option(
    "-f",
    "num_replaced",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
    help="Checkpoint experiment: examples replaced per batch.",
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=None,
    callback=positive_int,
    help="Candidates per forgery (default: the attack's published M).",
)
@click.option(
    "--pool-size",
    type=int,
    default=None,
    callback=positive_int,
    help="kong: examples in each step's fresh pool (default 1000).",
)
@click.option(
    "--distance",
    type=click.Choice(["paper", "model"]),
    default=None,
    help="kong: squared gradient distance (paper, default) or weight distance "
    "after one step (model).",
)
@click.option(
    "--norm",
    type=click.Choice(["l2", "linf"]),
    default=None,
    help="baluta: weight distance after one step in L2 (default) or Linf.",
)
@click.option(
    "--every",
    type=int,
    default=100,
    show_default=True,
    callback=positive_int,
    help="Checkpoint experiment: attack every N-th checkpoint.",
)
@click.option(
    "--runs",
    type=int,
    default=10,
    show_default=True,
    callback=positive_int,
    help="Checkpoint experiment: random batches per checkpoint.",
)
@click.option("--seed", type=SEED, default=2024, show_default=True)
@click.option(
    "--tolerance",
    default="auto",
    show_default=True,
    help="Checkpoint experiment: 'auto' (calibrated on the trace) or a fixed L2 "
    "tolerance.",
)
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=None,
    help="Forged trace: its directory (required). Checkpoint experiment: where to "
    "write forge.json and forge.png (default: forgelab-out/forge-<trace name>).",
)
def forge(
    trace_dir: Path,
    data_dir: Path | None,
    attack: str,
    remove_file: Path | None,
    remove_count: int | None,
    keep_checkpoints: bool,
    num_replaced: int,
    num_candidates: int | None,
    pool_size: int | None,
    distance: str | None,
    norm: str | None,
    every: int,
    runs: int,
    seed: int,
    tolerance: str,
    out: Path | None,
) -> int:
    """Forge TRACE: at its checkpoints, or into a complete trace without some examples.

    Without --remove/--remove-count, runs the re-evaluation's experiment: at every
    --every-th checkpoint, --runs random batches have their first -f examples
    replaced, and the forging errors are compared with the tolerance.

    With --remove FILE or --remove-count K, writes a complete forged trace of the
    training set minus those examples into --out: every step whose batch holds a
    removed example is forged by the attack. Verify it with
    `forgelab verify OUT --removed OUT/removed.txt`.
    """
    context = click.get_current_context()
    given = {
        name
        for name in REMOVAL_ONLY + CHECKPOINT_ONLY
        if context.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    options = {
        "num_candidates": num_candidates,
        "pool_size": pool_size,
        "distance": distance,
        "norm": norm,
    }
    if remove_file is None and remove_count is None:
        misplaced = sorted(given & set(REMOVAL_ONLY))
        if misplaced:
            flag = (
                "--keep-checkpoints/--recompute"
                if misplaced[0] == "keep_checkpoints"
                else f"--{misplaced[0].replace('_', '-')}"
            )
            raise click.UsageError(f"{flag} needs --remove or --remove-count")
        return _checkpoint_experiment(
            trace_dir,
            data_dir,
            attack,
            num_replaced,
            options,
            every,
            runs,
            seed,
            tolerance,
            out,
        )
    if remove_file is not None and remove_count is not None:
        raise click.UsageError("give either --remove or --remove-count, not both")
    misplaced = sorted(given & set(CHECKPOINT_ONLY))
    if misplaced:
        raise click.UsageError(
            f"-f, --every, --runs and --tolerance belong to the checkpoint experiment, "
            f"not to a forged trace (got --{misplaced[0].replace('_', '-')})"
        )
    if out is None:
        raise click.UsageError("a forged trace needs --out DIR")
    return _forged_trace(
        trace_dir,
        data_dir,
        attack,
        remove_file,
        remove_count,
        "keep-checkpoints" if keep_checkpoints else "recompute",
        options,
        seed,
        out,
    )


def _forged_trace(
    trace_dir: Path,
    data_dir: Path | None,
    attack: str,
    remove_file: Path | None,
    remove_count: int | None,
    mode: str,
    options: dict,
    seed: int,
    out: Path,
) -> int:
    from forgelab.data import load_dataset
    from forgelab.forgery import (
        REMOVED_FILE,
        draw_removed,
        forge_trace,
        read_removed,
        refuse_forged_input,
    )
    from forgelab.trace import Trace

    trace = Trace(trace_dir, allow_incomplete=False)
    refuse_forged_input(trace)
    data = load_dataset(trace.manifest["dataset"]["name"], data_dir)
    if remove_file is not None:
        removed = read_removed(remove_file, data.num_train)
    else:
        removed = draw_removed(data.num_train, remove_count, seed)
    with progress_bars() as tasks:
        result = forge_trace(
            trace,
            data,
            removed,
            out,
            attack=attack,
            options=options,
            mode=mode,
            seed=seed,
            callback=tasks("forging the trace"),
        )
    divergence = {d["step"]: d for d in result.divergence}
    table = Table(
        title=f"{attack} ({_describe(result.options)}), {mode}: forged steps"
        + (" (first 20)" if len(result.steps) > 20 else "")
    )
    columns = ["step", "replaced", "replacement", "forging error", "sqrt(eta)|dg|"]
    if divergence:
        columns.append("divergence L2")
    for column in columns:
        table.add_column(column, justify="right")
    for record in result.steps[:20]:
        row = [
            str(record.step),
            _indices(record.replaced),
            _indices(record.replacement),
            f"{record.forging_error:.3e}",
            f"{record.paper_error:.3e}",
        ]
        if divergence:
            row.append(
                f"{divergence[record.step]['l2']:.3e}"
                if record.step in divergence
                else ""
            )
        table.add_row(*row)
    if table.row_count:
        console.print(table)
    errors = [r.forging_error for r in result.steps]
    if errors:
        console.print(
            f"forged {len(errors)} of {result.num_steps} steps to remove "
            f"{len(removed)} example{'' if len(removed) == 1 else 's'}; forging error "
            f"min {min(errors):.3e}, median "
            f"{sorted(errors)[len(errors) // 2]:.3e}, max {max(errors):.3e}"
        )
    else:
        console.print(
            f"[yellow]no step uses any of the {len(removed)} removed examples; "
            "the forged trace equals the original on D'"
        )
    if mode == "recompute":
        last = result.divergence[-1]
        console.print(
            f"recomputed along the forged batches: weights differ from the original "
            f"by L2 {last['l2']:.3e} ({last['relative']:.2e} of the weight norm) at "
            f"step {last['step']}; test accuracy original "
            f"{result.accuracy['original']:.2%}, forged {result.accuracy['forged']:.2%}"
        )
    console.print(
        f"forged trace {out} (claims {result.claimed_dataset['num_train']} examples); "
        f"verify with: forgelab verify {out} --removed {out / REMOVED_FILE}"
    )
    return EXIT_ACCEPTED


def _describe(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k != "max_bytes"}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "no options"


def _indices(values: list[int]) -> str:
    text = ",".join(map(str, values[:4]))
    return text + (f",... ({len(values)})" if len(values) > 4 else "")


def _checkpoint_experiment(
    trace_dir: Path,
    data_dir: Path | None,
    attack: str,
    num_replaced: int,
    options: dict,
    every: int,
    runs: int,
    seed: int,
    tolerance: str,
    out: Path | None,
) -> int:
    from forgelab.attacks import attack_checkpoints, attack_options
    from forgelab.data import load_dataset
    from forgelab.forgery import refuse_forged_input
    from forgelab.replay import Calibration, calibrate_tolerance, check_dataset
    from forgelab.report import plot_forging, summarise_forging, write_json
    from forgelab.trace import Trace, check_output_outside

    fixed = parse_tolerance(tolerance)
    trace = Trace(trace_dir)
    refuse_forged_input(trace)
    out = out or Path("forgelab-out") / f"forge-{trace_dir.resolve().name}"
    check_output_outside(out, trace_dir)
    prepare_output(out, "forge.json")
    data = load_dataset(trace.manifest["dataset"]["name"], data_dir)
    check_dataset(trace, data)
    resolved = attack_options(attack, **options)
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
            options=options,
            seed=seed,
            callback=tasks("forging"),
        )
    if not records:
        raise ForgelabError(
            f"no checkpoint of {trace_dir} is at a multiple of --every {every}"
        )
    summaries = summarise_forging(records, calibration.tolerance)
    write_json(
        out / "forge.json",
        {
            "attack": attack,
            "options": resolved,
            "num_replaced": num_replaced,
            "tolerance": calibration.tolerance,
            "calibration": calibration.__dict__,
            "forgeries": [r.to_json() for r in records],
        },
    )
    plot_forging(
        records, calibration.tolerance, out / "forge.png", title=str(trace_dir)
    )
    console.print(
        forging_table(summaries, f"{attack}: f={num_replaced}, {_describe(resolved)}")
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
