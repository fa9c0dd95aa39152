"""``forgelab verify``: replay a trace and accept or reject it."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    NonEmptyPath,
    check_safety_factor,
    cli,
    console,
    data_dir_option,
    parse_tolerance,
    positive_int,
    prepare_output,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED, EXIT_REJECTED


def _verify_table(report, show_all: bool, stateful: bool) -> Table:  # noqa: ANN001
    tau = report.calibration.tolerance
    table = Table(title=f"replay verification (tau = {tau:.3e})")
    columns = ["step", "L2", "Linf", "relative", "update norm", "verdict"]
    if stateful:
        columns.insert(4, "state L2")
    for column in columns:
        table.add_column(column, justify="right")
    rows = report.segments
    if not show_all and len(rows) > 20:
        rows = [s for s in rows if not s.passed][:20]
        table.title += ": failing steps" + (" (first 20)" if len(rows) == 20 else "")
    for s in rows:
        state = [f"{s.state_l2:.3e}"] if stateful else []
        table.add_row(
            str(s.end_step),
            f"{s.l2:.3e}",
            f"{s.linf:.3e}",
            f"{s.relative:.3e}",
            *state,
            f"{s.update_norm:.3e}",
            "pass" if s.passed else "[red]FAIL[/red]",
        )
    return table


@cli.command()
@click.argument("trace_dir", metavar="TRACE", type=NonEmptyPath(path_type=Path))
@data_dir_option
@click.option(
    "--tolerance",
    default="auto",
    show_default=True,
    help="'auto' (calibrated) or a fixed L2 tolerance.",
)
@click.option(
    "--safety-factor",
    type=float,
    default=10.0,
    show_default=True,
    help="Multiplier on the largest benign error for --tolerance auto.",
)
@click.option(
    "--calibration-steps",
    type=int,
    default=8,
    show_default=True,
    callback=positive_int,
    help="Steps sampled to calibrate the tolerance.",
)
@click.option(
    "--seed",
    type=SEED,
    default=0,
    show_default=True,
    help="The verifier's own seed for choosing calibration steps.",
)
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=None,
    help="Where to write verify.json and verify.png "
    "(default: forgelab-out/verify-<trace name>).",
)
@click.option("--all-steps", is_flag=True, help="Print every step, not just failures.")
@click.option(
    "--allow-import",
    metavar="PKG.MODULE:FACTORY",
    default=None,
    help="For a trace recorded from your own loop: the model entry point you trust. "
    "It is imported (running its code) only if the trace names exactly this one.",
)
@click.option(
    "--removed",
    "removed_file",
    type=click.Path(path_type=Path),
    default=None,
    help="For a trace that claims its dataset minus removed examples: the file "
    "listing them (checked against the claimed hash).",
)
def verify(
    trace_dir: Path,
    data_dir: Path | None,
    tolerance: str,
    safety_factor: float,
    calibration_steps: int,
    seed: int,
    out: Path | None,
    all_steps: bool,
    allow_import: str | None,
    removed_file: Path | None,
) -> int:
    """Replay every step of TRACE and accept or reject it (exit 0 or 1)."""
    from forgelab.data import load_dataset
    from forgelab.forgery import dataset_for_trace
    from forgelab.replay import verify_trace
    from forgelab.report import plot_verification, write_json
    from forgelab.trace import Trace, check_output_outside

    fixed = parse_tolerance(tolerance)
    check_safety_factor(safety_factor)
    trace = Trace(trace_dir, allow_import=allow_import)
    out = out or Path("forgelab-out") / f"verify-{trace_dir.resolve().name}"
    check_output_outside(out, trace_dir)
    prepare_output(out, "verify.json")
    data = dataset_for_trace(
        trace, load_dataset(trace.manifest["dataset"]["name"], data_dir), removed_file
    )
    with progress_bars() as tasks:
        report = verify_trace(
            trace,
            data,
            tolerance=fixed,
            safety_factor=safety_factor,
            num_calibration_segments=calibration_steps,
            seed=seed,
            callback=tasks("replaying"),
        )
    write_json(out / "verify.json", report.to_json())
    plot_verification(report, out / "verify.png", str(trace_dir))
    table = _verify_table(report, all_steps, not trace.optimizer.is_stateless)
    if table.row_count:
        console.print(table)
    calibration = report.calibration
    if calibration.method == "auto":
        sources = ", ".join(f"{k} {v:.2e}" for k, v in calibration.benign.items())
        console.print(
            f"tolerance {calibration.tolerance:.3e} = {calibration.safety_factor:g} x "
            f"largest benign error ({sources})"
        )
        for key, state_tau in calibration.state_tolerances.items():
            worst = max(s.state_errors.get(key, 0.0) for s in report.segments)
            console.print(
                f"optimizer state {key}: tolerance {state_tau:.3e}, max error "
                f"{worst:.3e}"
            )
    errors = [s.l2 for s in report.segments]
    unit = "steps" if trace.manifest["checkpoint_interval"] == 1 else "segments"
    console.print(
        f"{len(errors)} {unit} replayed, {len(report.failed_steps)} failed, max "
        f"reproduction error {max(errors):.3e}; report in {out}"
    )
    schedule = report.schedule
    if schedule and schedule["repeated_examples"]:
        epochs = schedule["epochs_with_repeats"]
        console.print(
            f"[yellow]batch schedule:[/yellow] {schedule['repeated_examples']} "
            f"example uses repeat within an epoch ({len(epochs)} of the epochs of "
            f"{schedule['steps_per_epoch']} steps); one shuffled pass per epoch "
            "uses each example once (informational, not part of the decision)"
        )
    if not report.complete:
        console.print(
            f"[yellow]recording was interrupted: verified up to step {trace.num_steps}"
        )
    if report.suspect_checkpoints:
        console.print(
            "checkpoints inconsistent with the steps on both sides (tampered "
            "weights or optimizer state?): "
            + ", ".join(map(str, report.suspect_checkpoints))
        )
    if report.accepted:
        console.print("[green]ACCEPTED[/green]")
        return EXIT_ACCEPTED
    first = report.failed_steps[0]
    console.print(f"[red]REJECTED[/red] at step {first}")
    return EXIT_REJECTED
