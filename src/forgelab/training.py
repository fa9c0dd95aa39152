"""Training that records an execution trace, and resuming an interrupted recording.

The example order of epoch ``e`` is a permutation drawn from the seed sequence
``(seed, e)``, and the initial weights come from ``torch.manual_seed(seed)``, so a
recording can be resumed from any checkpoint and continue bit-identically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from forgelab import __version__
from forgelab.data import Dataset
from forgelab.errors import ConfigError, TraceError
from forgelab.models import (
    ModelSpec,
    accuracy,
    as_model_input,
    build_model,
    compute_loss,
)
from forgelab.optim import OptimizerConfig, build_optimizer, import_state
from forgelab.trace import (
    CHECKPOINT_DIR,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_STEPS,
    Trace,
    TraceWriter,
    is_temporary_file,
)

logger = logging.getLogger(__name__)

DEFAULT_TARGET_STEPS = 2400
"""Default training length in steps, rounded up to whole epochs (at least two).

Two epochs of full MNIST at batch 100 are the re-evaluation's 1,200 steps; on the
4,000-example embedded MNIST a LeNet with plain SGD at eta 0.01 is near 77% test
accuracy after 1,200 steps and near 94% after 2,400, so the default trains longer.
"""

StepCallback = Callable[[int, int], None]


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Number of full batches in one epoch (the incomplete last batch is dropped)."""
    if batch_size > num_train:
        raise ConfigError(
            f"batch size {batch_size} exceeds the {num_train} training examples"
        )
    return num_train // batch_size


def default_num_epochs(num_train: int, batch_size: int) -> int:
    """Epochs needed to reach :data:`DEFAULT_TARGET_STEPS` steps, at least two."""
    return max(
        2, math.ceil(DEFAULT_TARGET_STEPS / steps_per_epoch(num_train, batch_size))
    )


def epoch_order(seed: int, epoch: int, num_train: int) -> np.ndarray:
    """The example order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_train)


def batch_at(seed: int, step: int, num_train: int, batch_size: int) -> np.ndarray:
    """Example indices of the batch used at 0-based update ``step``."""
    per_epoch = steps_per_epoch(num_train, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = epoch_order(seed, epoch, num_train)
    return order[position * batch_size : (position + 1) * batch_size]


@contextlib.contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """Run a block with torch's deterministic algorithms switched on or off."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def environment() -> dict:
    """Software and hardware facts that affect reproduction error."""
    return {
        "forgelab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "num_threads": torch.get_num_threads(),
    }


def _check_new_trace_dir(out: Path) -> None:
    """Refuse a recording directory that holds anything or lies inside a trace.

    Raises:
        ConfigError: If ``out`` holds a manifest (a trace to resume), is not an
            empty directory, or is inside another trace's directory.
    """
    if (out / MANIFEST_NAME).exists():
        raise ConfigError(
            f"{out} already holds a {MANIFEST_NAME}; use --resume or another --out"
        )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"{out} exists and is not an empty directory; a trace is recorded into a "
            "new or empty one"
        )
    for parent in out.resolve().parents:
        if (parent / MANIFEST_NAME).is_file() and (parent / CHECKPOINT_DIR).is_dir():
            raise ConfigError(
                f"--out {out} is inside the trace {parent}; choose a directory "
                "outside it"
            )


def record_trace(
    out: str | Path,
    dataset: Dataset,
    model_name: str,
    *,
    optimizer: OptimizerConfig | None = None,
    batch_size: int = 100,
    num_epochs: int | None = None,
    seed: int = 2024,
    checkpoint_interval: int = 1,
    dtype: str = "float32",
    deterministic: bool = True,
    callback: StepCallback | None = None,
) -> Path:
    """Train a model with an optimizer and record its execution trace.

    Defaults follow the re-evaluation (Suliman et al. 2025): SGD with eta 0.01, batch
    100, seed 2024, fp32, a checkpoint after every step.

    Args:
        out: Trace directory to create; must not hold a trace already.
        dataset: Training data.
        model_name: Model registry name.
        optimizer: Optimizer and hyperparameters; plain SGD with eta 0.01 by default.
        batch_size: Examples per step.
        num_epochs: Epochs; by default enough for about 2,400 steps.
        seed: Seed of the initial weights and of the example order.
        checkpoint_interval: Steps between checkpoints (k).
        dtype: ``"float32"`` or ``"float64"``.
        deterministic: Switch on torch's deterministic algorithms while training.
        callback: Called with ``(steps_done, total_steps)`` after every step.

    Returns:
        The trace directory.
    """
    out = Path(out)
    _check_new_trace_dir(out)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")
    if checkpoint_interval < 1:
        raise ConfigError(
            f"checkpoint interval must be >= 1, got {checkpoint_interval}"
        )
    optimizer = optimizer or OptimizerConfig()
    per_epoch = steps_per_epoch(dataset.num_train, batch_size)
    num_epochs = num_epochs or default_num_epochs(dataset.num_train, batch_size)
    if num_epochs < 1:
        raise ConfigError(f"number of epochs must be >= 1, got {num_epochs}")
    # the limits a trace reader enforces, checked before any work is done
    if num_epochs * per_epoch > MAX_STEPS or checkpoint_interval > MAX_STEPS:
        raise ConfigError(
            f"a trace holds at most {MAX_STEPS:,} steps and checkpoint intervals; "
            f"{num_epochs} epochs of {per_epoch} steps and interval "
            f"{checkpoint_interval} ask for more"
        )
    spec = ModelSpec.for_domain(model_name, dataset.domain)
    torch.manual_seed(seed)
    model = build_model(spec).to(DTYPES[dtype])
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset": dataset.describe(),
        "model": spec.describe(),
        "optimizer": optimizer.describe(),
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "seed": seed,
        "dtype": dtype,
        "deterministic": deterministic,
        "checkpoint_interval": checkpoint_interval,
        "environment": environment(),
        "total_steps": num_epochs * per_epoch,
    }
    writer = TraceWriter(out, manifest)
    torch_optimizer = build_optimizer(optimizer, model)
    writer.write_checkpoint(0, model, torch_optimizer, [])
    logger.info("recording %s/%s into %s", dataset.name, model_name, out)
    _train(writer, model, torch_optimizer, dataset, 0, callback)
    return writer.finish()


