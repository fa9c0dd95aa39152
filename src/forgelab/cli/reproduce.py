"""``forgelab reproduce``: the main job on real data."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    check_safety_factor,
    cli,
    console,
    data_dir_option,
    positive_int,
    prepare_output,
    progress_bars,
)
from forgelab.cli.forge import forging_table
from forgelab.errors import EXIT_ACCEPTED

MAX_RUNS = 10_000
"""Most random batches per attacked checkpoint (and per attack in the table)."""


def attack_summary_table(rows) -> Table:  # noqa: ANN001 - list[AttackSummary]
    """The compact attack table: every attack at one checkpoint against tau."""
    table = Table(
        title=f"every attack at step {rows[0].step} (published defaults), tau = "
        f"{rows[0].tolerance:.3e}"
    )
    for column in (
        "attack",
        "replaced",
        "candidates",
        "forging error min",
        "median",
        "max",
        "margin",
        "detected",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        detected = f"{row.num_detected}/{len(row.forging_errors)}"
        if row.num_detected < len(row.forging_errors):
            detected = f"[red]{detected}[/red]"
        table.add_row(
            row.attack,
            str(row.num_replaced),
            str(row.num_candidates),
            f"{row.minimum:.3e}",
            f"{row.median:.3e}",
            f"{row.maximum:.3e}",
            f"{row.margin:.3g}",
            detected,
            f"{row.seconds:.0f}",
        )
    return table


@cli.command()
@click.option("--dataset", default="mnist", show_default=True, help="Dataset name.")
@click.option("--model", default="lenet", show_default=True, help="Model name.")
@data_dir_option
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=Path("forgelab-out/reproduce"),
    show_default=True,
    help="Output directory (its trace/ is replaced).",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    callback=positive_int,
    help="Training epochs (default: about 2,400 steps).",
)
@click.option(
    "--every", type=int, default=100, show_default=True, callback=positive_int
)
@click.option("--runs", type=int, default=10, show_default=True, callback=positive_int)
@click.option(
    "-f", "num_replaced", type=int, default=1, show_default=True, callback=positive_int
)
@click.option(
    "-M",
    "num_candidates",
    type=int,
    default=300,
    show_default=True,
    callback=positive_int,
)
@click.option("--seed", type=SEED, default=2024, show_default=True)
@click.option("--safety-factor", type=float, default=10.0, show_default=True)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adam"]),
    default=None,
    help="Default: adam for the transformer, sgd otherwise.",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Learning rate (default: 0.001 with adam, 0.01 with sgd).",
)
@click.option("--momentum", type=float, default=0.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--batch-size", type=int, default=100, show_default=True, callback=positive_int
)
@click.option(
    "--attack-table/--no-attack-table",
    default=True,
    show_default=True,
    help="Also run every attack once per run at one checkpoint (compact table).",
)
@click.option(
    "--attack-runs",
    type=int,
    default=2,
    show_default=True,
    callback=positive_int,
    help="Random batches per attack in the attack table.",
)
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
    optimizer: str | None,
    lr: float | None,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    attack_table: bool,
    attack_runs: int,
) -> int:
    """Record, verify and forge a trace on real data; write a report and figures."""
    from forgelab.attacks import check_candidates
    from forgelab.data import load_dataset
    from forgelab.optim import OptimizerConfig
    from forgelab.reproduce import (
        ReproduceSettings,
        default_optimizer,
        run_reproduce,
    )

    check_safety_factor(safety_factor)
    if num_replaced > batch_size:
        raise click.BadParameter(
            f"must be at most the batch size {batch_size}", param_hint="-f"
        )
    if runs > MAX_RUNS or attack_runs > MAX_RUNS:
        raise click.BadParameter(
            f"--runs and --attack-runs must be at most {MAX_RUNS:,}",
            param_hint="--runs/--attack-runs",
        )
    # the forging experiment's M, checked before anything is trained
    check_candidates(num_candidates, num_replaced)
    prepare_output(out, "results.json")
    name, lr = default_optimizer(model, optimizer, lr)
    config = OptimizerConfig(
        name=name,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    data = load_dataset(dataset, data_dir)
    settings = ReproduceSettings(
        model=model,
        optimizer=config.name,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=batch_size,
        num_epochs=epochs,
        seed=seed,
        every=every,
        num_runs=runs,
        num_replaced=num_replaced,
        num_candidates=num_candidates,
        safety_factor=safety_factor,
        attack_table=attack_table,
        attack_runs=attack_runs,
    )
    with progress_bars() as tasks:
        result = run_reproduce(out, data, settings, tasks)
    title = (
        f"{dataset}/{model}: reproduction error, tolerance and forging error "
        f"(f={num_replaced}, M={num_candidates})"
    )
    console.print(forging_table(result.summaries, title))
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
    if result.attacks:
        console.print(attack_summary_table(result.attacks))
    console.print(f"report: {out / 'report.md'}, results.json and figures in {out}")
    return EXIT_ACCEPTED
