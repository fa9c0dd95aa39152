"""Data forging attacks: replace examples of a batch so the gradient barely changes.

Every attack is a plain function with one shape: it takes an :class:`AttackContext`
(the model at the attacked step's weights, and the data), the true batch, the slots
to replace, the allowed pool D' and a seeded generator, and returns a
:class:`Forgery` (the replacement indices and their forging error). The catalogue:

- ``thudi-batch`` and ``thudi``: Thudi, Jia, Shumailov, Papernot, "On the necessity
  of auditable algorithmic definitions for machine unlearning", USENIX Security 2022.
- ``reeval``: the forging experiment of Suliman, Halimi, Kadhe, Baracaldo, Leith,
  "Towards a re-evaluation of data forging attacks in practice", USENIX Security 2025.
- ``kong``: Kong, Chowdhury, Chaudhuri, "Can membership inferencing be refuted?",
  2023.
- ``zhang-sr`` and ``zhang-sn``: Zhang, Lu, Zhang, Ye, Tsang, "Verification of
  machine unlearning is fragile", ICML 2024 (Adv-Sr and Adv-Sn).
- ``baluta``: Baluta, Nikolic, Jain, Aggarwal, Saxena, "Unforgeability in stochastic
  gradient descent", CCS 2023.
- ``nearest`` and ``greedy``: stronger than the published attacks; they search the
  whole pool instead of M random candidates, streaming per-sample gradients in chunks
  of bounded size so that a 60,000-example pool fits in memory.

For SGD the forging error of a forged batch B' is the distance it leaves after one
step, ``eps = eta * ||g(B) - g(B')||``. For SGD with momentum or weight decay and the
same optimizer state this is still the one-step weight error: the momentum buffer and
the decay term are the same for both batches and cancel. The re-evaluation's
reference code reports ``sqrt(eta) * ||g(B) - g(B')||`` instead; both are kept, under
different names. For Adam the forging error is the one-step weight distance from
the same optimizer state (see :func:`forgelab.optim.measure_step_error`). The
attacks' own selection criteria (weight distance after one step,
squared gradient distance, per-layer norms, input similarity) are recorded next to it.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator
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
from forgelab.models import as_model_input, compute_loss
from forgelab.optim import measure_step_error
from forgelab.trace import Trace

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 10**7
"""Most candidate subsets an attack draws (their indices alone take 80 MB per slot)."""

MAX_CANDIDATE_INDICES = 2 * 10**7
"""Most example indices an attack draws at once (M candidates times the examples in
each): 160 MB of int64. Whole-batch attacks with b = 100 may take M up to 200,000."""

DISTANCE_CHUNK = 64
"""Candidate rows whose summed gradients are held at once when ranking candidates.

