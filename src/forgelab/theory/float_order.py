"""How many float32 batch gradients one batch has when its examples are reordered.

Floating-point addition is not associative, so the same batch in another order gives
a slightly different gradient. Baluta et al. ("Unforgeability in Stochastic Gradient
Descent", CCS 2023) count these distinct sums; the re-evaluation (Suliman et al.,
USENIX Security 2025) uses the same benign noise to argue that a verifier's
tolerance must be above it, and forging errors far above that.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from forgelab.errors import ConfigError
from forgelab.gradients import batch_gradient, flatten_parameters

logger = logging.getLogger(__name__)

MAX_EXHAUSTIVE_ORDERS = 720
"""Batches with at most this many orderings (b <= 6) are tried in every order."""


@dataclass
class ReorderSummary:
    """The distinct float32 gradients of one batch under reordering.

    Attributes:
        model: Model name.
        batch_size: b.
        num_orders: Orderings tried (the original included).
        exhaustive: Whether every ordering was tried.
        num_distinct: Distinct gradients (bit-for-bit) among them.
        max_distance: Largest forging-error distance ``lr * ||g_a - g_b||`` between
            two of them.
        median_distance: Median distance of a reordered gradient to the original
            order's.
        lr: Learning rate converting gradient distances into weight distances.
        num_distinct_updates: Distinct float32 weights ``W - lr * g`` after one SGD
            step from the same weights (what a verifier compares).
        max_update_distance: Largest L2 distance between two of those weights.
        distances: Distance of every tried ordering's gradient to the original's.
        update_distances: Distance of every tried ordering's weights after the step
            to the original order's.
    """

    model: str
    batch_size: int
    num_orders: int
    exhaustive: bool
    num_distinct: int
    max_distance: float
    median_distance: float
    lr: float
    num_distinct_updates: int
    max_update_distance: float
    distances: list[float] = field(default_factory=list, repr=False)
    update_distances: list[float] = field(default_factory=list, repr=False)


def reorder_gradients(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    num_orders: int = 50,
    seed: int = 0,
    name: str = "model",
) -> ReorderSummary:
    """Compute the batch gradient under many orderings of the batch and compare.

    Every ordering is tried when there are at most :data:`MAX_EXHAUSTIVE_ORDERS`;
    otherwise the original order and ``num_orders - 1`` random permutations, so
    ``num_distinct`` is then a lower bound.

    Args:
        model: The model at the weights of interest (its dtype is used).
        loss: Loss name.
        inputs: The batch.
        labels: Its labels.
        lr: Learning rate.
        num_orders: Orderings to sample for large batches.
        seed: Seed of the sampled permutations.
        name: Model name for the summary.

    Returns:
        Counts and spread of the distinct gradients.
    """
    batch_size = int(inputs.shape[0])
    if num_orders < 2:
        raise ConfigError(f"num_orders must be >= 2, got {num_orders}")
    exhaustive = math.factorial(batch_size) <= MAX_EXHAUSTIVE_ORDERS
    if exhaustive:
        orders = [list(p) for p in itertools.permutations(range(batch_size))]
    else:
        rng = np.random.default_rng(seed)
        orders = [list(range(batch_size))] + [
            rng.permutation(batch_size).tolist() for _ in range(num_orders - 1)
        ]
    dtype = next(model.parameters()).dtype
    weights = flatten_parameters(model)
    distinct: dict[bytes, torch.Tensor] = {}
    updates: dict[bytes, torch.Tensor] = {}
    distances, update_distances = [], []
    reference = reference_update = None
    for order in orders:
        gradient = batch_gradient(
            model, loss, inputs[order].to(dtype), labels[order]
        ).detach()
        if reference is None:
            reference = gradient.to(torch.float64)
        distances.append(
            lr * float(torch.linalg.vector_norm(gradient.to(torch.float64) - reference))
        )
        distinct.setdefault(gradient.numpy().tobytes(), gradient.to(torch.float64))
        updated = weights - lr * gradient
        if reference_update is None:
            reference_update = updated.to(torch.float64)
        update_distances.append(
            float(
                torch.linalg.vector_norm(updated.to(torch.float64) - reference_update)
            )
        )
        updates.setdefault(updated.numpy().tobytes(), updated.to(torch.float64))
    spread = lr * _largest_distance(list(distinct.values()))
    update_spread = _largest_distance(list(updates.values()))
    summary = ReorderSummary(
        model=name,
        batch_size=batch_size,
        num_orders=len(orders),
        exhaustive=exhaustive,
        num_distinct=len(distinct),
        max_distance=spread,
        median_distance=float(np.median(distances[1:])) if len(distances) > 1 else 0,
        lr=lr,
        num_distinct_updates=len(updates),
        max_update_distance=update_spread,
        distances=distances,
        update_distances=update_distances,
    )
    logger.info("reordering: %s", summary)
    return summary


def _largest_distance(vectors: list[torch.Tensor]) -> float:
    if len(vectors) < 2:
        return 0.0
    stacked = torch.stack(vectors)
    distances = torch.cdist(
        stacked, stacked, compute_mode="donot_use_mm_for_euclid_dist"
    )
    return float(distances.max())
