"""``forgelab theory``: can two distinct batches share a gradient? The evidence."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    cli,
    console,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED

MAX_THEORY_TOLERANCE = 1e-6
"""Largest tau the exact pair search accepts (it counts pairs within 100 tau)."""


@cli.command()
@click.option(
    "--dataset",
    type=click.Choice(["digits", "mnist"]),
    default="digits",
    show_default=True,
    help="Embedded dataset to measure on.",
)
@click.option(
    "--out",
    type=OUTPUT_PATH,
    default=None,
    help="Output directory (default: forgelab-out/theory-<dataset>).",
)
@click.option(
    "--tolerance",
    type=float,
    default=1e-7,
    show_default=True,
    help="tau for decisions (weight-space L2; the re-evaluation's threshold); "
    "at most 1e-6.",
)
@click.option(
    "--lr",
    type=float,
    default=0.01,
    show_default=True,
    help="Learning rate eta that turns gradient distances into forging errors.",
)
@click.option("--seed", type=SEED, default=2024, show_default=True)
def theory(
    dataset: str, out: Path | None, tolerance: float, lr: float, seed: int
) -> int:
    """Closed forms, domain searches, first layers and float order; writes a report."""
    from forgelab.data import load_dataset
    from forgelab.theory.run import TheorySettings, run_theory

    # the exact pair search lists every pair within tau and counts those within
    # 100 tau, so a large tau makes the search ball, and the run, unbounded
    if not 0 < tolerance <= MAX_THEORY_TOLERANCE:
        raise click.BadParameter(
            f"{tolerance!r} must be in (0, {MAX_THEORY_TOLERANCE:g}]: the exact "
            "search enumerates every pair within 100 tau",
            param_hint="--tolerance",
        )
    if not 0 < lr < float("inf"):
        raise click.BadParameter(f"{lr!r} must be a positive number", param_hint="--lr")
    data = load_dataset(dataset)
    settings = TheorySettings(lr=lr, tolerance=tolerance, seed=seed)
    out = out or Path("forgelab-out") / f"theory-{dataset}"
    with progress_bars() as tasks:
        result = run_theory(data, out, settings, tasks)
    table = Table(title=f"{dataset}: can two batches share a gradient?")
    table.add_column("question")
    table.add_column("measured", justify="right")
    for row in result.single:
        table.add_row(
            f"single example, {row['model']}: distinct in-domain forgery",
            f"{row['num_forgeable']} of {row['num_examples']}",
        )
    worst = max(row["relative_error"] for row in result.constructions)
    table.add_row(
        f"real-valued batch forgeries ({len(result.constructions)}): max rel. error",
        f"{worst:.1e}",
    )
    for row in result.exact:
        table.add_row(
            f"exact search, {row['model']}, b = {row['batch_size']}",
            "FORGERY FOUND" if row["found"] else "none within tau",
        )
    for row in result.relaxed:
        table.add_row(
            f"b = {row['batch_size']} from {row['start']}: real / projected error",
            f"{row['relaxed_error']:.1e} / {row['projected_error']:.1e}",
        )
    spread = max(row["max_update_distance"] for row in result.reorder)
    table.add_row(
        "reordering spread / calibrated tau",
        f"{spread:.1e} / {result.calibration['tolerance']:.1e}",
    )
    console.print(table)
    console.print(f"report: {out / 'report.md'}; theory.json and figures in {out}")
    return EXIT_ACCEPTED
