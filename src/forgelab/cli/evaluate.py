"""``forgelab evaluate``: every attack against one trace, and how the verifier fares."""

from __future__ import annotations

import math
from pathlib import Path

import click
from click.core import ParameterSource
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    NonEmptyPath,
    check_safety_factor,
    cli,
    console,
    data_dir_option,
    positive_int,
    prepare_output,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _auc(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def evaluation_table(evaluation, title: str) -> Table:  # noqa: ANN001 - Evaluation
    """One row per attack: forging errors, margin over tau, detection, AUC."""
    table = Table(title=title)
    for column in (
        "attack",
        "steps",
        "replaced",
        "forging error min",
        "median",
        "max",
        "margin",
        "detected",
        "AUC",
        "AUC permuted",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for result in evaluation.attacks:
        row = result.summary()
        detected = f"{row['num_detected']}/{row['num_steps']}"
        if row["num_detected"] < row["num_steps"]:
            detected = f"[red]{detected}[/red]"
        table.add_row(
            result.attack,
            str(row["num_steps"]),
            f"{row['num_replaced_median']:g}",
            f"{row['forging_error_min']:.3e}",
            f"{row['forging_error_median']:.3e}",
            f"{row['forging_error_max']:.3e}",
            f"{row['margin']:.3g}",
            detected,
            _auc(row["auc"]),
            _auc(row["benign_auc"]),
            f"{row['seconds']:.0f}",
        )
    return table


@cli.command()
@click.argument("trace_dir", metavar="TRACE", type=NonEmptyPath(path_type=Path))
@data_dir_option
@click.option(
    "--attack",
    "attacks",
    multiple=True,
    help="Attack to run (repeat for several; default: all of them).",
)
@click.option(
    "--remove",
    "remove_file",
    type=click.Path(path_type=Path),
    default=None,
    help="The removal claim: a file of example indices.",
)
@click.option(
    "--remove-count",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
    help="The removal claim: this many random examples.",
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=None,
    callback=positive_int,
    help="M for every attack that takes one (default: each one's published M).",
)
@click.option(
    "--max-steps",
    type=int,
    default=10,
    show_default=True,
    callback=positive_int,
    help="Forged steps evaluated per attack (a random sample of the steps that "
    "touch the removed set).",
)
@click.option(
    "--benign-steps",
    type=int,
    default=20,
    show_default=True,
    help="Honest steps replayed with a permuted batch for the second ROC.",
)
@click.option("--safety-factor", type=float, default=10.0, show_default=True)
@click.option("--seed", type=SEED, default=2024, show_default=True)
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=None,
    help="Where to write evaluate.json and one figure per attack "
    "(default: forgelab-out/evaluate-<trace name>).",
)
def evaluate(
    trace_dir: Path,
    data_dir: Path | None,
    attacks: tuple[str, ...],
    remove_file: Path | None,
    remove_count: int,
    num_candidates: int | None,
    max_steps: int,
    benign_steps: int,
    safety_factor: float,
    seed: int,
    out: Path | None,
) -> int:
    """Run the forging attacks against TRACE and see how often replay catches them.

    Reports per attack the forging errors, the margin over the calibrated
    tolerance, the detection rate, and the ROC/AUC separating forged from honest
    steps, with one figure per attack.
    """
    from forgelab.data import load_dataset
    from forgelab.evaluation import evaluate_attacks, roc_curve
    from forgelab.forgery import draw_removed, read_removed, refuse_forged_input
    from forgelab.report import plot_detection, write_json
    from forgelab.trace import Trace, check_output_outside

    check_safety_factor(safety_factor)
    if benign_steps < 0:
        raise click.BadParameter("must be >= 0", param_hint="--benign-steps")
    context = click.get_current_context()
    if (
        remove_file is not None
        and context.get_parameter_source("remove_count") is ParameterSource.COMMANDLINE
    ):
        raise click.UsageError("give either --remove or --remove-count, not both")
    attacks = tuple(dict.fromkeys(attacks))
    trace = Trace(trace_dir)
    refuse_forged_input(trace)
    out = out or Path("forgelab-out") / f"evaluate-{trace_dir.resolve().name}"
    check_output_outside(out, trace_dir)
    prepare_output(out, "evaluate.json")
    data = load_dataset(trace.manifest["dataset"]["name"], data_dir)
    if remove_file is not None:
        removed = read_removed(remove_file, data.num_train)
    else:
        removed = draw_removed(data.num_train, remove_count, seed)
    with progress_bars() as tasks:
        evaluation = evaluate_attacks(
            trace,
            data,
            removed,
            attacks=list(attacks) or None,
            num_candidates=num_candidates,
            max_steps=max_steps,
            num_benign=benign_steps,
            safety_factor=safety_factor,
            seed=seed,
            callback=lambda stage, done, total: tasks(stage)(done, total),
        )
    tau = evaluation.tolerance
    for result in evaluation.attacks:
        curves = {}
        for label, honest in (
            ("honest replay", result.honest_errors),
            ("honest, batch permuted", result.benign_errors),
        ):
            if honest:
                fpr, tpr, _ = roc_curve(honest, result.replay_errors)
                curves[label] = (
                    fpr,
                    tpr,
                    result.auc if label == "honest replay" else result.benign_auc,
                )
        plot_detection(
            out / f"evaluate-{result.attack}.png",
            title=f"{trace_dir}: {result.attack}, {len(evaluation.removed)} removed "
            f"examples, {result.detection_rate:.0%} of forged steps rejected at tau",
            tolerance=tau,
            honest=(evaluation.honest_steps, evaluation.honest_errors),
            benign=(evaluation.benign_steps, evaluation.benign_errors),
            forged=(result.steps, result.replay_errors),
            curves=curves,
        )
    write_json(out / "evaluate.json", evaluation.to_json())
    console.print(
        evaluation_table(
            evaluation,
            f"{trace_dir}: {_count(len(evaluation.removed), 'removed example')} "
            f"touch {_count(len(evaluation.touched_steps), 'step')}; tau = {tau:.3e}",
        )
    )
    honest = evaluation.honest_errors
    permuted = (
        f"max {max(evaluation.benign_errors):.3e}"
        if evaluation.benign_errors
        else "not measured (--benign-steps 0)"
    )
    console.print(
        f"honest replay: {len(honest)} steps, max error {max(honest):.3e}; honest "
        f"steps with a permuted batch: {permuted}; margin = smallest forged "
        "replay error / tau"
    )
    missed = [r.attack for r in evaluation.attacks if r.num_detected < len(r.steps)]
    if missed:
        console.print(
            "[red]forged steps NOT detected at tau[/red] for: " + ", ".join(missed)
        )
    console.print(f"results and figures in {out}")
    return EXIT_ACCEPTED
