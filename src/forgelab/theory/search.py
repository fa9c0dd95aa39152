"""Search inside the data domain for a distinct batch with the same gradient.

Two searches, for the question the re-evaluation (Suliman et al., USENIX Security
2025, arXiv 2411.05658) leaves open: real-valued forgeries exist, but is there one
whose pixels lie on the dataset's grid and whose labels are one-hot?

- :func:`exact_search` decides it for small instances of a linear model (images
  downsampled to a few pixels, batches of one or two examples) by enumerating every
  example of the domain; pairs are matched through a k-d tree over the per-sample
  gradients. Its answer comes with a certificate: the forgery, or the counts of the
  search space it exhausted.
- :func:`relaxed_search` handles full-size inputs: it matches the gradient by
  optimising inputs and labels in the continuous relaxation of the domain, then
  projects the result onto the domain (round, clip, one-hot) and reports the forging
  error before and after.

The forging error of a batch ``B'`` replacing ``B`` is ``lr * ||g(B) - g(B')||``, the
distance it leaves after one plain SGD step; the tolerance tau is in the same units.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from forgelab.data import Domain
from forgelab.errors import ConfigError
from forgelab.theory.linear import LinearModel, one_hot

logger = logging.getLogger(__name__)

MAX_SEARCH_EXAMPLES = 2_000_000
"""Largest domain (inputs times labels) :func:`exact_search` enumerates."""

QUERY_CHUNK = 65_536
"""Pair queries sent to the k-d tree at once (bounds memory)."""


def downsample(
    raw: np.ndarray,
    image_shape: tuple[int, int],
    out_shape: tuple[int, int],
    domain: Domain,
) -> np.ndarray:
    """Average images over blocks and round the result back onto the value grid.

    Args:
        raw: Raw images, flattened, shape ``(n, H * W)``.
        image_shape: ``(H, W)``.
        out_shape: ``(h, w)``; blocks are as even as ``np.array_split`` makes them.
        domain: The value grid the result is rounded onto.

    Returns:
        Raw downsampled images on the grid, shape ``(n, h * w)``.
    """
    height, width = image_shape
    rows, cols = out_shape
    if not (1 <= rows <= height and 1 <= cols <= width):
        raise ConfigError(f"cannot downsample {image_shape} images to {out_shape}")
    if domain.value_step is None:
        raise ConfigError("downsampling onto a grid needs a domain with a value grid")
    images = np.asarray(raw, dtype=np.float64).reshape(-1, height, width)
    blocks = [
        [
            block.mean(axis=(1, 2))
            for block in np.array_split(band, cols, axis=2)
            if block.size
        ]
        for band in np.array_split(images, rows, axis=1)
    ]
    means = np.stack([np.stack(band, axis=1) for band in blocks], axis=1)
    levels = np.round((means - domain.value_min) / domain.value_step)
    levels = np.clip(levels, 0, (domain.num_levels or 1) - 1)
    return (domain.value_min + levels * domain.value_step).reshape(len(images), -1)


@dataclass
class SearchSpace:
    """Every example of a small grid domain, with its per-sample gradient.

    Examples are numbered ``input_index * K + label``, with inputs in the order of
    ``itertools.product(range(L), repeat=p)`` over the grid levels.

    Attributes:
        domain: The grid, the number of classes and the input shape.
        scale: Divisor from raw values to model inputs.
        levels: Grid levels of every input, shape ``(L ** p, p)``.
        gradients: Per-sample gradients, shape ``(L ** p * K, D)``.
    """

    domain: Domain
    scale: float
    levels: np.ndarray
    gradients: np.ndarray

    @property
    def num_examples(self) -> int:
        """Number of examples (inputs times labels)."""
        return int(self.gradients.shape[0])

    def index_of(self, levels: np.ndarray, label: int) -> int:
        """Number of the example with these grid levels and this label."""
        dims = (self.domain.num_levels,) * self.levels.shape[1]
        position = np.ravel_multi_index(tuple(np.asarray(levels, int)), dims)
        return int(position) * self.domain.num_classes + int(label)

    def example(self, index: int) -> tuple[list[int], int]:
        """Grid levels and label of example ``index``."""
        position, label = divmod(int(index), self.domain.num_classes)
        return self.levels[position].tolist(), label

    def inputs(self, levels: np.ndarray) -> np.ndarray:
        """Model inputs of raw grid levels."""
        step = self.domain.value_step or 1.0
        return (self.domain.value_min + np.asarray(levels) * step) / self.scale


def build_search_space(model: LinearModel, domain: Domain, scale: float) -> SearchSpace:
    """Enumerate every (input, label) of a small grid domain and its gradient.

    Raises:
        ConfigError: If the domain has no grid, does not fit the model, or holds
            more than :data:`MAX_SEARCH_EXAMPLES` examples.
    """
    num_levels = domain.num_levels
    num_pixels = int(np.prod(domain.input_shape))
    if num_levels is None:
        raise ConfigError("exact search needs a domain with a value grid")
    if num_pixels != model.num_features or domain.num_classes != model.num_classes:
        raise ConfigError(
            f"domain has {num_pixels} pixels and {domain.num_classes} classes; the "
            f"model expects {model.num_features} and {model.num_classes}"
        )
    size = num_levels**num_pixels * domain.num_classes
    if size > MAX_SEARCH_EXAMPLES:
        raise ConfigError(
            f"domain holds {size} examples ({num_levels} levels ^ {num_pixels} pixels "
            f"x {domain.num_classes} classes); exact search enumerates at most "
            f"{MAX_SEARCH_EXAMPLES}"
        )
    grids = np.indices((num_levels,) * num_pixels).reshape(num_pixels, -1).T
    space = SearchSpace(domain, scale, grids, np.zeros(0))
    inputs = space.inputs(grids)
    probabilities = None
    logits = model.logits(inputs)
    if model.kind == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    num_classes = domain.num_classes
    width = num_classes * num_pixels + (num_classes if model.has_bias else 0)
    gradients = np.empty((len(grids), num_classes, width))
    for label in range(num_classes):
        residual = (probabilities if probabilities is not None else logits).copy()
        residual[:, label] -= 1.0
        outer = residual[:, :, None] * inputs[:, None, :]
        gradients[:, label, : num_classes * num_pixels] = outer.reshape(len(grids), -1)
        if model.has_bias:
            gradients[:, label, num_classes * num_pixels :] = residual
    space.gradients = gradients.reshape(-1, width)
    return space


@dataclass
class ExactSearchResult:
    """Decision of :func:`exact_search`, with its certificate.

    Attributes:
        model: Model description.
        batch_size: 1 or 2.
        tolerance: tau, in forging-error units (``lr * ||dg||``).
        lr: Learning rate converting gradient distances into forging errors.
        num_pixels: Pixels per input.
        num_levels: Grid levels per pixel.
        num_classes: Labels.
        num_examples: Examples in the domain.
        num_batches: Distinct batches (multisets) searched, the original excluded.
        original: The batch searched for: grid levels and labels.
        found: Whether some distinct in-domain batch is within tau.
        num_forgeries: How many are.
        forgery: The best one found (levels, labels, forging_error), or None.
        closest_error: Smallest forging error of any distinct batch, when known
            (always for b = 1; for b = 2 only if one lies within the largest radius).
        within: Number of distinct batches within ``factor * tau``, per factor.
    """

    model: str
    batch_size: int
    tolerance: float
    lr: float
    num_pixels: int
    num_levels: int
    num_classes: int
    num_examples: int
    num_batches: int
    original: dict
    found: bool
    num_forgeries: int
    forgery: dict | None
    closest_error: float | None
    within: dict[str, int] = field(default_factory=dict)

    def certificate(self) -> str:
        """One line: the forgery found, or the exhausted search space."""
        if self.found and self.forgery is not None:
            return (
                f"forgery {self.forgery['levels']} labels {self.forgery['labels']} "
                f"with forging error {self.forgery['forging_error']:.3e} <= tau"
            )
        closest = (
            f"; closest distinct batch at {self.closest_error:.3e}"
            if self.closest_error is not None
            else ""
        )
        return (
            f"exhausted {self.num_batches} distinct batches of {self.batch_size} from "
            f"{self.num_examples} examples ({self.num_levels} levels ^ "
            f"{self.num_pixels} pixels x {self.num_classes} labels): none within "
            f"tau{closest}"
        )

    def to_json(self) -> dict:
        """A JSON-ready dictionary, certificate included."""
        return {**asdict(self), "certificate": self.certificate()}


def exact_search(
    model: LinearModel,
    space: SearchSpace,
    levels: np.ndarray,
    labels: np.ndarray,
    *,
    tolerance: float,
    lr: float,
    radius_factors: tuple[float, ...] = (1.0, 100.0),
) -> ExactSearchResult:
    """Decide whether any distinct in-domain batch matches a batch's gradient.

    Every example of the domain is enumerated (:func:`build_search_space`). For one
    example the distances to all of them are computed directly. For a pair
    ``{a, b}`` with mean gradient ``g``, a pair ``{u, v}`` matches within tau exactly
    when ``||2 g - g_u - g_v|| <= 2 tau / lr``, so a k-d tree over the per-sample
    gradients answers, for every ``u``, which ``v`` lie in that ball around
    ``2 g - g_u``: all ``N (N + 1) / 2`` pairs are covered without listing them.
    Duplicate examples are allowed (two records of a dataset may be identical).
    The decision is exact up to float64 rounding of the gradients, which is far
    below any tolerance a verifier can use.

    Args:
        model: A linear model whose inputs are the domain's pixels.
        space: The enumerated domain.
        levels: Grid levels of the batch, shape ``(b, p)``, ``b`` 1 or 2.
        labels: Class indices, shape ``(b,)``.
        tolerance: tau, in forging-error units.
        lr: Learning rate of the step.
        radius_factors: Also count the distinct batches within these multiples
            of tau (the certificate's margin).

    Returns:
        The decision and its certificate.

    Raises:
        ConfigError: If the batch size is not 1 or 2, or tau or lr is not positive.
    """
    levels = np.asarray(levels, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    batch_size = len(labels)
    if batch_size not in (1, 2) or levels.shape[0] != batch_size:
        raise ConfigError(f"exact search handles b = 1 or 2, got b = {batch_size}")
    if not tolerance > 0 or not lr > 0:
        raise ConfigError(
            f"tolerance and lr must be positive, got {tolerance} and {lr}"
        )
    original = sorted(
        space.index_of(lv, lab) for lv, lab in zip(levels, labels, strict=True)
    )
    target = model.batch_gradient(
        space.inputs(levels), one_hot(labels, model.num_classes)
    )
    num = space.num_examples
    common = {
        "model": model.describe(),
        "batch_size": batch_size,
        "tolerance": tolerance,
        "lr": lr,
        "num_pixels": int(levels.shape[1]),
        "num_levels": int(space.domain.num_levels or 0),
        "num_classes": model.num_classes,
        "num_examples": num,
        "original": {"levels": levels.tolist(), "labels": labels.tolist()},
    }
    if batch_size == 1:
        errors = lr * np.linalg.norm(space.gradients - target, axis=1)
        errors[original[0]] = np.inf
        best = int(np.argmin(errors))
        hits = np.flatnonzero(errors <= tolerance)
        forgery = None
        if hits.size:
            best_levels, best_label = space.example(best)
            forgery = {
                "levels": [best_levels],
                "labels": [best_label],
                "forging_error": float(errors[best]),
            }
        return ExactSearchResult(
            **common,
            num_batches=num - 1,
            found=bool(hits.size),
            num_forgeries=int(hits.size),
            forgery=forgery,
            closest_error=float(errors[best]),
            within={
                f"{factor:g}": int((errors <= factor * tolerance).sum())
                for factor in radius_factors
            },
        )
    return _pair_search(model, space, target, original, common, radius_factors)


def _pair_search(
    model: LinearModel,
    space: SearchSpace,
    target: np.ndarray,
    original: list[int],
    common: dict,
    radius_factors: tuple[float, ...],
) -> ExactSearchResult:
    tolerance, lr = common["tolerance"], common["lr"]
    gradients = space.gradients
    num = space.num_examples
    tree = cKDTree(gradients, copy_data=False)
    doubled = 2 * target
    # pairs within tau, listed
    radius = 2 * tolerance / lr
    found: dict[tuple[int, int], float] = {}
    for start in range(0, num, QUERY_CHUNK):
        queries = doubled - gradients[start : start + QUERY_CHUNK]
        for offset, neighbours in enumerate(tree.query_ball_point(queries, radius)):
            first = start + offset
            for second in neighbours:
                pair = (min(first, second), max(first, second))
                if list(pair) == original or pair in found:
                    continue
                gap = doubled - gradients[pair[0]] - gradients[pair[1]]
                error = lr * float(np.linalg.norm(gap)) / 2
                if error <= tolerance:
                    found[pair] = error
    # distinct pairs within larger radii, counted: ordered pairs (u, v) and (v, u)
    # are both hit, the pair (u, u) once
    within: dict[str, int] = {}
    closest = min(found.values()) if found else None
    for factor in radius_factors:
        if factor == 1:
            within["1"] = len(found)
            continue
        limit = 2 * factor * tolerance / lr
        ordered = 0
        for start in range(0, num, QUERY_CHUNK):
            queries = doubled - gradients[start : start + QUERY_CHUNK]
            ordered += int(
                tree.query_ball_point(queries, limit, return_length=True).sum()
            )
        diagonal = int((np.linalg.norm(doubled - 2 * gradients, axis=1) <= limit).sum())
        within[f"{factor:g}"] = (ordered + diagonal) // 2 - 1
    forgery = None
    if found:
        pair = min(found, key=found.get)
        examples = [space.example(index) for index in pair]
        forgery = {
            "levels": [lv for lv, _ in examples],
            "labels": [lab for _, lab in examples],
            "forging_error": found[pair],
        }
    result = ExactSearchResult(
        **common,
        num_batches=num * (num + 1) // 2 - 1,
        found=bool(found),
        num_forgeries=len(found),
        forgery=forgery,
        closest_error=closest,
        within=within,
    )
    logger.info("pair search: %s", result.certificate())
    return result


@dataclass
class RelaxedSearchResult:
    """Outcome of :func:`relaxed_search`.

    Attributes:
        model: Model name.
        batch_size: b.
        tolerance: tau, in forging-error units.
        lr: Learning rate of the step.
        initial_error: Forging error of the starting batch (other real examples).
        relaxed_error: Forging error of the optimised real-valued batch.
        projected_error: Forging error after rounding, clipping and one-hot labels.
        relaxed_distinct: Smallest distance of an optimised example to an original
            one (> 0: no example of the original survives).
        projected_equals_original: Whether projection gave back the original batch.
        projected_violation: Fractions of the optimised batch outside the domain.
        history: Forging error every few optimisation steps.
    """

    model: str
    batch_size: int
    tolerance: float
    lr: float
    initial_error: float
    relaxed_error: float
    projected_error: float
    relaxed_distinct: float
    projected_equals_original: bool
    projected_violation: dict
    history: list[float] = field(repr=False)


def same_multiset(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two batches (one example per row) hold exactly the same rows."""
    if first.shape != second.shape:
        return False
    first = first[np.lexsort(first.T[::-1])]
    second = second[np.lexsort(second.T[::-1])]
    return bool(np.array_equal(first, second))


def soft_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with label vectors; equals ``cross_entropy`` on one-hot."""
    return -(labels * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _gradient(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, graph: bool
) -> torch.Tensor:
    value = soft_label_loss(model(inputs), labels)
    grads = torch.autograd.grad(value, list(model.parameters()), create_graph=graph)
    return torch.cat([g.reshape(-1) for g in grads])


def relaxed_search(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    start_inputs: torch.Tensor,
    start_labels: torch.Tensor,
    *,
    domain: Domain,
    offset: np.ndarray,
    scale: np.ndarray,
    tolerance: float,
    lr: float,
    name: str = "model",
    num_steps: int = 300,
    step_size: float = 0.05,
) -> RelaxedSearchResult:
    """Match a batch's gradient in the continuous relaxation, then project.

    Gradient matching in the style of gradient inversion attacks (Zhu et al.,
    "Deep Leakage from Gradients", NeurIPS 2019), aimed at a *different* batch:
    inputs are ``low + (high - low) * sigmoid(u)`` (always in range), labels are
    ``softmax(v)`` (probability vectors), and Adam minimises
    ``||g(B') - g(B)||^2 / ||g(B)||^2`` starting from other real examples. The
    result is projected onto the domain by rounding raw values to the grid,
    clipping to the range and taking the arg-max label.

    Args:
        model: A classifier trained with cross-entropy, in float64.
        inputs: The batch to forge, scaled, float64.
        labels: Its class indices.
        start_inputs: Real examples to start from (same shape as ``inputs``).
        start_labels: Their class indices.
        domain: Legal raw values and labels.
        offset: Per-feature offset of the dataset.
        scale: Per-feature scale of the dataset.
        tolerance: tau, in forging-error units.
        lr: Learning rate of the step.
        name: Model name for the result.
        num_steps: Adam steps.
        step_size: Adam learning rate.

    Returns:
        Forging errors before and after projection, and how the relaxed batch
        leaves the domain.
    """
    from forgelab.theory.linear import distinct_distance, domain_violation

    if not num_steps >= 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    num_classes = domain.num_classes
    shape = inputs.shape
    offset_t = torch.as_tensor(offset, dtype=torch.float64)
    scale_t = torch.as_tensor(scale, dtype=torch.float64)
    low = ((domain.value_min - offset_t) / scale_t).reshape(shape[1:])
    high = ((domain.value_max - offset_t) / scale_t).reshape(shape[1:])
    target_labels = torch.nn.functional.one_hot(labels, num_classes).double()
    target = _gradient(model, inputs, target_labels, graph=False).detach()
    norm = float(torch.linalg.vector_norm(target))

    def error_of(batch: torch.Tensor, label_vectors: torch.Tensor) -> float:
        gap = _gradient(model, batch, label_vectors, graph=False) - target
        return lr * float(torch.linalg.vector_norm(gap))

    start_labels_1h = torch.nn.functional.one_hot(start_labels, num_classes).double()
    fraction = ((start_inputs - low) / (high - low)).clamp(0.01, 0.99)
    logit_inputs = torch.logit(fraction).detach().requires_grad_(True)
    logit_labels = (4.0 * start_labels_1h).detach().requires_grad_(True)
    optimizer = torch.optim.Adam([logit_inputs, logit_labels], lr=step_size)
    history = [error_of(start_inputs, start_labels_1h)]
    for step in range(num_steps):
        optimizer.zero_grad()
        batch = low + (high - low) * torch.sigmoid(logit_inputs)
        label_vectors = torch.softmax(logit_labels, dim=1)
        gap = _gradient(model, batch, label_vectors, graph=True) - target
        objective = (gap**2).sum() / norm**2
        objective.backward()
        optimizer.step()
        if step % 10 == 9 or step == num_steps - 1:
            history.append(lr * float(torch.sqrt(objective.detach())) * norm)
    with torch.no_grad():
        relaxed = low + (high - low) * torch.sigmoid(logit_inputs)
        relaxed_labels = torch.softmax(logit_labels, dim=1)
    relaxed_error = error_of(relaxed, relaxed_labels)
    # project: raw values onto the grid and into range, labels to the arg-max
    raw = relaxed.reshape(shape[0], -1) * scale_t + offset_t
    if domain.value_step is not None:
        raw = domain.value_min + domain.value_step * torch.round(
            (raw - domain.value_min) / domain.value_step
        )
    raw = raw.clamp(domain.value_min, domain.value_max)
    projected = ((raw - offset_t) / scale_t).reshape(shape)
    projected_labels = relaxed_labels.argmax(dim=1)
    projected_1h = torch.nn.functional.one_hot(projected_labels, num_classes).double()
    projected_error = error_of(projected, projected_1h)
    flat = projected.reshape(shape[0], -1).numpy()
    original = inputs.reshape(shape[0], -1).numpy()
    same = same_multiset(
        np.hstack([flat, projected_1h.numpy()]),
        np.hstack([original, target_labels.numpy()]),
    )
    violation = domain_violation(
        relaxed.reshape(shape[0], -1).numpy(),
        relaxed_labels.numpy(),
        domain,
        offset,
        scale,
    )
    return RelaxedSearchResult(
        model=name,
        batch_size=int(shape[0]),
        tolerance=tolerance,
        lr=lr,
        initial_error=history[0],
        relaxed_error=relaxed_error,
        projected_error=projected_error,
        relaxed_distinct=distinct_distance(
            relaxed.reshape(shape[0], -1).numpy(),
            relaxed_labels.numpy(),
            original,
            target_labels.numpy(),
        ),
        projected_equals_original=bool(same),
        projected_violation=asdict(violation),
        history=history,
    )
