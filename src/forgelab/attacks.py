"""Data forging attacks: replace examples of a batch so the gradient barely changes.

Every attack has one shape: it takes an :class:`AttackContext` (the model at a
checkpoint's weights and the data), the true batch, the slots to replace, the allowed
pool D' and a seeded generator, and returns a :class:`Forgery`.

For plain SGD the forging error of a forged batch B' is the distance it leaves after
one step, ``eps = eta * ||g(B) - g(B')||``. The re-evaluation's reference code reports
``sqrt(eta) * ||g(B) - g(B')||`` instead; both are kept, under different names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from forgelab.data import Dataset
from forgelab.errors import ConfigError
from forgelab.gradients import (
    batch_gradient,
    gradient_distances,
    per_sample_gradients,
    subset_distances,
)
from forgelab.trace import Trace

logger = logging.getLogger(__name__)

DISTANCE_CHUNK = 64
"""Candidate rows whose summed gradients are held at once when ranking candidates.

64 LeNet rows take 16 MB, a buffer that malloc recycles between calls; much larger
ones are mapped afresh every time, and their page faults cost more than the sums."""


@dataclass
class AttackContext:
    """The model at the attacked checkpoint, and the data.

    Attributes:
        model: The model, loaded with the checkpoint's weights.
        loss: Loss name.
        inputs: All training inputs (indices refer to these).
        labels: All training labels.
        lr: Learning rate eta of the attacked step.
    """

    model: nn.Module
    loss: str
    inputs: torch.Tensor
    labels: torch.Tensor
    lr: float

    def per_sample(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients and losses of the examples at ``indices``."""
        dtype = next(self.model.parameters()).dtype
        losses = torch.empty(len(indices), dtype=dtype)
        grads = per_sample_gradients(
            self.model,
            self.loss,
            self.inputs[indices],
            self.labels[indices],
            losses=losses,
        )
        return grads, losses

    def distances(self, indices: np.ndarray, target: torch.Tensor) -> torch.Tensor:
        """L2 distances of the per-sample gradients at ``indices`` to ``target``."""
        return gradient_distances(
            target, self.model, self.loss, self.inputs[indices], self.labels[indices]
        )

    def batch_gradient(self, indices: np.ndarray) -> torch.Tensor:
        """Gradient of the mean loss over the examples at ``indices``."""
        dtype = next(self.model.parameters()).dtype
        return batch_gradient(
            self.model, self.loss, self.inputs[indices].to(dtype), self.labels[indices]
        )


@dataclass
class Forgery:
    """A forged batch and how far its gradient is from the true one.

    Attributes:
        batch: The forged batch (example indices), same length as the true batch.
        slots: Positions of the replaced examples.
        replacement: Indices placed in those positions.
        distance: ``||g(B) - g(B')||``, the gradient distance.
        lr: Learning rate eta used to turn the distance into a forging error.
        replaced_loss: Mean loss of the original examples in the replaced slots.
        replaced_grad_norm: Mean per-sample gradient norm of those examples.
        num_candidates: How many candidates the attack ranked.
    """

    batch: np.ndarray
    slots: np.ndarray
    replacement: np.ndarray
    distance: float
    lr: float
    replaced_loss: float = math.nan
    replaced_grad_norm: float = math.nan
    num_candidates: int = 0

    @property
    def forging_error(self) -> float:
        """One-step weight error for plain SGD: ``eta * ||g(B) - g(B')||``."""
        return self.lr * self.distance

    @property
    def paper_error(self) -> float:
        """The re-evaluation code's figure: ``sqrt(eta) * ||g(B) - g(B')||``."""
        return math.sqrt(self.lr) * self.distance