64 LeNet rows take 16 MB, a buffer that malloc recycles between calls; much larger
ones are mapped afresh every time, and their page faults cost more than the sums."""

POOL_CHUNK_BYTES = 64 * 2**20
"""Memory budget of the stronger attacks' pool scans: the per-sample gradients held
at once; ``greedy`` and ``swap`` cache a pool whose gradients fit in it."""

INPUT_CHUNK = 4096
"""Pool examples whose raw inputs are compared at once by ``zhang-sn``."""


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

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the model's weights."""
        return next(self.model.parameters()).dtype

    def per_sample(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample gradients and losses of the examples at ``indices``."""
        dtype = next(self.model.parameters()).dtype
        losses = torch.empty(len(indices), dtype=dtype)
        grads = per_sample_gradients(
            self.model,
            self.loss,
            as_model_input(self.inputs[indices], dtype),
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
        return batch_gradient(
            self.model,
            self.loss,
            as_model_input(self.inputs[indices], self.dtype),
            self.labels[indices],
        )

    def weights(self) -> torch.Tensor:
        """The current weights as one vector, in ``named_parameters`` order."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def num_parameters(self) -> int:
        """Number of scalar weights."""
        return sum(p.numel() for p in self.model.parameters())

    def rows_per_chunk(self, max_bytes: int) -> int:
        """Pool examples whose per-sample gradients fit in ``max_bytes``.

        A chunk holds each gradient about four times in the model's dtype: twice
        while the engine assembles it, then once more as a difference to a target.
        """
        itemsize = torch.finfo(self.dtype).bits // 8
        return max(1, max_bytes // (4 * self.num_parameters() * itemsize))

    def iter_gradients(
        self, indices: np.ndarray, *, max_bytes: int = POOL_CHUNK_BYTES
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield per-sample gradients of ``indices`` chunk by chunk.

        Only one chunk of inputs and gradients is alive at a time, so the memory used
        is bounded by ``max_bytes`` whatever the number of examples.

        Yields:
            ``(start, gradients)``: position of the chunk's first example in
            ``indices`` and its gradients, shape ``(chunk, num_parameters)``.
        """
        rows = self.rows_per_chunk(max_bytes)
        for start in range(0, len(indices), rows):
            grads, _ = self.per_sample(indices[start : start + rows])
            yield start, grads

    def layer_slices(self) -> list[slice]:
        """Positions of each layer's weights in the flattened gradient.

        A layer is a module that owns parameters directly (a linear or convolution
        layer's weight and bias form one layer).
        """
        slices: list[slice] = []
        owner, begin, position = None, 0, 0
        for name, param in self.model.named_parameters():
            module = name.rpartition(".")[0]
            if module != owner and position > begin:
                slices.append(slice(begin, position))
                begin = position
            owner = module
            position += param.numel()
        slices.append(slice(begin, position))
        return slices


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
        criterion: What the attack minimised to choose the replacement.
        score: The value of that criterion for the chosen replacement.
    """

    batch: np.ndarray
    slots: np.ndarray
    replacement: np.ndarray
    distance: float
    lr: float
    replaced_loss: float = math.nan
    replaced_grad_norm: float = math.nan
    num_candidates: int = 0
    criterion: str = "gradient L2"
    score: float = math.nan

    @property
    def forging_error(self) -> float:
        """One-step weight error for SGD: ``eta * ||g(B) - g(B')||``."""
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


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def check_candidates(num_candidates: int, size: int) -> None:
    """Bound M and the candidate indices drawn at once (M x examples per candidate)."""
    if not 1 <= num_candidates <= MAX_CANDIDATES:
        raise ConfigError(
            f"number of candidates must be in [1, {MAX_CANDIDATES}], "
            f"got {num_candidates}"
        )
    if num_candidates * size > MAX_CANDIDATE_INDICES:
        raise ConfigError(
            f"{num_candidates} candidates of {size} examples each exceed "
            f"{MAX_CANDIDATE_INDICES:,} drawn indices; lower -M"
        )


def draw_subsets(
    pool: np.ndarray, num_candidates: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``num_candidates`` subsets of ``size`` examples, with replacement."""
    check_candidates(num_candidates, size)
    return pool[rng.integers(len(pool), size=(num_candidates, size))]


def draw_sets(
    pool: np.ndarray, num_candidates: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw ``num_candidates`` sets of ``size`` distinct examples each."""
    check_candidates(num_candidates, size)
    if size > len(pool):
        raise ConfigError(f"cannot draw {size} distinct examples from {len(pool)}")
    return np.stack(
        [rng.choice(pool, size=size, replace=False) for _ in range(num_candidates)]
    )


def fixed_batches(pool: np.ndarray, size: int) -> np.ndarray:
    """Cut the pool, in its order, into consecutive batches of ``size`` examples.

    The incomplete last batch is dropped, as a data loader with ``drop_last`` does.
    """
    count = len(pool) // size
    if count == 0:
        raise ConfigError(
            f"the pool holds {len(pool)} examples, fewer than one batch of {size}"
        )
    return pool[: count * size].reshape(count, size)


def shuffled_batches(
    pool: np.ndarray, num_batches: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """The first ``num_batches`` batches of a loader that reshuffles the pool.

    Each pass over the pool is a fresh permutation cut into batches (the incomplete
    last batch dropped); passes follow each other until enough batches are drawn.
    """
    check_candidates(num_batches, size)
    per_pass = len(pool) // size
    if per_pass == 0:
        raise ConfigError(
            f"the pool holds {len(pool)} examples, fewer than one batch of {size}"
        )
    passes = []
    while len(passes) * per_pass < num_batches:
        passes.append(fixed_batches(rng.permutation(pool), size))
    return np.concatenate(passes)[:num_batches]


def _replaced_statistics(
    replaced_grads: torch.Tensor, replaced_losses: torch.Tensor
) -> dict[str, float]:
    return {
        "replaced_loss": float(replaced_losses.mean()),
        "replaced_grad_norm": float(
            torch.linalg.vector_norm(replaced_grads, dim=1).mean()
        ),
    }


def _slot_forgery(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    replacement: np.ndarray,
    replaced_grads: torch.Tensor,
    replaced_losses: torch.Tensor,
    **fields: object,
) -> Forgery:
    """A forgery that replaces some slots; its distance from per-sample gradients."""
    chosen_grads, _ = context.per_sample(replacement)
    difference = chosen_grads.to(torch.float64).sum(0) - replaced_grads.to(
        torch.float64
    ).sum(0)
    forged = batch.copy()
    forged[slots] = replacement
    return Forgery(
        batch=forged,
        slots=slots,
        replacement=replacement,
        distance=float(torch.linalg.vector_norm(difference)) / len(batch),
        lr=context.lr,
        **_replaced_statistics(replaced_grads, replaced_losses),
        **fields,  # type: ignore[arg-type]
    )


WHOLE_BATCH_CRITERIA = ("weight L2", "weight Linf", "squared gradient L2")


def _rank_batches(
    context: AttackContext,
    batch: np.ndarray,
    candidates: np.ndarray,
    criterion: str,
) -> Forgery:
    """Choose the candidate batch that best imitates ``batch`` and build the forgery.

    Criteria: ``"weight L2"`` / ``"weight Linf"`` compare the weights after one SGD
    step, ``W - eta g(B')`` against ``W - eta g(B)``, both computed in the model's
    dtype; ``"squared gradient L2"`` is ``||g(B) - g(B')||^2`` at the current weights.
    Identical candidate batches are evaluated once; ties go to the earliest draw.
    """
    if criterion not in WHOLE_BATCH_CRITERIA:
        raise ConfigError(f"unknown batch criterion {criterion!r}")
    weights = context.weights()
    true_gradient = context.batch_gradient(batch)
    true_step = weights.add(true_gradient, alpha=-context.lr).to(torch.float64)
    true_gradient = true_gradient.to(torch.float64)
    unique, inverse = np.unique(candidates, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    scores = np.empty(len(unique))
    distances = np.empty(len(unique))
    for row, candidate in enumerate(unique):
        gradient = context.batch_gradient(candidate)
        difference = gradient.to(torch.float64) - true_gradient
        distances[row] = float(torch.linalg.vector_norm(difference))
        if criterion == "squared gradient L2":
            scores[row] = float(difference @ difference)
            continue
        step = weights.add(gradient, alpha=-context.lr).to(torch.float64) - true_step
        scores[row] = float(
            torch.linalg.vector_norm(
                step, ord=2 if criterion == "weight L2" else math.inf
            )
        )
    best = int(np.argmin(scores[inverse]))
    with torch.no_grad():
        logits = context.model(as_model_input(context.inputs[batch], context.dtype))
    replaced_loss = float(compute_loss(context.loss, logits, context.labels[batch]))
    return Forgery(
        batch=candidates[best].copy(),
        slots=np.arange(len(batch)),
        replacement=candidates[best].copy(),
        distance=float(distances[inverse[best]]),
        lr=context.lr,
        replaced_loss=replaced_loss,
        num_candidates=len(candidates),
        criterion=criterion,
        score=float(scores[inverse[best]]),
    )


def thudi_batch(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 400,
) -> Forgery:
    """Replace the whole batch by the best of M batches of a fixed partition of D'.

    Thudi et al., "On the necessity of auditable algorithmic definitions for machine
    unlearning" (USENIX Security 2022), Sec. 5: the forger draws M = 400 batches,
    with replacement, from the fixed mini-batches of the data it claims, and keeps
    the one whose SGD step lands closest (L2) to the logged weights.

    Here the fixed batches are the pool cut, in its given order, into consecutive
    batches of the true batch's size. The whole batch is replaced whatever ``slots``
    says, as in the paper.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Ignored (the whole batch is replaced); checked for validity.
        pool: Indices of allowed examples (D' minus the true batch).
        rng: Seeded generator.
        num_candidates: M.

    Returns:
        The best forgery among the candidates.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    check_candidates(num_candidates, len(batch))
    partition = fixed_batches(pool, len(batch))
    draws = partition[rng.integers(len(partition), size=num_candidates)]
    return _rank_batches(context, batch, draws, "weight L2")


def thudi(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 400,
) -> Forgery:
    """Replace each example by the closest-gradient one of M random candidates.

    The per-example variant of Thudi et al. (USENIX Security 2022): every replaced
    example gets its own M candidates, drawn with replacement from D', and is
    swapped for the candidate whose per-sample gradient is nearest in L2. The same
    M as the batch variant (400) is used; slots are handled one after another, so
    two slots may receive the same example, as in the paper.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions to replace.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Seeded generator; one row of M draws per slot.
        num_candidates: M per replaced example.

    Returns:
        The forgery.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    draws = draw_subsets(pool, num_candidates, len(slots), rng).T
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    replacement = np.empty(len(slots), dtype=np.int64)
    score = 0.0
    for position, candidates in enumerate(draws):
        # streamed: the M candidates' gradients are never held at once
        distances = context.distances(candidates, replaced_grads[position])
        best = int(torch.argmin(distances))
        replacement[position] = candidates[best]
        score += float(distances[best])
    return _slot_forgery(
        context,
        batch,
        slots,
        replacement,
        replaced_grads,
        replaced_losses,
        num_candidates=num_candidates,
        criterion="per-example gradient L2 (sum over slots, / b)",
        score=score / len(batch),
    )


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
        distances = _subset_distances(context, draws, replaced_grads)
    best = int(torch.argmin(distances))
    forged = batch.copy()
    forged[slots] = draws[best]
    distance = float(distances[best]) / len(batch)
    return Forgery(
        batch=forged,
        slots=slots,
        replacement=draws[best],
        distance=distance,
        lr=context.lr,
        **_replaced_statistics(replaced_grads, replaced_losses),
        num_candidates=num_candidates,
        score=distance,
    )


def _subset_distances(
    context: AttackContext,
    draws: np.ndarray,
    replaced_grads: torch.Tensor,
    slices: list[slice] | None = None,
) -> torch.Tensor:
    """``||sum_C g_c - sum_R g_r||`` for every candidate subset C (a row of draws).

    With ``slices`` the distance is the sum of the L2 norms of each slice instead.
    """
    unique, inverse = np.unique(draws, return_inverse=True)
    candidate_grads, _ = context.per_sample(unique)
    return subset_distances(
        candidate_grads,
        torch.from_numpy(inverse.reshape(draws.shape)),
        replaced_grads.sum(0),
        block_size=DISTANCE_CHUNK,
        slices=slices,
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


def _by_name(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flattened gradient into tensors by parameter name."""
    pieces, start = {}, 0
    for name, param in model.named_parameters():
        pieces[name] = flat[start : start + param.numel()].reshape(param.shape)
        start += param.numel()
    return pieces


KONG_DISTANCES = {"paper": "squared gradient L2", "model": "weight L2"}


def kong(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 200,
    pool_size: int = 1000,
    distance: str = "paper",
) -> Forgery:
    """Replace the whole batch by the best of M mini-batches from a fresh sub-pool.

    Kong, Chowdhury, Chaudhuri, "Can membership inferencing be refuted?" (2023):
    for each step the forger draws a fresh pool of n examples (800 to 1,600 in the
    paper; 1,000 here) from the data minus the deleted point, then M = 200 random
    mini-batches from that pool, and keeps the closest one. Distance ``"paper"`` is
    the squared gradient distance at the original weights; ``"model"`` is the L2
    distance of the weights after one step.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Ignored (the whole batch is replaced); checked for validity.
        pool: Indices of allowed examples (D' minus the true batch).
        rng: Seeded generator.
        num_candidates: M.
        pool_size: n; the whole pool is used when it is smaller.
        distance: ``"paper"`` or ``"model"``.

    Returns:
        The best forgery among the candidates.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    check_candidates(num_candidates, len(batch))
    if not len(batch) <= pool_size <= MAX_CANDIDATES:
        raise ConfigError(
            f"pool size must be in [{len(batch)}, {MAX_CANDIDATES}] (at least one "
            f"batch), got {pool_size}"
        )
    if distance not in KONG_DISTANCES:
        raise ConfigError(
            f"unknown kong distance {distance!r}; choose one of "
            f"{', '.join(KONG_DISTANCES)}"
        )
    if len(pool) < len(batch):
        raise ConfigError(
            f"the pool holds {len(pool)} examples, fewer than one batch of {len(batch)}"
        )
    size = min(pool_size, len(pool))
    if size < pool_size:
        logger.debug("kong: pool of %d examples, smaller than n = %d", size, pool_size)
    fresh = rng.choice(pool, size=size, replace=False)
    draws = np.stack(
        [
            rng.choice(fresh, size=len(batch), replace=False)
            for _ in range(num_candidates)
        ]
    )
    return _rank_batches(context, batch, draws, KONG_DISTANCES[distance])


def zhang_sr(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 50,
) -> Forgery:
    """Replace the unlearned slots by the best of M random sets (Adv-Sr).

    Zhang et al., "Verification of machine unlearning is fragile" (ICML 2024): only
    the slots holding unlearned examples change; they are replaced by the best of
    M = 50 random sets of the same size from the retained data, where "best" is the
    smallest sum over layers of the L2 norm of that layer's gradient difference.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions of the unlearned examples.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Seeded generator.
        num_candidates: M.

    Returns:
        The best forgery among the candidates.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    draws = draw_sets(pool, num_candidates, len(slots), rng)
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    scores = _subset_distances(context, draws, replaced_grads, context.layer_slices())
    best = int(torch.argmin(scores))
    return _slot_forgery(
        context,
        batch,
        slots,
        draws[best],
        replaced_grads,
        replaced_losses,
        num_candidates=num_candidates,
        criterion="sum of per-layer gradient L2",
        score=float(scores[best]) / len(batch),
    )


def zhang_sn(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator | None = None,
) -> Forgery:
    """Replace each unlearned example by its nearest same-class neighbour (Adv-Sn).

    Zhang et al., "Verification of machine unlearning is fragile" (ICML 2024): each
    unlearned example becomes the retained example of the same class whose input is
    most similar by cosine similarity. The pool is D', so removed examples are never
    chosen. Inputs are compared as the model sees them; for the image datasets this
    is the raw pixels divided by a constant, which leaves cosine similarity unchanged.
    Two slots may receive the same neighbour, as in the paper. Ties go to the
    neighbour listed first in the pool.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions of the unlearned examples.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Unused; the attack is deterministic.

    Returns:
        The forgery.

    Raises:
        ConfigError: If the pool holds no example of a replaced example's class.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    pool_labels = context.labels[pool].numpy()
    replacement = np.empty(len(slots), dtype=np.int64)
    similarity_sum = 0.0
    for position, index in enumerate(batch[slots]):
        label = int(context.labels[index])
        same = pool[pool_labels == label]
        if len(same) == 0:
            raise ConfigError(f"the pool holds no example of class {label}")
        query = context.inputs[index].reshape(-1).to(torch.float64)
        query = query / torch.linalg.vector_norm(query).clamp_min(1e-300)
        best_value, best_index = -math.inf, int(same[0])
        for start in range(0, len(same), INPUT_CHUNK):
            chunk = same[start : start + INPUT_CHUNK]
            rows = context.inputs[chunk].reshape(len(chunk), -1).to(torch.float64)
            norms = torch.linalg.vector_norm(rows, dim=1).clamp_min(1e-300)
            similarity = (rows @ query) / norms
            top = int(torch.argmax(similarity))
            if float(similarity[top]) > best_value:
                best_value, best_index = float(similarity[top]), int(chunk[top])
        replacement[position] = best_index
        similarity_sum += best_value
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    return _slot_forgery(
        context,
        batch,
        slots,
        replacement,
        replaced_grads,
        replaced_losses,
        num_candidates=int(
            np.isin(pool_labels, context.labels[batch[slots]].numpy()).sum()
        ),
        criterion="input cosine similarity (mean over slots; higher is closer)",
        score=similarity_sum / len(slots),
    )


BALUTA_NORMS = {"l2": "weight L2", "linf": "weight Linf"}


def baluta(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    num_candidates: int = 100,
    norm: str = "l2",
) -> Forgery:
    """Replace the whole batch by the best of M batches from a second shuffled loader.

    Baluta et al., "Unforgeability in stochastic gradient descent" (CCS 2023): the
    forger runs a second, independently shuffled data loader over the claimed data
    and tries its first M batches, keeping the one whose SGD step ends closest to the
    logged weights in L2 or Linf. The paper does not fix one M for this search;
    forgelab uses M = 100.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Ignored (the whole batch is replaced); checked for validity.
        pool: Indices of allowed examples (D' minus the true batch).
        rng: Seeded generator (the second loader's shuffling).
        num_candidates: M.
        norm: ``"l2"`` or ``"linf"``.

    Returns:
        The best forgery among the candidates.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    if norm not in BALUTA_NORMS:
        raise ConfigError(
            f"unknown baluta norm {norm!r}; choose one of {', '.join(BALUTA_NORMS)}"
        )
    draws = shuffled_batches(pool, num_candidates, len(batch), rng)
    return _rank_batches(context, batch, draws, BALUTA_NORMS[norm])


def _scan_pool(
    context: AttackContext,
    pool: np.ndarray,
    targets: torch.Tensor,
    keep: int,
    *,
    max_bytes: int,
    cached: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` pool positions nearest to each target gradient, in one pass.

    Per-sample gradients are streamed chunk by chunk (or read from ``cached``) and
    only a running top-``keep`` per target is kept, so memory stays bounded by one
    chunk. Distances are computed in the gradients' dtype (the chosen forgery's error
    is recomputed in float64 afterwards). Ties go to the earlier pool position.

    Args:
        context: Model and data.
        pool: Indices of the candidates.
        targets: Float64 target gradients, shape ``(num_targets, num_parameters)``.
        keep: How many nearest candidates to keep per target.
        max_bytes: Memory budget of one chunk.
        cached: The pool's per-sample gradients, if they were materialised.

    Returns:
        ``(distances, positions)``, each of shape ``(num_targets, keep)``, sorted
        nearest first; positions index into ``pool``.
    """
    num_targets = targets.shape[0]
    best_values = torch.empty(num_targets, 0, dtype=torch.float64)
    best_positions = torch.empty(num_targets, 0, dtype=torch.int64)
    if cached is not None:
        rows = context.rows_per_chunk(max_bytes)
        chunks: Iterator[tuple[int, torch.Tensor]] = (
            (start, cached[start : start + rows]) for start in range(0, len(pool), rows)
        )
    else:
        chunks = context.iter_gradients(pool, max_bytes=max_bytes)
    for start, grads in chunks:
        values = torch.stack(
            [
                torch.linalg.vector_norm(grads - target.to(grads.dtype), dim=1)
                for target in targets
            ]
        ).to(torch.float64)
        positions = torch.arange(start, start + len(grads)).expand(num_targets, -1)
        values = torch.cat([best_values, values], dim=1)
        positions = torch.cat([best_positions, positions], dim=1)
        order = torch.sort(values, dim=1, stable=True).indices[:, :keep]
        best_values = torch.gather(values, 1, order)
        best_positions = torch.gather(positions, 1, order)
    return best_values, best_positions


def _distinct_nearest(
    values: torch.Tensor, positions: torch.Tensor
) -> tuple[list[int], float]:
    """Per target, its nearest position not taken by an earlier target.

    Args:
        values: Distances from :func:`_scan_pool`, one row per target.
        positions: The matching pool positions.

    Returns:
        The positions, one per target, and the sum of their distances.
    """
    taken: list[int] = []
    score = 0.0
    for row_values, row_positions in zip(values, positions, strict=True):
        for value, position in zip(row_values, row_positions, strict=True):
            if int(position) not in taken:
                taken.append(int(position))
                score += float(value)
                break
    return taken, score


def nearest(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator | None = None,
    *,
    max_bytes: int = POOL_CHUNK_BYTES,
) -> Forgery:
    """Replace each example by the nearest-gradient example of the whole pool.

    Stronger than the published attacks: where Thudi et al. (2022) and the
    re-evaluation (Suliman et al. 2025) take the best of M random candidates, this
    takes M = |D'|, so for a single replacement no choice of one example from the
    pool leaves a smaller forging error. Per-sample gradients of the pool are
    streamed in chunks of at most ``max_bytes`` and only the running best is kept.
    With several slots, each slot takes its nearest example not already taken by an
    earlier slot (see :func:`greedy` for the joint residual).

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions to replace.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Unused; the attack is deterministic.
        max_bytes: Memory budget of one chunk of per-sample gradients.

    Returns:
        The forgery.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    _check_pool_size(slots, pool)
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    values, positions = _scan_pool(
        context,
        pool,
        replaced_grads.to(torch.float64),
        len(slots),
        max_bytes=max_bytes,
    )
    taken, score = _distinct_nearest(values, positions)
    return _slot_forgery(
        context,
        batch,
        slots,
        pool[taken],
        replaced_grads,
        replaced_losses,
        num_candidates=len(pool),
        criterion="per-example gradient L2 over the whole pool (sum over slots, / b)",
        score=score / len(batch),
    )


def _pool_rows(
    context: AttackContext,
    pool: np.ndarray,
    positions: list[int],
    cached: torch.Tensor | None,
) -> torch.Tensor:
    """Float64 per-sample gradients of the pool examples at ``positions``."""
    if cached is not None:
        return cached[positions].to(torch.float64)
    return context.per_sample(pool[positions])[0].to(torch.float64)


def _cache_pool(
    context: AttackContext, pool: np.ndarray, num_slots: int, max_bytes: int
) -> torch.Tensor | None:
    """The pool's per-sample gradients, when several scans read them and they fit."""
    itemsize = torch.finfo(context.dtype).bits // 8
    if num_slots > 1 and len(pool) * context.num_parameters() * itemsize <= max_bytes:
        return context.per_sample(pool)[0]
    return None


def _check_pool_size(slots: np.ndarray, pool: np.ndarray) -> None:
    if len(pool) < len(slots):
        raise ConfigError(
            f"the pool holds {len(pool)} examples, fewer than the {len(slots)} slots"
        )


def _greedy_fill(
    context: AttackContext,
    pool: np.ndarray,
    residual: torch.Tensor,
    count: int,
    *,
    max_bytes: int,
    cached: torch.Tensor | None,
) -> tuple[list[int], torch.Tensor]:
    """Take ``count`` pool positions one at a time, each nearest to the residual left.

    Returns:
        The positions taken, in order, and the float64 residual they leave.
    """
    taken: list[int] = []
    for _ in range(count):
        _, positions = _scan_pool(
            context,
            pool,
            residual.unsqueeze(0),
            len(taken) + 1,
            max_bytes=max_bytes,
            cached=cached,
        )
        choice = next(int(p) for p in positions[0] if int(p) not in taken)
        taken.append(choice)
        residual = residual - _pool_rows(context, pool, [choice], cached)[0]
    return taken, residual


def greedy(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator | None = None,
    *,
    max_bytes: int = POOL_CHUNK_BYTES,
) -> Forgery:
    """Fill the slots one at a time, each minimising the remaining gradient residual.

    Stronger than the published attacks for several replacements: the residual
    starts as the sum of the replaced examples' gradients, ``r = sum_R g_r``; each
    slot in turn takes the pool example c (not chosen before) that minimises
    ``||r - g_c||`` over the whole pool, and r becomes ``r - g_c``. The final forging
    error is ``eta ||r|| / b``. For one slot this is :func:`nearest`. The pool's
    per-sample gradients are streamed once per slot in chunks of at most
    ``max_bytes``, or computed once when they fit in ``max_bytes``.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions to replace, filled in this order.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Unused; the attack is deterministic.
        max_bytes: Memory budget of the per-sample gradients held at once.

    Returns:
        The forgery.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    _check_pool_size(slots, pool)
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    cached = _cache_pool(context, pool, len(slots), max_bytes)
    taken, residual = _greedy_fill(
        context,
        pool,
        replaced_grads.to(torch.float64).sum(0),
        len(slots),
        max_bytes=max_bytes,
        cached=cached,
    )
    return _slot_forgery(
        context,
        batch,
        slots,
        pool[taken],
        replaced_grads,
        replaced_losses,
        num_candidates=len(pool),
        criterion="remaining gradient residual L2, one slot at a time",
        score=float(torch.linalg.vector_norm(residual)) / len(batch),
    )


def _improve_by_swaps(
    context: AttackContext,
    pool: np.ndarray,
    taken: list[int],
    residual: torch.Tensor,
    *,
    max_passes: int,
    max_bytes: int,
    cached: torch.Tensor | None,
) -> tuple[list[int], torch.Tensor, int]:
    """Best-improvement local search over single swaps of one taken position.

    Emptying slot j leaves ``r + g_j``; one pool scan with these k targets gives,
    for every slot, its best replacement (not taken by another slot). The swap whose
    float64 residual is smallest among those that lower it is made; the search stops
    when no swap lowers the residual or after ``max_passes`` swaps.

    Returns:
        The positions, their residual, and the number of swaps made.
    """
    taken = list(taken)
    chosen = _pool_rows(context, pool, taken, cached)
    norm = float(torch.linalg.vector_norm(residual))
    swaps = 0
    while swaps < max_passes and norm > 0.0:
        values, positions = _scan_pool(
            context,
            pool,
            residual.unsqueeze(0) + chosen,
            len(taken),
            max_bytes=max_bytes,
            cached=cached,
        )
        proposals = []
        for slot, current in enumerate(taken):
            others = set(taken) - {current}
            for value, position in zip(values[slot], positions[slot], strict=True):
                if int(position) not in others:
                    if int(position) != current:
                        proposals.append((float(value), slot, int(position)))
                    break
        # the scan ranks in the gradients' dtype; a swap is made only if the exact
        # (float64) residual goes down, so the search cannot cycle
        for _, slot, position in sorted(proposals):
            row = _pool_rows(context, pool, [position], cached)[0]
            candidate = residual + chosen[slot] - row
            candidate_norm = float(torch.linalg.vector_norm(candidate))
            if candidate_norm < norm:
                taken[slot], chosen[slot] = position, row
                residual, norm = candidate, candidate_norm
                swaps += 1
                break
        else:
            break
    return taken, residual, swaps


def swap(
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator | None = None,
    *,
    max_passes: int = 20,
    max_bytes: int = POOL_CHUNK_BYTES,
) -> Forgery:
    """Start from the better of greedy and nearest, then swap single examples.

    Stronger than the published attacks, and than :func:`greedy` and
    :func:`nearest` for several replacements: the joint objective
    ``||sum_R g_r - sum_C g_c||`` (the forging error times b / eta) is minimised by
    local search. It starts from whichever of the two whole-pool attacks leaves the
    smaller residual, then repeatedly replaces one chosen example by the pool example
    that lowers the residual most (see :func:`_improve_by_swaps`), so its forging
    error is never above either. It stops at a local optimum, where no single swap
    helps, or after ``max_passes`` swaps; it is not an exhaustive search. For one
    slot it is :func:`nearest`. Each pass streams the pool once, in chunks of at most
    ``max_bytes``, or reads it from memory when its gradients fit in ``max_bytes``.

    Args:
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions to replace.
        pool: Indices of allowed replacements (D' minus the batch).
        rng: Unused; the attack is deterministic.
        max_passes: Most swaps made after the start.
        max_bytes: Memory budget of the per-sample gradients held at once.

    Returns:
        The forgery.
    """
    slots = np.asarray(slots)
    _check_slots(batch, slots, pool)
    _check_pool_size(slots, pool)
    if max_passes < 0:
        raise ConfigError(f"max_passes must be >= 0, got {max_passes}")
    replaced_grads, replaced_losses = context.per_sample(batch[slots])
    target = replaced_grads.to(torch.float64).sum(0)
    cached = _cache_pool(context, pool, len(slots), max_bytes)
    taken, residual = _greedy_fill(
        context, pool, target, len(slots), max_bytes=max_bytes, cached=cached
    )
    swaps = 0
    if len(slots) > 1:
        values, positions = _scan_pool(
            context,
            pool,
            replaced_grads.to(torch.float64),
            len(slots),
            max_bytes=max_bytes,
            cached=cached,
        )
        apart = _distinct_nearest(values, positions)[0]
        apart_residual = target - _pool_rows(context, pool, apart, cached).sum(0)
        if torch.linalg.vector_norm(apart_residual) < torch.linalg.vector_norm(
            residual
        ):
            taken, residual = apart, apart_residual
        taken, residual, swaps = _improve_by_swaps(
            context,
            pool,
            taken,
            residual,
            max_passes=max_passes,
            max_bytes=max_bytes,
            cached=cached,
        )
    return _slot_forgery(
        context,
        batch,
        slots,
        pool[taken],
        replaced_grads,
        replaced_losses,
        num_candidates=len(pool),
        criterion=(
            f"joint gradient residual L2: best of greedy and nearest, then {swaps} "
            "single swaps"
        ),
        score=float(torch.linalg.vector_norm(residual)) / len(batch),
    )


AttackFunction = Callable[..., Forgery]
ATTACKS: dict[str, AttackFunction] = {
    "thudi-batch": thudi_batch,
    "thudi": thudi,
    "reeval": reeval,
    "kong": kong,
    "zhang-sr": zhang_sr,
    "zhang-sn": zhang_sn,
    "baluta": baluta,
    "nearest": nearest,
    "greedy": greedy,
    "swap": swap,
}
"""Every attack by name, published ones first, then the stronger ones."""

WHOLE_BATCH_ATTACKS = frozenset({"thudi-batch", "kong", "baluta"})
"""Attacks that replace the whole batch whatever slots they are given."""

STRONGER_ATTACKS = frozenset({"nearest", "greedy", "swap"})
"""Attacks that search the whole pool (not published)."""


def check_attack(name: str) -> AttackFunction:
    """The attack function called ``name``.

    Raises:
        ConfigError: If no attack has that name.
    """
    if name not in ATTACKS:
        raise ConfigError(
            f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}"
        )
    return ATTACKS[name]


def attack_defaults(name: str) -> dict[str, object]:
    """The keyword options of an attack and their defaults (the published values)."""
    signature = inspect.signature(check_attack(name))
    return {
        key: parameter.default
        for key, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


OPTION_FLAGS = {
    "num_candidates": "-M",
    "pool_size": "--pool-size",
    "distance": "--distance",
    "norm": "--norm",
}
"""How the command line spells each attack option."""


def attack_options(name: str, **options: object) -> dict[str, object]:
    """The options an attack will run with: its defaults, overridden where given.

    Options given as None keep their default.

    Raises:
        ConfigError: If an option does not apply to the attack.
    """
    resolved = attack_defaults(name)
    for key, value in options.items():
        if value is None:
            continue
        if key not in resolved:
            accepted = ", ".join(OPTION_FLAGS.get(k, k) for k in resolved) or "none"
            raise ConfigError(
                f"attack {name!r} does not take {OPTION_FLAGS.get(key, key)} "
                f"(its options: {accepted})"
            )
        if key in ("num_candidates", "pool_size") and not (
            isinstance(value, int) and 1 <= value <= MAX_CANDIDATES
        ):
            raise ConfigError(
                f"{OPTION_FLAGS.get(key, key)} must be in [1, {MAX_CANDIDATES}], "
                f"got {value}"
            )
        resolved[key] = value
    return resolved


def forge_batch(
    name: str,
    context: AttackContext,
    batch: np.ndarray,
    slots: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    **options: object,
) -> Forgery:
    """Run the attack called ``name`` with its published defaults and ``options``.

    Args:
        name: Attack name in :data:`ATTACKS`.
        context: Model and data at the attacked step.
        batch: The true batch.
        slots: Positions to replace (whole-batch attacks replace every position).
        pool: Indices of allowed replacements.
        rng: Seeded generator.
        **options: Overrides of the attack's defaults; None keeps a default.

    Returns:
        The forgery.
    """
    resolved = attack_options(name, **options)
    return ATTACKS[name](context, batch, np.asarray(slots), pool, rng, **resolved)


@dataclass
class CheckpointForgery:
    """One forging attempt at one checkpoint (one row of the forging experiment).

    Attributes:
        step: Step count of the attacked checkpoint.
        run: Run number.
        attack: Attack name.
        forging_error: ``eta * ||g(B) - g(B')||``; for a stateful optimizer the
            distance between the one-step updates from the checkpoint's state.
        paper_error: ``sqrt(eta) * ||g(B) - g(B')||`` (the reference code's figure).
        distance: ``||g(B) - g(B')||``.
        update_norm: The size of the true step (``eta * ||g(B)||`` for plain SGD).
        replaced_loss: Mean loss of the replaced examples.
        replaced_grad_norm: Mean per-sample gradient norm of the replaced examples.
        replaced: Indices of the replaced examples.
        replacement: Indices that replaced them.
        num_candidates: How many candidates the attack ranked.
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
    num_candidates: int = 0

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def require_sgd(trace: Trace) -> None:
    """Refuse traces whose steps are not SGD steps.

    The forging error is the one-step weight error given the same optimizer state;
    for SGD (with or without momentum and weight decay) that is
    ``eta * ||g(B) - g(B')||``. Adam rescales the gradient by its moment estimates,
    so gradient distance no longer measures it.

    Raises:
        ConfigError: For a trace recorded with another optimizer.
    """
    if trace.optimizer.name != "sgd":
        raise ConfigError(
            f"{trace.root}: forging is defined here for SGD traces; this trace uses "
            f"{trace.optimizer.name!r}, whose step is not eta times the gradient"
        )


def attack_checkpoints(
    trace: Trace,
    dataset: Dataset,
    *,
    attack: str = "reeval",
    every: int = 100,
    num_runs: int = 10,
    num_replaced: int = 1,
    num_candidates: int | None = None,
    options: dict[str, object] | None = None,
    steps: list[int] | None = None,
    seed: int = 2024,
    callback: Callable[[int, int], None] | None = None,
) -> list[CheckpointForgery]:
    """The re-evaluation's forging experiment across the checkpoints of a trace.

    At every checkpoint whose step is a multiple of ``every`` (and that has a step
    after it), each run draws a random true batch B of the trace's batch size and
    replaces its first ``num_replaced`` examples using the attack, with the pool being
    the training data minus B (Suliman et al. 2025, Sec. 5 and Fig. 3). Whole-batch
    attacks replace all of B.

    Args:
        trace: A trace; its checkpoints provide the weights.
        dataset: The training data.
        attack: Attack name in :data:`ATTACKS`.
        every: Attack every this many steps.
        num_runs: Random batches per checkpoint.
        num_replaced: f, the number of replaced examples.
        num_candidates: M; None for the attack's published default.
        options: Other attack options (None values keep the defaults).
        steps: Attack the checkpoints at exactly these steps instead of every
            ``every``-th one.
        seed: Seed of the batches and candidates.
        callback: Called with ``(attempts_done, total_attempts)``.

    Returns:
        One record per checkpoint and run.
    """
    check_attack(attack)
    options = dict(options or {})
    if num_candidates is not None:
        options["num_candidates"] = num_candidates
    attack_options(attack, **options)
    if every < 1 or num_runs < 1:
        raise ConfigError("--every and --runs must be >= 1")
    if not 1 <= num_replaced <= trace.batch_size:
        raise ConfigError(f"-f must be between 1 and the batch size {trace.batch_size}")
    positions = [
        position
        for position, entry in enumerate(trace.checkpoints[:-1])
        if (entry.step in steps if steps is not None else entry.step % every == 0)
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
            forgery = forge_batch(attack, context, batch, slots, pool, rng, **options)
            true_gradient = context.batch_gradient(batch)
            step_size = context.lr * float(torch.linalg.vector_norm(true_gradient))
            forging_error = forgery.forging_error
            if not trace.optimizer.is_stateless:
                # one step from the checkpoint's optimizer state with g(B) and g(B')
                forging_error, step_size = measure_step_error(
                    trace.optimizer,
                    checkpoint.params,
                    checkpoint.optimizer_state,
                    _by_name(model, true_gradient),
                    _by_name(model, context.batch_gradient(forgery.batch)),
                )
            records.append(
                CheckpointForgery(
                    step=checkpoint.step,
                    run=run,
                    attack=attack,
                    forging_error=forging_error,
                    paper_error=forgery.paper_error,
                    distance=forgery.distance,
                    update_norm=step_size,
                    replaced_loss=forgery.replaced_loss,
                    replaced_grad_norm=forgery.replaced_grad_norm,
                    replaced=[int(i) for i in batch[forgery.slots]],
                    replacement=[int(i) for i in forgery.replacement],
                    num_candidates=forgery.num_candidates,
                )
            )
            if callback is not None:
                callback(len(records), total)
    return records
