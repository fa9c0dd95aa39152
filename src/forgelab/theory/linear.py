"""Linear models in closed form: which examples and batches share a gradient.

A linear model with ``K`` outputs, weight ``W`` (``K x d``) and optional bias ``c``
has a rank-one per-sample gradient: ``dW = r x^T`` and ``dc = r``, with the residual

- squared loss ``0.5 * ||W x + c - y||^2`` (linear regression, target vector ``y``):
  ``r = W x + c - y``;
- cross-entropy ``-sum_k y_k log softmax(W x + c)_k`` (softmax regression, label
  vector ``y``): ``r = (sum_k y_k) p - y`` with ``p = softmax(W x + c)``.

Everything here is float64 numpy. Labels are real vectors so that the soft or
shifted labels that real-valued forgeries need can be represented; a label is in the
domain only when it is one-hot. The questions come from the theoretical part of the
re-evaluation (Suliman et al., USENIX Security 2025, arXiv 2411.05658): distinct
real-valued batches with the same gradient exist, but are they inside the data
domain?
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from forgelab.data import Domain
from forgelab.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("regression", "softmax")
"""Linear models: squared loss on one-hot targets, or softmax cross-entropy."""

ONE_HOT_TOLERANCE = 1e-9
"""A label vector counts as one-hot when it is this close (L2) to a basis vector."""

GRID_TOLERANCE = 1e-9
"""A raw value counts as on the grid when it is this close to a grid point."""


@dataclass(frozen=True)
class LinearModel:
    """A linear model in float64.

    Attributes:
        kind: ``"regression"`` or ``"softmax"``.
        weight: Weight matrix, shape ``(K, d)``.
        bias: Bias vector of shape ``(K,)``, or None for a model without one.
    """

    kind: str
    weight: np.ndarray
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(
                f"unknown linear model {self.kind!r}; choose one of {', '.join(KINDS)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of outputs ``K``."""
        return int(self.weight.shape[0])

    @property
    def num_features(self) -> int:
        """Number of input features ``d``."""
        return int(self.weight.shape[1])

    @property
    def has_bias(self) -> bool:
        """Whether the model has a bias term."""
        return self.bias is not None

    def describe(self) -> str:
        """A short name such as ``softmax, bias``."""
        return f"{self.kind}, {'bias' if self.has_bias else 'no bias'}"

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """Outputs ``W x + c`` for inputs of shape ``(n, d)``."""
        out = inputs @ self.weight.T
        return out + self.bias if self.bias is not None else out

    def residuals(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Residuals ``r`` (gradient of the loss by the outputs), shape ``(n, K)``."""
        logits = self.logits(inputs)
        if self.kind == "regression":
            return logits - labels
        return labels.sum(axis=1, keepdims=True) * softmax(logits) - labels

    def example_gradients(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-sample gradients, flattened like ``nn.Linear`` (weight rows, then bias).

        Args:
            inputs: Shape ``(n, d)``.
            labels: Label vectors, shape ``(n, K)``.

        Returns:
            Shape ``(n, K * d)``, or ``(n, K * d + K)`` with a bias.
        """
        residual = self.residuals(inputs, labels)
        weight_part = (residual[:, :, None] * inputs[:, None, :]).reshape(
            inputs.shape[0], -1
        )
        if self.bias is None:
            return weight_part
        return np.concatenate([weight_part, residual], axis=1)

    def batch_gradient(self, inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the mean loss of a batch, flattened like the per-sample ones."""
        residual = self.residuals(inputs, labels)
        weight_part = (residual.T @ inputs).reshape(-1) / inputs.shape[0]
        if self.bias is None:
            return weight_part
        return np.concatenate([weight_part, residual.mean(axis=0)])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices as float64 one-hot rows."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"labels must lie in [0, {num_classes - 1}], got {labels.min()} to "
            f"{labels.max()}"
        )
    return np.eye(num_classes)[labels]


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """``||value - reference|| / ||reference||`` (absolute when the reference is 0)."""
    norm = float(np.linalg.norm(reference))
    distance = float(np.linalg.norm(value - reference))
    return distance / norm if norm > 0 else distance


def fit_linear_model(
    kind: str,
    inputs: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    bias: bool,
    l2: float = 1e-3,
    max_iterations: int = 100,
) -> LinearModel:
    """Fit a linear model to data with a small L2 penalty (float64, deterministic).

    Regression is solved in closed form (ridge on one-hot targets); softmax regression
    by L-BFGS from zero weights.

    Args:
        kind: ``"regression"`` or ``"softmax"``.
        inputs: Scaled inputs, shape ``(n, d)``.
        labels: Class indices, shape ``(n,)``.
        num_classes: ``K``.
        bias: Fit a bias term.
        l2: Penalty on the weights (not the bias), per example.
        max_iterations: L-BFGS iterations for softmax regression.

    Returns:
        The fitted model.
    """
    if kind not in KINDS:
        raise ConfigError(
            f"unknown linear model {kind!r}; choose one of {', '.join(KINDS)}"
        )
    inputs = np.asarray(inputs, dtype=np.float64)
    targets = one_hot(labels, num_classes)
    num_examples, num_features = inputs.shape
    design = np.hstack([inputs, np.ones((num_examples, 1))]) if bias else inputs
    width = design.shape[1]
    penalty = np.full(width, l2 * num_examples)
    if bias:
        penalty[-1] = 0.0
    if kind == "regression":
        gram = design.T @ design + np.diag(penalty)
        solution = np.linalg.solve(gram, design.T @ targets).T
    else:

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            params = flat.reshape(num_classes, width)
            logits = design @ params.T
            logits -= logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits).sum(axis=1))
            loss = float((log_norm - (logits * targets).sum(axis=1)).sum())
            probabilities = np.exp(logits - log_norm[:, None])
            grad = (probabilities - targets).T @ design
            loss += 0.5 * float((penalty * params**2).sum())
            grad += penalty * params
            return loss / num_examples, grad.reshape(-1) / num_examples

        found = minimize(
            objective,
            np.zeros(num_classes * width),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iterations},
        )
        solution = found.x.reshape(num_classes, width)
    weight = np.ascontiguousarray(solution[:, :num_features])
    return LinearModel(kind, weight, solution[:, -1].copy() if bias else None)


def equivalent_example(
    model: LinearModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    scale: float = 1.0,
    label_mass: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """An example with exactly the same gradient as ``(x, y)``; all of them, over s, t.

    If the gradient ``r x^T`` is not zero, its rank-one factors are unique up to a
    scale ``s != 0``, so every example ``(x', y')`` with the same gradient has
    ``x' = s x`` and residual ``r / s``:

    - without a bias, every ``s != 0`` works: regression needs
      ``y' = W (s x) - r / s``; softmax regression needs
      ``y' = t softmax(W s x) - r / s`` for any label mass ``t = sum(y')``;
    - with a bias, the bias gradient ``r`` fixes ``s = 1``, so the input is pinned:
      regression then needs ``y' = y``; softmax regression allows
      ``y' = y + (t - 1) p``, which is one-hot only for ``t = 1``, i.e. ``y' = y``.

    Args:
        model: The linear model.
        x: Input, shape ``(d,)``.
        y: Label vector, shape ``(K,)``.
        scale: ``s``; must be 1 for a model with a bias.
        label_mass: ``t``, the sum of the new label (softmax regression only).

    Returns:
        ``(x', y')``.

    Raises:
        ConfigError: If ``s`` is 0, or not 1 with a bias, or ``t != 1`` for
            regression.
    """
    if scale == 0:
        raise ConfigError("scale s must be non-zero, got 0")
    if model.has_bias and scale != 1:
        raise ConfigError(
            f"with a bias the input is pinned: scale must be 1, got {scale}"
        )
    if model.kind == "regression" and label_mass != 1:
        raise ConfigError(
            f"label mass applies to softmax regression only, got {label_mass}"
        )
    residual = model.residuals(x[None], y[None])[0]
    new_x = scale * x
    logits = model.logits(new_x[None])[0]
    if model.kind == "regression":
        return new_x, logits - residual / scale
    return new_x, label_mass * softmax(logits) - residual / scale


def grid_rescalings(levels: np.ndarray, num_levels: int) -> np.ndarray:
    """Every scale ``s != 1`` that maps an input's grid levels onto the grid.

    With levels ``k_i`` in ``0 .. L`` (``L = num_levels - 1``), ``s k_i`` is a level
    for every ``i`` exactly when ``s = m / g`` with ``g`` the gcd of the non-zero
    levels and ``m`` a positive integer with ``m * max(k) <= L * g``; a negative ``s``
    leaves the range.

    Args:
        levels: Integer grid levels of one input, shape ``(d,)``.
        num_levels: Number of grid levels.

    Returns:
        The scales, ascending; empty for an all-zero input.
    """
    nonzero = levels[levels != 0].astype(np.int64)
    if nonzero.size == 0:
        return np.zeros(0)
    divisor = int(np.gcd.reduce(np.abs(nonzero)))
    largest = int(np.abs(nonzero).max())
    count = ((num_levels - 1) * divisor) // largest
    multiples = np.arange(1, count + 1)
    return multiples[multiples != divisor] / divisor


def grid_levels(raw: np.ndarray, domain: Domain) -> np.ndarray:
    """Raw values as integer grid levels (checked to lie on the grid).

    Raises:
        ConfigError: If the domain is continuous or a value is off its grid.
    """
    if domain.value_step is None:
        raise ConfigError("the domain is continuous (no value grid); need a grid")
    levels = (np.asarray(raw, dtype=np.float64) - domain.value_min) / domain.value_step
    rounded = np.round(levels)
    if np.abs(levels - rounded).max(initial=0.0) > GRID_TOLERANCE:
        raise ConfigError("raw inputs are not on the domain's value grid")
    return rounded.astype(np.int64)


@dataclass
class SingleExampleSummary:
    """Single-example forgeries of every example of a dataset under one model.

    Attributes:
        model: Model description, e.g. ``"softmax, no bias"``.
        num_examples: Examples checked.
        num_zero_inputs: All-zero inputs (their gradient is zero without a bias).
        num_zero_residuals: Examples whose residual is zero (L2 <= 1e-12): their
            gradient is zero and any in-domain example with a zero gradient would
            forge them; they are counted here and not decided.
        num_with_rescaling: Examples whose input has a distinct rescaling ``s x``
            on the grid (whether or not the model allows it).
        num_candidates: Distinct in-range rescalings tried over all examples.
        num_forgeable: Examples with a distinct in-domain example of exactly the
            same gradient (label within :data:`ONE_HOT_TOLERANCE` of one-hot).
        label_gap_min: Smallest distance between a required label and a one-hot
            label over all candidates (inf if there was none).
        gradient_error_min: Smallest gradient L2 error of an in-domain candidate
            ``(s x, e_k)`` (``label gap * s * ||x||``; inf if there was none).
        label_gaps: Per example, the smallest label gap (inf without candidates).
    """

    model: str
    num_examples: int
    num_zero_inputs: int
    num_zero_residuals: int
    num_with_rescaling: int
    num_candidates: int
    num_forgeable: int
    label_gap_min: float
    gradient_error_min: float
    label_gaps: np.ndarray = field(repr=False)

    @property
    def fraction_forgeable(self) -> float:
        """Fraction of examples with a distinct in-domain single-example forgery."""
        return self.num_forgeable / max(1, self.num_examples)

    def to_json(self) -> dict:
        """A JSON-ready dictionary (without the per-example gaps)."""
        return {
            "model": self.model,
            "num_examples": self.num_examples,
            "num_zero_inputs": self.num_zero_inputs,
            "num_zero_residuals": self.num_zero_residuals,
            "num_with_rescaling": self.num_with_rescaling,
            "num_candidates": self.num_candidates,
            "num_forgeable": self.num_forgeable,
            "fraction_forgeable": self.fraction_forgeable,
            "label_gap_min": self.label_gap_min,
            "gradient_error_min": self.gradient_error_min,
        }


def single_example_forgeries(
    model: LinearModel,
    raw: np.ndarray,
    labels: np.ndarray,
    domain: Domain,
    scale: np.ndarray,
) -> SingleExampleSummary:
    """Decide for every example whether another in-domain example shares its gradient.

    Uses the closed form of :func:`equivalent_example`: with a bias only the example
    itself qualifies (unless its residual is zero, which never happens for softmax
    regression; such examples are counted and left undecided); without one, the
    candidates are the grid rescalings ``s x`` with the label they require, which
    must be one-hot. An all-zero input has a zero gradient
    without a bias and is forged by the same input with any other label.

    Args:
        model: The linear model.
        raw: Raw inputs on the domain's grid, shape ``(n, d)``; the offset must be 0.
        labels: Class indices, shape ``(n,)``.
        domain: The value grid and range.
        scale: Per-feature divisor turning raw values into model inputs.

    Returns:
        The counts, and the closest any candidate came to the domain.
    """
    levels = grid_levels(raw, domain)
    if domain.value_min != 0:
        raise ConfigError(
            f"rescaling needs a grid starting at 0, got value_min {domain.value_min}"
        )
    inputs = raw / scale
    targets = one_hot(labels, model.num_classes)
    basis = np.eye(model.num_classes)
    gaps = np.full(len(levels), np.inf)
    residual_norms = np.linalg.norm(model.residuals(inputs, targets), axis=1)
    num_zero = num_rescalable = num_candidates = num_forgeable = 0
    best_error = np.inf
    for index, example_levels in enumerate(levels):
        scales = grid_rescalings(example_levels, domain.num_levels or 0)
        if not example_levels.any():
            num_zero += 1
            if not model.has_bias:
                gaps[index] = 0.0
                num_forgeable += 1
                best_error = 0.0
            continue
        if scales.size:
            num_rescalable += 1
        if model.has_bias or not scales.size:
            continue
        num_candidates += scales.size
        x, y = inputs[index], targets[index]
        required = np.stack(
            [equivalent_example(model, x, y, scale=s)[1] for s in scales]
        )
        distances = np.linalg.norm(required[:, None, :] - basis[None], axis=2)
        per_scale = distances.min(axis=1)
        gaps[index] = float(per_scale.min())
        best_error = min(
            best_error, float((per_scale * scales).min() * np.linalg.norm(x))
        )
        if gaps[index] <= ONE_HOT_TOLERANCE:
            num_forgeable += 1
    finite = gaps[np.isfinite(gaps)]
    summary = SingleExampleSummary(
        model=model.describe(),
        num_examples=len(levels),
        num_zero_inputs=num_zero,
        num_zero_residuals=int((residual_norms <= 1e-12).sum()),
        num_with_rescaling=num_rescalable,
        num_candidates=num_candidates,
        num_forgeable=num_forgeable,
        label_gap_min=float(finite.min()) if finite.size else np.inf,
        gradient_error_min=float(best_error),
        label_gaps=gaps,
    )
    logger.info(
        "%s: %d of %d examples forgeable", summary.model, num_forgeable, len(levels)
    )
    return summary


def mixing_matrix(batch_size: int, mixing: float) -> np.ndarray:
    """``T = (1 - a) I + a P`` with ``P`` the cyclic shift; rows sum to 1.

    ``T`` is invertible unless ``a = 1/2`` and the batch size is even.
    """
    shift = np.roll(np.eye(batch_size), 1, axis=1)
    return (1 - mixing) * np.eye(batch_size) + mixing * shift


def construct_batch_forgery(
    model: LinearModel,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    mixing: float = 0.25,
) -> tuple[np.ndarray, np.ndarray]:
    """A distinct real-valued batch with exactly the same batch gradient.

    Stack the batch's inputs as ``X`` (``b x d``) and residuals as ``R`` (``b x K``);
    the mean gradient is ``R^T X / b`` and, with a bias, ``R^T 1 / b``. For any
    invertible ``T`` with ``T 1 = 1`` the batch with inputs ``T X`` and residuals
    ``T^{-T} R`` has the same gradient: ``(T^{-T} R)^T T X = R^T X`` and
    ``R^T T^{-1} 1 = R^T 1``. Its labels follow from the residuals (mass 1 for
    softmax regression, since the rows of ``R`` sum to 0). When ``R`` has rank ``b``
    (``K >= b``) and ``[X 1]`` rank ``b``, every same-size batch whose residuals also
    have rank ``b`` arises this way. Here ``T`` mixes each example with the next one
    (:func:`mixing_matrix`), so the inputs are convex combinations: in range, but off
    the grid, and the labels are no longer one-hot.

    Args:
        model: The linear model.
        inputs: Batch inputs, shape ``(b, d)``, ``b >= 2``.
        labels: Label vectors, shape ``(b, K)``.
        mixing: ``a`` in :func:`mixing_matrix`; in ``(0, 1)``, not 1/2.

    Returns:
        The forged inputs and label vectors.

    Raises:
        ConfigError: If the batch has fewer than two examples or ``a`` is invalid.
    """
    batch_size = inputs.shape[0]
    if batch_size < 2:
        raise ConfigError(
            f"a distinct batch with the same gradient needs b >= 2, got b = "
            f"{batch_size}"
        )
    if not 0 < mixing < 1 or mixing == 0.5:
        raise ConfigError(f"mixing must be in (0, 1) and not 0.5, got {mixing}")
    transform = mixing_matrix(batch_size, mixing)
    residual = model.residuals(inputs, labels)
    new_inputs = transform @ inputs
    new_residual = np.linalg.solve(transform.T, residual)
    logits = model.logits(new_inputs)
    if model.kind == "regression":
        return new_inputs, logits - new_residual
    return new_inputs, softmax(logits) - new_residual


def distinct_distance(
    inputs: np.ndarray,
    labels: np.ndarray,
    other_inputs: np.ndarray,
    other_labels: np.ndarray,
) -> float:
    """Smallest distance from an example of one batch to any example of the other.

    A positive value means no example of the first batch occurs in the second, so the
    batches are distinct as multisets.
    """
    first = np.hstack([inputs, labels])
    second = np.hstack([other_inputs, other_labels])
    distances = np.linalg.norm(first[:, None, :] - second[None], axis=2)
    return float(distances.min())


@dataclass
class DomainViolation:
    """How far a batch lies outside the data domain.

    Attributes:
        fraction_out_of_range: Raw input values outside ``[value_min, value_max]``.
        fraction_off_grid: Raw input values not on the value grid.
        fraction_labels_not_one_hot: Labels farther than :data:`ONE_HOT_TOLERANCE`
            from every one-hot vector.
        max_label_gap: Largest distance of a label to its nearest one-hot vector.
        raw_min: Smallest raw value.
        raw_max: Largest raw value.
    """

    fraction_out_of_range: float
    fraction_off_grid: float
    fraction_labels_not_one_hot: float
    max_label_gap: float
    raw_min: float
    raw_max: float


def domain_violation(
    inputs: np.ndarray,
    labels: np.ndarray,
    domain: Domain,
    offset: np.ndarray,
    scale: np.ndarray,
) -> DomainViolation:
    """Measure which values and labels of a batch are outside the domain.

    Args:
        inputs: Scaled inputs as the model sees them, shape ``(b, d)``.
        labels: Label vectors, shape ``(b, K)``.
        domain: The legal raw values and labels.
        offset: Per-feature offset of the dataset.
        scale: Per-feature scale of the dataset.

    Returns:
        The fractions and extremes.
    """
    raw = inputs * scale + offset
    span = domain.value_max - domain.value_min
    slack = GRID_TOLERANCE * max(1.0, span)
    out_of_range = (raw < domain.value_min - slack) | (raw > domain.value_max + slack)
    if domain.value_step is None:
        off_grid = np.zeros_like(out_of_range)
    else:
        levels = (raw - domain.value_min) / domain.value_step
        off_grid = np.abs(levels - np.round(levels)) > GRID_TOLERANCE
    basis = np.eye(labels.shape[1])
    gaps = np.linalg.norm(labels[:, None, :] - basis[None], axis=2).min(axis=1)
    return DomainViolation(
        fraction_out_of_range=float(out_of_range.mean()),
        fraction_off_grid=float(off_grid.mean()),
        fraction_labels_not_one_hot=float((gaps > ONE_HOT_TOLERANCE).mean()),
        max_label_gap=float(gaps.max()),
        raw_min=float(raw.min()),
        raw_max=float(raw.max()),
    )
