"""Slow references of the attacks: the published algorithms, one candidate at a time.

Each reference draws the same candidates from the generator as the fast attack, then
scores every candidate the expensive way: a full batch gradient, or a real
``torch.optim.SGD`` step on a copy of the model, or one backward pass per example.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch

from forgelab.attacks import AttackContext, draw_sets, draw_subsets, fixed_batches
from forgelab.gradients import per_sample_gradients_loop
from forgelab.models import compute_loss


def one_step_weights(context: AttackContext, indices: np.ndarray) -> torch.Tensor:
    """The weights after one real SGD step on ``indices``, as float64."""
    model = copy.deepcopy(context.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=context.lr)
    optimizer.zero_grad()
    dtype = next(model.parameters()).dtype
    compute_loss(
        context.loss,
        model(context.inputs[indices].to(dtype)),
        context.labels[indices],
    ).backward()
    optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def gradient(context: AttackContext, indices: np.ndarray) -> torch.Tensor:
    return context.batch_gradient(indices).double()


def layer_gradients(context: AttackContext, indices: np.ndarray) -> list[torch.Tensor]:
    """The batch gradient grouped by layer (module), built from named parameters."""
    model = context.model
    dtype = next(model.parameters()).dtype
    value = compute_loss(
        context.loss,
        model(context.inputs[indices].to(dtype)),
        context.labels[indices],
    )
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(value, list(model.parameters()))
    layers: dict[str, list[torch.Tensor]] = {}
    for name, grad in zip(names, grads, strict=True):
        layers.setdefault(name.rpartition(".")[0], []).append(grad.reshape(-1))
    return [torch.cat(parts).double() for parts in layers.values()]


def replaced(batch, slots, replacement):
    forged = batch.copy()
    forged[slots] = replacement
    return forged


def batch_choice(context, batch, draws, score):
    """The draw with the smallest score; ties go to the earliest draw."""
    scores = [score(candidate) for candidate in draws]
    best = int(np.argmin(scores))
    distance = float(
        torch.linalg.vector_norm(
            gradient(context, draws[best]) - gradient(context, batch)
        )
    )
    return draws[best], scores[best], distance


def thudi_batch_slow(context, batch, pool, rng, num_candidates):
    partition = fixed_batches(pool, len(batch))
    draws = partition[rng.integers(len(partition), size=num_candidates)]
    target = one_step_weights(context, batch)
    return batch_choice(
        context,
        batch,
        draws,
        lambda c: float(
            torch.linalg.vector_norm(one_step_weights(context, c) - target)
        ),
    )


def thudi_slow(context, batch, slots, pool, rng, num_candidates):
    draws = draw_subsets(pool, num_candidates, len(slots), rng).T
    chosen = []
    for slot, candidates in zip(slots, draws, strict=True):
        target = gradient(context, batch[[slot]])
        distances = [
            float(torch.linalg.vector_norm(gradient(context, [c]) - target))
            for c in candidates
        ]
        chosen.append(candidates[int(np.argmin(distances))])
    return np.array(chosen)


def kong_slow(context, batch, pool, rng, num_candidates, pool_size, distance):
    fresh = rng.choice(pool, size=min(pool_size, len(pool)), replace=False)
    draws = [
        rng.choice(fresh, size=len(batch), replace=False) for _ in range(num_candidates)
    ]
    if distance == "paper":
        target = gradient(context, batch)
        return batch_choice(
            context,
            batch,
            draws,
            lambda c: float(((gradient(context, c) - target) ** 2).sum()),
        )
    target = one_step_weights(context, batch)
    return batch_choice(
        context,
        batch,
        draws,
        lambda c: float(
            torch.linalg.vector_norm(one_step_weights(context, c) - target)
        ),
    )


def zhang_sr_slow(context, batch, slots, pool, rng, num_candidates):
    draws = draw_sets(pool, num_candidates, len(slots), rng)
    target = layer_gradients(context, batch)
    scores = []
    for subset in draws:
        layers = layer_gradients(context, replaced(batch, slots, subset))
        scores.append(
            sum(
                float(torch.linalg.vector_norm(a - b))
                for a, b in zip(layers, target, strict=True)
            )
        )
    best = int(np.argmin(scores))
    return draws[best], scores[best]


def zhang_sn_slow(dataset, batch, slots, pool):
    """Nearest same-class neighbour by cosine similarity of the raw integer inputs."""
    raw = dataset.raw_train.astype(np.float64)
    labels = dataset.y_train.numpy()
    chosen = []
    for index in batch[slots]:
        best, best_value = None, -np.inf
        for candidate in pool:
            if labels[candidate] != labels[index]:
                continue
            a, b = raw[index], raw[candidate]
            value = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            if value > best_value + 1e-12:
                best, best_value = candidate, value
        chosen.append(best)
    return np.array(chosen)


def baluta_slow(context, batch, pool, rng, num_candidates, norm):
    draws = []
    while len(draws) < num_candidates:
        order = rng.permutation(pool)
        for start in range(0, len(order) - len(batch) + 1, len(batch)):
            draws.append(order[start : start + len(batch)])
    draws = draws[:num_candidates]
    target = one_step_weights(context, batch)
    order = 2 if norm == "l2" else float("inf")
    return batch_choice(
        context,
        batch,
        draws,
        lambda c: float(
            torch.linalg.vector_norm(one_step_weights(context, c) - target, ord=order)
        ),
    )


def pool_gradients_loop(context, pool) -> torch.Tensor:
    dtype = next(context.model.parameters()).dtype
    return per_sample_gradients_loop(
        context.model,
        context.loss,
        context.inputs[pool].to(dtype),
        context.labels[pool],
    ).double()


def nearest_slow(context, batch, slots, pool):
    """Brute force: every pool example's gradient by its own backward pass."""
    grads = pool_gradients_loop(context, pool)
    chosen: list[int] = []
    for slot in slots:
        target = gradient(context, batch[[slot]])
        distances = torch.linalg.vector_norm(grads - target, dim=1)
        for position in torch.argsort(distances, stable=True).tolist():
            if position not in chosen:
                chosen.append(position)
                break
    return pool[chosen]