def resume_trace(
    out: str | Path, dataset: Dataset, *, callback: StepCallback | None = None
) -> Path:
    """Continue an interrupted recording from its last complete checkpoint.

    The last listed checkpoint is loaded with every check a verifier applies;
    leftovers of the interrupted run (temporary files of an unfinished write, a
    checkpoint written after the last manifest update) are removed or overwritten.
    The continued run produces the same checkpoints, bit for bit, as an uninterrupted
    one on the same machine with the same number of threads.

    Args:
        out: The trace directory of the interrupted run.
        dataset: The same training data.
        callback: Called with ``(steps_done, total_steps)`` after every step.

    Returns:
        The trace directory.

    Raises:
        ConfigError: If the recording is already complete.
        TraceError: If the trace is malformed, was recorded on other data, or lacks
            the fields a continuation needs.
    """
    trace = Trace(out)
    if trace.complete:
        raise ConfigError(f"{out}: the recording is already complete")
    claimed = trace.manifest["dataset"]
    if (claimed["name"], claimed["fingerprint"], claimed["num_train"]) != (
        dataset.name,
        dataset.fingerprint,
        dataset.num_train,
    ):
        raise TraceError(
            f"{trace.root / MANIFEST_NAME}: recorded on {claimed['name']} with "
            f"fingerprint {claimed['fingerprint']}, not on the "
            f"{dataset.name} data given ({dataset.fingerprint})"
        )
    if "total_steps" not in trace.manifest:
        raise TraceError(
            f"{trace.root / MANIFEST_NAME}: no total_steps; cannot tell where the "
            "recording was meant to end"
        )
    last = trace.load_checkpoint(len(trace.checkpoints) - 1)
    _remove_leftovers(trace.root)
    model = trace.build_model()
    trace.load_weights_into(model, last)
    torch_optimizer = build_optimizer(trace.optimizer, model)
    import_state(torch_optimizer, model, last.optimizer_state)
    manifest = dict(trace.manifest)
    manifest["test_accuracy"] = [
        entry
        for entry in manifest.get("test_accuracy", [])
        if entry["step"] <= last.step
    ]
    manifest["resumed"] = [
        *manifest.get("resumed", []),
        {"step": last.step, "environment": environment()},
    ]
    writer = TraceWriter(trace.root, manifest, trace.checkpoints)
    logger.info("resuming %s from step %d", out, last.step)
    _train(writer, model, torch_optimizer, dataset, last.step, callback)
    return writer.finish()


def _remove_leftovers(root: Path) -> None:
    """Delete the temporary files of atomic writes an interrupted run left behind."""
    for directory in (root, root / CHECKPOINT_DIR):
        for path in directory.iterdir():
            if is_temporary_file(path.name) and path.is_file():
                logger.info("removing %s, left by an interrupted write", path)
                path.unlink()


def _train(
    writer: TraceWriter,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    start: int,
    callback: StepCallback | None,
) -> None:
    manifest = writer.manifest
    seed, batch_size = manifest["seed"], manifest["batch_size"]
    interval = manifest["checkpoint_interval"]
    total = manifest["total_steps"]
    per_epoch = steps_per_epoch(dataset.num_train, batch_size)
    loss_name = manifest["model"]["loss"]
    dtype = DTYPES[manifest["dtype"]]
    pending: list[np.ndarray] = []
    with determinism(manifest["deterministic"]):
        for step in range(start, total):
            # load the batch this step uses
            indices = batch_at(seed, step, dataset.num_train, batch_size)
            inputs = as_model_input(dataset.x_train[indices], dtype)
            labels = dataset.y_train[indices]

            # one optimizer update
            optimizer.zero_grad(set_to_none=True)
            compute_loss(loss_name, model(inputs), labels).backward()
            optimizer.step()
            pending.append(indices)
            done = step + 1

            # measure the epoch, then checkpoint (the manifest write records both)
            if done % per_epoch == 0:
                model.eval()
                test_accuracy = accuracy(
                    model, loss_name, dataset.x_test, dataset.y_test
                )
                model.train()
                writer.record_accuracy(done // per_epoch, done, test_accuracy)
                logger.info(
                    "epoch %d: test accuracy %.4f", done // per_epoch, test_accuracy
                )
            if done % interval == 0 or done == total:
                writer.write_checkpoint(done, model, optimizer, pending)
                pending = []
            if callback is not None:
                callback(done, total)
