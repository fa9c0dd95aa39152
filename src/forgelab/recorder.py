"""Record an execution trace from any PyTorch training loop.

forgelab's own trainer (:func:`forgelab.training.record_trace`) covers the built-in
models. A :class:`TraceRecorder` lets a hand-written loop produce the same trace
format: create it before the first step, call :meth:`TraceRecorder.record_step` with
the batch's example indices after every ``optimizer.step()``, and it writes a
checkpoint every ``checkpoint_every`` steps.

For ``forgelab verify`` to replay the trace, each step of the loop must be what a
replay recomputes: with ``x, y = dataset.x_train[batch], dataset.y_train[batch]``,
``optimizer.zero_grad()``, the mean loss (``cross_entropy`` or ``bce``, see
:func:`forgelab.models.compute_loss`) of ``model(x)``, ``backward()``,
``optimizer.step()``. The model must be deterministic (no dropout) and must keep no
buffers (no BatchNorm running statistics), because a checkpoint holds parameters and
optimizer state only. The verifier rebuilds the model from an entry point
``package.module:factory`` recorded in the manifest, which it imports only when told
to (``--allow-import``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import nn

from forgelab.data import Dataset
from forgelab.errors import ConfigError
from forgelab.models import ENTRY_POINT_MODEL, ModelSpec, load_entry_point
from forgelab.optim import OptimizerConfig, config_from_torch, export_state
from forgelab.trace import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TraceWriter,
)
from forgelab.training import environment

logger = logging.getLogger(__name__)


class TraceRecorder:
    """Records the trace of a training loop that forgelab does not run.

    Create it after building the model and optimizer and before the first step. It
    keeps a copy of the initial weights and optimizer state, and writes them as
    checkpoint 0 at the first :meth:`record_step`, when the batch size is known.

    Args:
        out: Trace directory to create; must not hold a trace already.
        model: The model being trained.
        optimizer: Its optimizer, ``torch.optim.SGD`` or ``torch.optim.Adam`` with
            one parameter group (see :func:`forgelab.optim.config_from_torch`).
        dataset: The training data the batch indices point into; its name and
            fingerprint identify it in the manifest.
        entry_point: ``package.module:factory``, a function without arguments that
            builds a model of the same architecture; the verifier imports it.
        loss: ``"cross_entropy"`` or ``"bce"``, the mean loss the loop minimises.
        checkpoint_every: Steps between checkpoints (k).
        seed: The loop's seed, recorded for the reader (default: torch's initial
            seed).

    Raises:
        ConfigError: If the trace could not be replayed as described (unsupported
            optimizer, buffers, an entry point that does not build this
            architecture, an existing trace).
    """

    def __init__(
        self,
        out: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset: Dataset,
        *,
        entry_point: str,
        loss: str = "cross_entropy",
        checkpoint_every: int = 1,
        seed: int | None = None,
    ) -> None:
        out = Path(out)
        if (out / MANIFEST_NAME).exists():
            raise ConfigError(f"{out} already holds a trace; choose another directory")
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.model, self.optimizer, self.dataset = model, optimizer, dataset
        self.config = config_from_torch(optimizer, model)
        self.checkpoint_every = checkpoint_every
        dtype = _model_dtype(model)
        _check_no_buffers(model)
        spec = ModelSpec(
            ENTRY_POINT_MODEL,
            tuple(dataset.domain.input_shape),
            dataset.domain.num_classes,
            vocab_size=dataset.domain.vocab_size,
            entry_point=entry_point,
            declared_loss=loss,
        )
        _check_entry_point(entry_point, model)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dataset": dataset.describe(),
            "model": spec.describe(),
            "optimizer": self.config.describe(),
            "batch_size": None,
            "seed": torch.initial_seed() if seed is None else int(seed),
            "dtype": dtype,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "checkpoint_interval": checkpoint_every,
            "environment": environment(),
        }
        self.writer = TraceWriter(out, manifest)
        self.num_steps = 0
        self.finished = False
        self._pending: list[np.ndarray] = []
        self._initial = (
            {name: p.detach().clone() for name, p in model.named_parameters()},
            export_state(optimizer, model),
        )
        logger.info("recording a trace of %s into %s", entry_point, out)

    @property
    def root(self) -> Path:
        """The trace directory."""
        return self.writer.root

    def record_step(self, batch_indices: np.ndarray | torch.Tensor | list) -> None:
        """Log one optimizer step; call it right after ``optimizer.step()``.

        Args:
            batch_indices: Indices into ``dataset.x_train`` of the examples the step
                used, in the order the loop used them. Every step must use the same
                number of examples.

        Raises:
            ConfigError: If the indices are out of range, the batch size changed, the
                hyperparameters changed (a learning-rate schedule), or the recording
                is finished.
        """
        if self.finished:
            raise ConfigError("the recording is finished; no more steps can be added")
        indices = _as_indices(batch_indices, self.dataset.num_train)
        batch_size = self.writer.manifest["batch_size"]
        if batch_size is None:
            self.writer.manifest["batch_size"] = batch_size = len(indices)
            self.writer.write_raw_checkpoint(0, *self._initial, [])
        if len(indices) != batch_size:
            raise ConfigError(
                f"step {self.num_steps + 1} has {len(indices)} examples, the first "
                f"had {batch_size}; a trace needs one batch size (drop the last "
                "incomplete batch)"
            )
        current = config_from_torch(self.optimizer, self.model)
        if current != self.config:
            raise ConfigError(
                f"the optimizer's hyperparameters changed at step {self.num_steps + 1}"
                f" ({_changed(self.config, current)}); a trace records one fixed set"
            )
        self._pending.append(indices)
        self.num_steps += 1
        if self.num_steps % self.checkpoint_every == 0:
            self._checkpoint()

    def finish(self) -> Path:
        """Write the last checkpoint if steps are pending and mark the trace complete.

        Returns:
            The trace directory.
        """
        if not self.finished:
            if self._pending:
                self._checkpoint()
            if self.num_steps == 0:
                raise ConfigError("no step was recorded; call record_step per step")
            self.finished = True
            self.writer.finish()
        return self.root

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # on an exception the trace stays 'recording', valid up to its last checkpoint
        if kind is None:
            self.finish()

    def _checkpoint(self) -> None:
        self.writer.write_checkpoint(
            self.num_steps, self.model, self.optimizer, self._pending
        )
        self._pending = []


def _model_dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    names = [name for name, dtype in DTYPES.items() if {dtype} == dtypes]
    if not names:
        raise ConfigError(
            "all parameters must be float32 or all float64; found "
            f"{sorted(map(str, dtypes))}"
        )
    return names[0]


def _check_no_buffers(model: nn.Module) -> None:
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ConfigError(
            f"the model keeps buffers ({buffers[0]!r}, e.g. BatchNorm running "
            "statistics) that a checkpoint does not hold; a replay could not restore "
            "them"
        )


def _check_entry_point(entry_point: str, model: nn.Module) -> None:
    """Build the entry point's model once and compare its parameters with ``model``."""
    factory = load_entry_point(entry_point)
    try:
        built = factory()
    except Exception as error:  # noqa: BLE001 - any failure of the factory
        raise ConfigError(
            f"entry point {entry_point!r} failed ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(built, nn.Module):
        raise ConfigError(
            f"entry point {entry_point!r} returned {type(built).__name__}, not a "
            "torch.nn.Module"
        )
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: tuple(p.shape) for name, p in built.named_parameters()}
    if expected != found:
        differing = sorted(set(expected.items()) ^ set(found.items()))[0][0]
        raise ConfigError(
            f"entry point {entry_point!r} builds a different architecture than the "
            f"model being trained (parameter {differing!r} differs)"
        )


def _as_indices(batch_indices: object, num_train: int) -> np.ndarray:
    if isinstance(batch_indices, torch.Tensor):
        batch_indices = batch_indices.detach().cpu().numpy()
    indices = np.asarray(batch_indices)
    if indices.ndim != 1 or indices.size == 0 or indices.dtype.kind not in "iu":
        raise ConfigError(
            "batch indices must be a non-empty one-dimensional array of integers"
        )
    if indices.min() < 0 or indices.max() >= num_train:
        raise ConfigError(
            f"batch index out of range [0, {num_train}): min {int(indices.min())}, "
            f"max {int(indices.max())}"
        )
    return indices.astype(np.int64)


def _changed(before: OptimizerConfig, after: OptimizerConfig) -> str:
    old, new = before.describe(), after.describe()
    return ", ".join(
        f"{key} {old[key]} -> {new[key]}" for key in old if old[key] != new[key]
    )