def _check_slots(batch: np.ndarray, slots: np.ndarray, pool: np.ndarray) -> None:
    if len(slots) == 0 or len(slots) > len(batch):
        raise ConfigError(f"cannot replace {len(slots)} of {len(batch)} examples")
    if (
        len(np.unique(slots)) != len(slots)
        or slots.min() < 0
        or slots.max() >= len(batch)
    ):
        raise ConfigError("replaced slots must be distinct positions inside the batch")
    if len(pool) == 0:
        raise ConfigError("the pool of allowed replacement examples is empty")


def draw_subsets(
    pool: np.ndarray, num_candidates: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``num_candidates`` subsets of ``size`` examples, with replacement."""
    if num_candidates < 1:
        raise ConfigError(f"number of candidates must be >= 1, got {num_candidates}")
    return pool[rng.integers(len(pool), size=(num_candidates, size))]


def reeval(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 300,
) -> Forgery:
    """Replace the given slots by the best of M random subsets, by gradient distance.

    The forging experiment of the re-evaluation (Suliman et al. 2025, Sec. 5): the
    first f examples of a batch are replaced by the best of M = 300 random f-subsets
    drawn with replacement from the data minus the batch, ranked by the L2 distance of
    the batch gradients.

    Only the replaced examples change the batch gradient, so the distance of a
    candidate subset C is ``||sum_C g_c - sum_R g_r|| / b`` over per-sample gradients,
    which costs ``|R| + M f`` per-sample gradients instead of M batch gradients.

    Args:
        context: Model and data at the attacked checkpoint.
        batch: The true batch.
        slots: Positions to replace (``range(f)`` for the published attack).
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Seeded generator.
        num_candidates: M.

    Returns:
        The best forgery among the candidates.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    draws = draw_subsets(pool, num_candidates, len(slots), rng)

    # per-sample gradients of the replaced examples, summed: the target
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    target = replaced_grads.sum(0)
    unique, inverse = np.unique(draws, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(draws.shape))

    # rank candidate subsets by the distance of their summed gradients; a single
    # replaced example needs only each candidate's own distance, streamed
    if len(slots) == 1:
        distances = context.distances(unique, target)[inverse[:, 0]]
    else:
        candidate_grads, _ = context.per_sample(unique)
        distances = subset_distances(
            candidate_grads, inverse, target, block_size=DISTANCE_CHUNK
        )
    best = int(torch.argmin(distances))
    forged = batch.copy()
    forged[slots] = draws[best]
    return Forgery(
        batch=forged,
        slots=slots,
        replacement=draws[best],
        distance=float(distances[best]) / len(batch),
        lr=context.lr,
        replaced_loss=float(replaced_losses.mean()),
        replaced_grad_norm=float(
            torch.linalg.vector_norm(replaced_grads, dim=1).mean()
        ),
        num_candidates=num_candidates,
    )


def reeval_naive(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 300,
) -> Forgery:
    """Slow reference of :func:`reeval`: one full batch gradient per candidate.

    This is the algorithm as published; it draws the same candidates from ``rng``.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    draws = draw_subsets(pool, num_candidates, len(slots), rng)
    true_gradient = context.batch_gradient(batch).to(torch.float64)
    distances = []
    for subset in draws:
        candidate = batch.copy()
        candidate[slots] = subset
        gradient = context.batch_gradient(candidate).to(torch.float64)
        distances.append(float(torch.linalg.vector_norm(gradient - true_gradient)))
    best = int(np.argmin(distances))
    forged = batch.copy()
    forged[slots] = draws[best]
    return Forgery(forged, slots, draws[best], distances[best], context.lr)


AttackFunction = Callable[..., Forgery]
ATTACKS: dict[str, AttackFunction] = {"reeval": reeval}


@dataclass
class CheckpointForgery:
    """One forging attempt at one checkpoint (one row of the forging experiment).

    Attributes:
        step: Step count of the attacked checkpoint.
        run: Run number.
        attack: Attack name.
        forging_error: ``eta * ||g(B) - g(B')||``.
        paper_error: ``sqrt(eta) * ||g(B) - g(B')||`` (the reference code's figure).
        distance: ``||g(B) - g(B')||``.
        update_norm: ``eta * ||g(B)||``, the size of the true step.
        replaced_loss: Mean loss of the replaced examples.
        replaced_grad_norm: Mean per-sample gradient norm of the replaced examples.
        replaced: Indices of the replaced examples.
        replacement: Indices that replaced them.
    """

    step: int
    run: int
    attack: str
    forging_error: float
    paper_error: float
    distance: float
    update_norm: float
    replaced_loss: float
    replaced_grad_norm: float
    replaced: list[int]
    replacement: list[int]

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def attack_checkpoints(
    trace: Trace,
    dataset: Dataset,
    *,
    attack: str = "reeval",
    every: int = 100,
    num_runs: int = 10,
    num_replaced: int = 1,
    num_candidates: int = 300,
    seed: int = 2024,
    callback: Callable[[int, int], None] | None = None,
) -> list[CheckpointForgery]:
    """The re-evaluation's forging experiment across the checkpoints of a trace.

    At every checkpoint whose step is a multiple of ``every`` (and that has a step
    after it), each run draws a random true batch B of the trace's batch size and
    replaces its first ``num_replaced`` examples using the attack, with the pool being
    the training data minus B (Suliman et al. 2025, Sec. 5 and Fig. 3).

    Args:
        trace: A trace; its checkpoints provide the weights.
        dataset: The training data.
        attack: Attack name in :data:`ATTACKS`.
        every: Attack every this many steps.
        num_runs: Random batches per checkpoint.
        num_replaced: f, the number of replaced examples.
        num_candidates: M.
        seed: Seed of the batches and candidates.
        callback: Called with ``(attempts_done, total_attempts)``.

    Returns:
        One record per checkpoint and run.
    """
    if attack not in ATTACKS:
        raise ConfigError(
            f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}"
        )
    if every < 1 or num_runs < 1:
        raise ConfigError("--every and --runs must be >= 1")
    if not 1 <= num_replaced <= trace.batch_size:
        raise ConfigError(f"-f must be between 1 and the batch size {trace.batch_size}")
    if trace.optimizer.name != "sgd":
        raise ConfigError("the checkpoint experiment is defined for SGD traces")
    positions = [
        position
        for position, entry in enumerate(trace.checkpoints[:-1])
        if entry.step % every == 0
    ]
    model = trace.build_model()
    records: list[CheckpointForgery] = []
    total = len(positions) * num_runs
    everything = np.arange(dataset.num_train)
    for position in positions:
        checkpoint = trace.load_checkpoint(position)
        trace.load_weights_into(model, checkpoint)
        context = AttackContext(
            model,
            trace.model_spec.loss,
            dataset.x_train,
            dataset.y_train,
            trace.optimizer.lr,
        )
        for run in range(num_runs):
            # draw the true batch, forge it, record the outcome
            rng = np.random.default_rng([seed, checkpoint.step, run])
            batch = rng.choice(dataset.num_train, size=trace.batch_size, replace=False)
            pool = np.setdiff1d(everything, batch)
            slots = np.arange(num_replaced)
            forgery = ATTACKS[attack](
                context, batch, slots, pool, rng, num_candidates=num_candidates
            )
            step_size = context.lr * float(
                torch.linalg.vector_norm(context.batch_gradient(batch))
            )
            records.append(
                CheckpointForgery(
                    step=checkpoint.step,
                    run=run,
                    attack=attack,
                    forging_error=forgery.forging_error,
                    paper_error=forgery.paper_error,
                    distance=forgery.distance,
                    update_norm=step_size,
                    replaced_loss=forgery.replaced_loss,
                    replaced_grad_norm=forgery.replaced_grad_norm,
                    replaced=[int(i) for i in batch[slots]],
                    replacement=[int(i) for i in forgery.replacement],
                )
            )
            if callback is not None:
                callback(len(records), total)
    return records
