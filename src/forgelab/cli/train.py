"""``forgelab train``: record an execution trace."""

from __future__ import annotations

from pathlib import Path

import click

from forgelab.cli.base import (
    OUTPUT_PATH,
    SEED,
    cli,
    console,
    data_dir_option,
    positive_int,
    progress_bars,
)
from forgelab.errors import EXIT_ACCEPTED


@cli.command()
@click.option(
    "--dataset",
    default=None,
    help="Dataset name [default: mnist; with --resume, the trace's dataset].",
)
@click.option("--model", default="lenet", show_default=True, help="Model name.")
@click.option("--out", type=OUTPUT_PATH, required=True, help="Trace dir.")
@data_dir_option
@click.option(
    "--epochs",
    type=int,
    default=None,
    callback=positive_int,
    help="Epochs (default: about 2,400 steps).",
)
@click.option(
    "--lr", type=float, default=0.01, show_default=True, help="Learning rate."
)
@click.option(
    "--batch-size", type=int, default=100, show_default=True, callback=positive_int
)
@click.option("--seed", type=SEED, default=2024, show_default=True)
@click.option(
    "--checkpoint-every",
    type=int,
    default=1,
    show_default=True,
    callback=positive_int,
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
    "--resume",
    is_flag=True,
    help="Continue an interrupted recording in --out with its own settings.",
)
@click.pass_context
def train(
    ctx: click.Context,
    dataset: str | None,
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

    if resume:
        dataset = _resumed_dataset(ctx, out, dataset)
    data = load_dataset(dataset or "mnist", data_dir)
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


def _resumed_dataset(ctx: click.Context, out: Path, dataset: str | None) -> str:
    """The dataset of the trace being resumed; refuse settings a resume cannot change.

    Raises:
        click.UsageError: If a recording setting is given together with --resume, or
            --dataset names other data than the trace's.
    """
    from forgelab.trace import Trace

    fixed = [
        name
        for name in (
            "model",
            "epochs",
            "lr",
            "batch_size",
            "seed",
            "checkpoint_every",
            "dtype",
            "optimizer",
            "momentum",
            "weight_decay",
            "deterministic",
        )
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if fixed:
        option = "--" + fixed[0].replace("_", "-")
        raise click.UsageError(
            f"{option} cannot be combined with --resume: the trace fixes it"
        )
    recorded = Trace(out).manifest["dataset"]["name"]
    if dataset is not None and dataset != recorded:
        raise click.UsageError(
            f"--dataset {dataset} differs from the trace's dataset {recorded}"
        )
    return recorded
