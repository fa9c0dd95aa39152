"""The ``forgelab`` command line.

Exit codes: 0 success (a verified trace was accepted), 1 a trace was rejected,
2 unusable input (bad options, malformed or unsafe trace, missing data).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from forgelab.errors import EXIT_ACCEPTED, EXIT_REJECTED, EXIT_UNUSABLE, ForgelabError

console = Console(width=None if sys.stdout.isatty() else 150)
error_console = Console(stderr=True)


class Tasks:
    """Progress bars for named stages; silent when stdout is not a terminal."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.ids: dict[str, int] = {}

    def __call__(self, name: str) -> Callable[[int, int], None]:
        """A callback ``(done, total)`` that advances the bar called ``name``."""

        def update(done: int, total: int) -> None:
            if self.progress is None:
                return
            if name not in self.ids:
                self.ids[name] = self.progress.add_task(name, total=total)
            self.progress.update(self.ids[name], completed=done, total=total)

        return update


@contextlib.contextmanager
def progress_bars() -> Iterator[Tasks]:
    """Yield a :class:`Tasks` factory, with live bars only on a terminal."""
    if not console.is_terminal:
        yield Tasks(None)
        return
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield Tasks(progress)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, show_time=False)],
        force=True,
    )


def _parse_tolerance(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        tolerance = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number") from None
    if not tolerance >= 0 or tolerance == float("inf"):
        raise click.BadParameter(f"{value!r} must be a finite non-negative number")
    return tolerance


def _positive_int(
    _ctx: click.Context, param: click.Parameter, value: int | None
) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory with the dataset's standard files (default: embedded copy).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.version_option(package_name="forgelab")
def cli(verbose: int, quiet: bool) -> None:
    """Record, replay, forge and verify SGD execution traces."""
    _setup_logging(verbose, quiet)


@cli.command()
@click.option("--dataset", default="mnist", show_default=True, help="Dataset name.")
@click.option("--model", default="lenet", show_default=True, help="Model name.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Trace dir."
)
@data_dir_option
@click.option(
    "--epochs",
    type=int,
    default=None,
    callback=_positive_int,
    help="Epochs (default: about 2,400 steps).",
)
@click.option(
    "--lr", type=float, default=0.01, show_default=True, help="Learning rate."
)
@click.option(
    "--batch-size", type=int, default=100, show_default=True, callback=_positive_int
)
@click.option("--seed", type=int, default=2024, show_default=True)
@click.option(
    "--checkpoint-every",
    type=int,
    default=1,
    show_default=True,
    callback=_positive_int,
    help="Steps between checkpoints (k).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
)
@click.option(
    "--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True
)
@click.option("--momentum", type=float, default=0.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--deterministic/--no-deterministic", default=True, show_default=True)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted recording in --out."
)
def train(
    dataset: str,
    model: str,
    out: Path,
    data_dir: Path | None,
    epochs: int | None,
    lr: float,
    batch_size: int,
    seed: int,
    checkpoint_every: int,
    dtype: str,
    optimizer: str,
    momentum: float,
    weight_decay: float,
    deterministic: bool,
    resume: bool,
) -> int:
    """Train a model and record its execution trace into --out."""
    from forgelab.data import load_dataset
    from forgelab.optim import OptimizerConfig
    from forgelab.trace import Trace
    from forgelab.training import record_trace, resume_trace

    data = load_dataset(dataset, data_dir)
    with progress_bars() as tasks:
        if resume:
            path = resume_trace(out, data, callback=tasks("training"))
        else:
            config = OptimizerConfig(
                name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay
            )
            path = record_trace(
                out,
                data,
                model,
                optimizer=config,
                batch_size=batch_size,
                num_epochs=epochs,
                seed=seed,
                checkpoint_interval=checkpoint_every,
                dtype=dtype,
                deterministic=deterministic,
                callback=tasks("training"),
            )
    trace = Trace(path)
    accuracies = trace.manifest.get("test_accuracy", [])
    final = f"{accuracies[-1]['accuracy']:.2%}" if accuracies else "n/a"
    console.print(
        f"trace {path}: {trace.num_steps} steps, {len(trace.checkpoints)} checkpoints, "
        f"test accuracy {final}"
    )
    return EXIT_ACCEPTED


def _verify_table(report, show_all: bool) -> Table:  # noqa: ANN001 - VerifyReport
    tau = report.calibration.tolerance
    table = Table(title=f"replay verification (tau = {tau:.3e})")
    for column in ("step", "L2", "Linf", "relative", "update norm", "verdict"):
        table.add_column(column, justify="right")
    rows = report.segments
    if not show_all and len(rows) > 20:
        rows = [s for s in rows if not s.passed][:20]
        table.title += ": failing steps" + (" (first 20)" if len(rows) == 20 else "")
    for s in rows:
        table.add_row(
            str(s.end_step),
            f"{s.l2:.3e}",
            f"{s.linf:.3e}",
            f"{s.relative:.3e}",
            f"{s.update_norm:.3e}",
            "pass" if s.passed else "[red]FAIL[/red]",
        )
    return table


@cli.command()
@click.argument("trace_dir", metavar="TRACE", type=click.Path(path_type=Path))
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
    callback=_positive_int,
    help="Steps sampled to calibrate the tolerance.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="The verifier's own seed for choosing calibration steps.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write verify.json and verify.png "
    "(default: forgelab-out/verify-<trace name>).",
)
@click.option("--all-steps", is_flag=True, help="Print every step, not just failures.")
def verify(
    trace_dir: Path,
    data_dir: Path | None,
    tolerance: str,
    safety_factor: float,
    calibration_steps: int,
    seed: int,
    out: Path | None,
    all_steps: bool,
) -> int:
    """Replay every step of TRACE and accept or reject it (exit 0 or 1)."""
    from forgelab.data import load_dataset
    from forgelab.replay import verify_trace
    from forgelab.report import plot_verification, write_json
    from forgelab.trace import Trace

    fixed = _parse_tolerance(tolerance)
    if not safety_factor > 0:
        raise click.BadParameter("must be positive", param_hint="--safety-factor")
    trace = Trace(trace_dir)
    data = load_dataset(trace.manifest["dataset"]["name"], data_dir)
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
    out = out or Path("forgelab-out") / f"verify-{trace_dir.resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "verify.json", report.to_json())
    plot_verification(report, out / "verify.png", str(trace_dir))
    table = _verify_table(report, all_steps)
    if table.row_count:
        console.print(table)
    calibration = report.calibration
    if calibration.method == "auto":
        sources = ", ".join(f"{k} {v:.2e}" for k, v in calibration.benign.items())
        console.print(
            f"tolerance {calibration.tolerance:.3e} = {calibration.safety_factor:g} x "
            f"largest benign error ({sources})"
        )
    errors = [s.l2 for s in report.segments]
    console.print(
        f"{len(errors)} steps replayed, {len(report.failed_steps)} failed, max "
        f"reproduction error {max(errors):.3e}; report in {out}"
    )
    if not report.complete:
        console.print(
            f"[yellow]recording was interrupted: verified up to step {trace.num_steps}"
        )
    if report.suspect_checkpoints:
        console.print(
            "checkpoints inconsistent with the steps on both sides (tampered "
            "weights?): " + ", ".join(map(str, report.suspect_checkpoints))
        )
    if report.accepted:
        console.print("[green]ACCEPTED[/green]")
        return EXIT_ACCEPTED
    first = report.failed_steps[0]
    console.print(f"[red]REJECTED[/red] at step {first}")
    return EXIT_REJECTED