def greedy_slow(context, batch, slots, pool):
    """The greedy rule with full batch gradients of the partly filled batch.

    With ``k`` slots filled, a candidate c is scored by the distance between
    ``b g(B)`` and the summed gradient of the kept examples, the ``k`` chosen ones and
    c; the unfilled slots contribute nothing yet.
    """
    keep = np.delete(batch, slots)
    target = gradient(context, batch) * len(batch)
    chosen: list[int] = []
    for _ in slots:
        scores = []
        for candidate in pool:
            if candidate in chosen:
                scores.append(np.inf)
                continue
            members = np.concatenate([keep, chosen, [candidate]]).astype(np.int64)
            summed = gradient(context, members) * len(members)
            scores.append(float(torch.linalg.vector_norm(summed - target)))
        chosen.append(int(pool[int(np.argmin(scores))]))
    return np.array(chosen)


def exhaustive_best(context, batch, slots, pool) -> float:
    """The smallest gradient distance over every set of distinct replacements."""
    target = gradient(context, batch)
    best = np.inf
    for subset in itertools.combinations(pool, len(slots)):
        candidate = replaced(batch, slots, np.array(subset))
        distance = float(
            torch.linalg.vector_norm(gradient(context, candidate) - target)
        )
        best = min(best, distance)
    return best


def best_single_swap(context, batch, slots, pool, replacement) -> float:
    """The smallest gradient distance reachable by changing one replacement."""
    target = gradient(context, batch)
    best = np.inf
    for position in range(len(replacement)):
        for candidate in pool:
            if candidate in replacement:
                continue
            changed = np.array(replacement).copy()
            changed[position] = candidate
            distance = float(
                torch.linalg.vector_norm(
                    gradient(context, replaced(batch, slots, changed)) - target
                )
            )
            best = min(best, distance)
    return best