def _forging_table(summaries, title: str) -> Table:  # noqa: ANN001 - summaries
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
    callback=_positive_int,
    help="Examples replaced per batch.",
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=300,
    show_default=True,
    callback=_positive_int,
    help="Candidates per forgery.",
)
@click.option(
    "--every",
    type=int,
    default=100,
    show_default=True,
    callback=_positive_int,
    help="Attack every N-th checkpoint.",
)
@click.option(
    "--runs",
    type=int,
    default=10,
    show_default=True,
    callback=_positive_int,
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

    fixed = _parse_tolerance(tolerance)
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
        _forging_table(summaries, f"{attack}: f={num_replaced}, M={num_candidates}")
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


@cli.command()
@click.option("--dataset", default="mnist", show_default=True, help="Dataset name.")
@click.option("--model", default="lenet", show_default=True, help="Model name.")
@data_dir_option
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("forgelab-out/reproduce"),
    show_default=True,
    help="Output directory (its trace/ is replaced).",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    callback=_positive_int,
    help="Training epochs (default: about 2,400 steps).",
)
@click.option(
    "--every", type=int, default=100, show_default=True, callback=_positive_int
)
@click.option("--runs", type=int, default=10, show_default=True, callback=_positive_int)
@click.option(
    "-f", "num_replaced", type=int, default=1, show_default=True, callback=_positive_int
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=300,
    show_default=True,
    callback=_positive_int,
)
@click.option("--seed", type=int, default=2024, show_default=True)
@click.option("--safety-factor", type=float, default=10.0, show_default=True)
def reproduce(
    dataset: str,
    model: str,
    data_dir: Path | None,
    out: Path,
    epochs: int | None,
    every: int,
    runs: int,
    num_replaced: int,
    num_candidates: int,
    seed: int,
    safety_factor: float,
) -> int:
    """Record, verify and forge a trace on real data; write a report and figures."""
    from forgelab.data import load_dataset
    from forgelab.reproduce import ReproduceSettings, run_reproduce

    if not safety_factor > 0:
        raise click.BadParameter("must be positive", param_hint="--safety-factor")
    data = load_dataset(dataset, data_dir)
    settings = ReproduceSettings(
        model=model,
        num_epochs=epochs,
        seed=seed,
        every=every,
        num_runs=runs,
        num_replaced=num_replaced,
        num_candidates=num_candidates,
        safety_factor=safety_factor,
    )
    with progress_bars() as tasks:
        result = run_reproduce(out, data, settings, tasks)
    title = (
        f"{dataset}/{model}: reproduction error, tolerance and forging error "
        f"(f={num_replaced}, M={num_candidates})"
    )
    console.print(_forging_table(result.summaries, title))
    accuracies = result.trace.manifest.get("test_accuracy", [])
    verdict = "accepted" if result.verification.accepted else "REJECTED"
    console.print(
        f"honest trace: {result.trace.num_steps} steps, test accuracy "
        f"{accuracies[-1]['accuracy']:.2%}, {verdict}; max reproduction error "
        f"{max(s.l2 for s in result.verification.segments):.3e}; "
        f"tolerance {result.tolerance:.3e}"
    )
    if result.num_undetected:
        console.print(
            f"[red]{result.num_undetected} of {len(result.forgeries)} forgeries are "
            "NOT "
            f"detected[/red] (margin {result.margin:.2f})"
        )
    else:
        console.print(
            f"all {len(result.forgeries)} forgeries detected; margin min(forging error)"
            f" / tolerance = {result.margin:.1f}"
        )
    console.print(f"report: {out / 'report.md'}, results.json and figures in {out}")
    return EXIT_ACCEPTED


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command line and map errors to exit codes."""
    try:
        code = cli.main(args=argv, prog_name="forgelab", standalone_mode=False)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except click.ClickException as error:
        error.show()
        code = EXIT_UNUSABLE
    except click.exceptions.Abort:
        error_console.print("forgelab: aborted")
        code = EXIT_UNUSABLE
    except ForgelabError as error:
        print(f"forgelab: error: {error}", file=sys.stderr)
        code = error.exit_code
    except OSError as error:
        print(f"forgelab: error: {error}", file=sys.stderr)
        code = EXIT_UNUSABLE
    return EXIT_ACCEPTED if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
