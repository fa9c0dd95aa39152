"""The ``forgelab theory`` report: every claim about shared gradients, measured.

Sections follow the theoretical part of the re-evaluation (Suliman et al., USENIX
Security 2025, arXiv 2411.05658): closed forms for linear models, search inside the
data domain, first-layer gradients of neural networks, and the float32 noise that
sets a verifier's tolerance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from forgelab.data import Dataset, Domain  # noqa: E402
from forgelab.errors import ConfigError  # noqa: E402
from forgelab.models import ModelSpec, build_model  # noqa: E402
from forgelab.theory.float_order import reorder_gradients  # noqa: E402
from forgelab.theory.linear import (  # noqa: E402
    KINDS,
    LinearModel,
    construct_batch_forgery,
    distinct_distance,
    domain_violation,
    equivalent_example,
    fit_linear_model,
    one_hot,
    relative_error,
    single_example_forgeries,
)
from forgelab.theory.networks import analyse_first_layers, singular_value_profile  # noqa: E402
from forgelab.theory.search import (  # noqa: E402
    build_search_space,
    downsample,
    exact_search,
    relaxed_search,
)

logger = logging.getLogger(__name__)

PAPER_TOLERANCE = 1e-7
"""The re-evaluation's fixed threshold for LeNet/MNIST (weight-space L2, eta 0.01)."""

EXACT_RELATIVE = 1e-12
"""Constructed real-valued forgeries must match the gradient this closely (float64)."""

SEARCH_SHAPES = {"digits": (2, 2), "mnist": (1, 2)}
"""Downsampled image shapes of the exact search: the largest whose whole domain
(levels ^ pixels x 10 labels) stays under a million examples: 17^4 x 10 and
256^2 x 10."""

TRACE_MODELS = {"digits": "mlp", "mnist": "lenet"}
NETWORK_MODELS = {"digits": ("mlp",), "mnist": ("lenet", "mlp")}

TaskFactory = Callable[[str], Callable[[int, int], None]]


@dataclass(frozen=True)
class TheorySettings:
    """What ``forgelab theory`` measures, with its defaults in one place.

    Attributes:
        lr: Learning rate eta turning gradient distances into forging errors.
        tolerance: tau used for decisions (the paper's 1e-7 by default).
        seed: Seed of every random choice.
        batch_sizes: Batch sizes of the real-valued constructions.
        relaxed_batch_sizes: Batch sizes of the relaxed search.
        relaxed_steps: Adam steps of the relaxed search.
        num_network_examples: Examples for the first-layer analysis.
        num_reorder_batches: Logged batches whose reorderings are counted.
        num_orders: Orderings sampled per batch of 100.
        calibration_steps: Steps sampled by the tolerance calibration.
        trace_examples: Training examples of the short trace recorded to
            calibrate tau (one epoch, batch 100).
        search_shape: Downsampled image shape of the exact search; None for the
            dataset's default in :data:`SEARCH_SHAPES`.
    """

    lr: float = 0.01
    tolerance: float = PAPER_TOLERANCE
    seed: int = 2024
    batch_sizes: tuple[int, ...] = (2, 16, 100)
    relaxed_batch_sizes: tuple[int, ...] = (1, 4, 16)
    relaxed_steps: int = 100
    num_network_examples: int = 16
    num_reorder_batches: int = 2
    num_orders: int = 20
    trace_examples: int = 1000
    calibration_steps: int = 8
    search_shape: tuple[int, int] | None = None


@dataclass
class TheoryResult:
    """Everything ``forgelab theory`` measured (see :func:`run_theory`)."""

    dataset: str
    settings: dict
    calibration: dict = field(default_factory=dict)
    single: list[dict] = field(default_factory=list)
    constructions: list[dict] = field(default_factory=list)
    exact: list[dict] = field(default_factory=list)
    relaxed: list[dict] = field(default_factory=list)
    networks: list[dict] = field(default_factory=list)
    reorder: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_theory(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings | None = None,
    task: TaskFactory | None = None,
) -> TheoryResult:
    """Measure, write ``theory.json``, ``report.md`` and figures into ``out``.

    Args:
        dataset: ``digits`` or ``mnist``.
        out: Output directory; its ``trace`` subdirectory is replaced.
        settings: What to measure; defaults when None.
        task: Makes a progress callback for a named stage.

    Returns:
        The measurements.

    Raises:
        ConfigError: If the dataset is not one the theory report supports.
    """
    if dataset.name not in SEARCH_SHAPES:
        raise ConfigError(
            f"forgelab theory supports datasets {', '.join(SEARCH_SHAPES)}, got "
            f"{dataset.name!r}"
        )
    settings = settings or TheorySettings()
    if not settings.tolerance > 0 or not settings.lr > 0:
        raise ConfigError(
            f"tolerance and lr must be positive, got {settings.tolerance} and "
            f"{settings.lr}"
        )
    out.mkdir(parents=True, exist_ok=True)
    result = TheoryResult(dataset.name, asdict(settings))
    stages = [
        ("tolerance", _calibrate),
        ("linear closed forms", _linear),
        ("exact search", _exact),
        ("relaxed search", _relaxed),
        ("first layers", _networks),
        ("float order", _reorder),
    ]
    progress = task("theory") if task else None
    fitted: dict[tuple[str, bool], LinearModel] = {}
    for done, (name, stage) in enumerate(stages):
        started = time.perf_counter()
        logger.info("theory: %s", name)
        stage(dataset, out, settings, result, fitted)
        result.seconds[name] = time.perf_counter() - started
        if progress is not None:
            progress(done + 1, len(stages))
    from forgelab.report import write_json
    from forgelab.trace import write_atomic

    write_json(out / "theory.json", asdict(result))
    write_atomic(out / "report.md", render_report(result).encode())
    return result


def _rng(settings: TheorySettings, stream: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, stream])


# tolerance: record a short trace and calibrate tau as the verifier does


def _calibrate(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    from forgelab.optim import OptimizerConfig
    from forgelab.replay import calibrate_tolerance
    from forgelab.trace import Trace, replacing_own_trace
    from forgelab.training import record_trace

    trace_dir = out / "trace"
    model = TRACE_MODELS[dataset.name]
    # a previous trace is put back if this recording does not complete
    with replacing_own_trace(trace_dir):
        record_trace(
            trace_dir,
            dataset.subset(min(settings.trace_examples, dataset.num_train)),
            model,
            optimizer=OptimizerConfig(lr=settings.lr),
            num_epochs=1,
            seed=settings.seed,
        )
    trace = Trace(trace_dir)
    calibration = calibrate_tolerance(
        trace,
        dataset.subset(min(settings.trace_examples, dataset.num_train)),
        num_segments=settings.calibration_steps,
        seed=settings.seed,
    )
    result.calibration = {
        "model": model,
        "num_steps": trace.num_steps,
        **asdict(calibration),
    }


# 1. linear models in closed form


def _linear(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    inputs = dataset.raw_train / dataset.scale
    labels = dataset.y_train.numpy()
    models = fitted
    for kind in KINDS:
        for bias in (False, True):
            models[(kind, bias)] = fit_linear_model(kind, inputs, labels, 10, bias=bias)
    for model in models.values():
        summary = single_example_forgeries(
            model, dataset.raw_train, labels, dataset.domain, dataset.scale
        )
        accuracy = float((model.logits(inputs).argmax(axis=1) == labels).mean())
        result.single.append({**summary.to_json(), "train_accuracy": accuracy})
    _plot_family(
        models[("softmax", False)], models[("regression", False)], dataset, out
    )
    rng = _rng(settings, 1)
    for batch_size in settings.batch_sizes:
        chosen = rng.choice(dataset.num_train, size=batch_size, replace=False)
        batch, targets = inputs[chosen], one_hot(labels[chosen], 10)
        for model in models.values():
            forged, forged_labels = construct_batch_forgery(model, batch, targets)
            violation = domain_violation(
                forged, forged_labels, dataset.domain, dataset.offset, dataset.scale
            )
            result.constructions.append(
                {
                    "model": model.describe(),
                    "batch_size": batch_size,
                    "relative_error": relative_error(
                        model.batch_gradient(forged, forged_labels),
                        model.batch_gradient(batch, targets),
                    ),
                    "distinct_distance": distinct_distance(
                        forged, forged_labels, batch, targets
                    ),
                    **asdict(violation),
                }
            )
    _plot_constructions(result.constructions, out / "batch_domain.png")


def _plot_family(
    softmax_model: LinearModel,
    regression_model: LinearModel,
    dataset: Dataset,
    out: Path,
) -> None:
    scales = np.geomspace(0.25, 4.0, 241)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    basis = np.eye(10)
    for axis, model in zip(axes, (softmax_model, regression_model), strict=True):
        for index in range(5):
            x = dataset.raw_train[index] / dataset.scale
            y = basis[int(dataset.y_train[index])]
            gaps = [
                np.linalg.norm(
                    equivalent_example(model, x, y, scale=s)[1][None] - basis, axis=1
                ).min()
                for s in scales
            ]
            axis.plot(scales, np.maximum(gaps, 1e-17), lw=1, label=f"example {index}")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xticks([0.25, 0.5, 1, 2, 4], ["0.25", "0.5", "1", "2", "4"])
        axis.axvline(1.0, color="k", ls=":", lw=0.8)
        axis.set_xlabel("input scale s (x' = s x)")
        axis.set_title(f"{model.describe()}", fontsize=9)
    axes[0].set_ylabel("distance of required label to one-hot")
    axes[0].legend(fontsize=7)
    figure.suptitle(
        f"{dataset.name}: single-example forgeries (s x, y'(s)) need a non-one-hot "
        "label unless s = 1",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(out / "single_example_family.png", dpi=120)
    plt.close(figure)


def _plot_constructions(rows: list[dict], path: Path) -> None:
    batch_size = max(row["batch_size"] for row in rows)
    chosen = [row for row in rows if row["batch_size"] == batch_size]
    names = [row["model"] for row in chosen]
    keys = (
        ("fraction_out_of_range", "inputs out of range"),
        ("fraction_off_grid", "inputs off the grid"),
        ("fraction_labels_not_one_hot", "labels not one-hot"),
    )
    figure, axes = plt.subplots(figsize=(8, 3.6))
    width = 0.25
    positions = np.arange(len(chosen))
    for offset, (key, label) in enumerate(keys):
        axes.bar(
            positions + (offset - 1) * width,
            [row[key] for row in chosen],
            width,
            label=label,
        )
    axes.set_xticks(positions, names, fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("fraction of the forged batch")
    axes.set_title(
        f"real-valued batch forgeries (b = {batch_size}, same gradient to float64): "
        "where they leave the domain",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# 2. search inside the domain


def _exact(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    height, width = dataset.domain.input_shape[1:]
    shape = settings.search_shape or SEARCH_SHAPES[dataset.name]
    raw = downsample(dataset.raw_train, (height, width), shape, dataset.domain)
    small = Domain(
        (1, *shape),
        dataset.domain.value_min,
        dataset.domain.value_max,
        dataset.domain.value_step,
        "one-hot",
        dataset.domain.num_classes,
    )
    scale = float(dataset.scale[0])
    labels = dataset.y_train.numpy()
    levels = np.round(raw / (dataset.domain.value_step or 1.0)).astype(np.int64)
    chosen = _rng(settings, 2).choice(dataset.num_train, size=2, replace=False)
    for bias, sizes in ((True, (1, 2)), (False, (1,))):
        model = fit_linear_model("softmax", raw / scale, labels, 10, bias=bias)
        space = build_search_space(model, small, scale)
        accuracy = float((model.logits(raw / scale).argmax(axis=1) == labels).mean())
        for batch_size in sizes:
            picked = chosen[:batch_size]
            found = exact_search(
                model,
                space,
                levels[picked],
                labels[picked],
                tolerance=settings.tolerance,
                lr=settings.lr,
            )
            result.exact.append(
                {
                    **found.to_json(),
                    "image_shape": list(shape),
                    "train_accuracy": accuracy,
                    "example_indices": picked.tolist(),
                }
            )
        del space


def _torch_logreg(model: LinearModel, dataset: Dataset) -> torch.nn.Module:
    net = build_model(ModelSpec("logreg", dataset.domain.input_shape, 10)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.from_numpy(model.weight))
        net[1].bias.copy_(torch.from_numpy(model.bias))
    return net


def _relaxed(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    model = fitted[("softmax", True)]
    net = _torch_logreg(model, dataset)
    rng = _rng(settings, 3)
    histories = {}
    for batch_size in settings.relaxed_batch_sizes:
        order = rng.choice(dataset.num_train, size=2 * batch_size, replace=False)
        target, start = order[:batch_size], order[batch_size:]
        found = relaxed_search(
            net,
            dataset.x_train[target].double(),
            dataset.y_train[target],
            dataset.x_train[start].double(),
            dataset.y_train[start],
            domain=dataset.domain,
            offset=dataset.offset,
            scale=dataset.scale,
            tolerance=settings.tolerance,
            lr=settings.lr,
            name="logreg (softmax, bias)",
            num_steps=settings.relaxed_steps,
        )
        histories[batch_size] = found
        row = asdict(found)
        row.pop("history")
        row["start"] = "other real examples"
        result.relaxed.append(row)
        if batch_size >= 2:
            result.relaxed.append(
                _project_construction(model, dataset, target, settings)
            )
    figure, axes = plt.subplots(figsize=(8, 4))
    for batch_size, found in histories.items():
        steps = np.linspace(0, settings.relaxed_steps, len(found.history))
        (line,) = axes.plot(steps, found.history, lw=1, label=f"b = {batch_size}")
        axes.plot(
            [settings.relaxed_steps],
            [found.projected_error],
            "o",
            color=line.get_color(),
            label=f"b = {batch_size} after projection",
        )
    axes.axhline(
        settings.tolerance, color="k", ls="--", label=f"tau = {settings.tolerance:.0e}"
    )
    axes.set_yscale("log")
    axes.set_xlabel("Adam step (continuous relaxation)")
    axes.set_ylabel("forging error lr * ||g(B) - g(B')||")
    axes.set_title(
        f"{dataset.name}, softmax regression: gradient matching, then projection",
        fontsize=9,
    )
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "relaxed_search.png", dpi=120)
    plt.close(figure)


def _project_construction(
    fitted: LinearModel,
    dataset: Dataset,
    target: np.ndarray,
    settings: TheorySettings,
) -> dict:
    """Project the exact real-valued construction onto the domain; its errors."""
    inputs = dataset.raw_train[target] / dataset.scale
    labels = one_hot(dataset.y_train.numpy()[target], 10)
    forged, forged_labels = construct_batch_forgery(fitted, inputs, labels)
    reference = fitted.batch_gradient(inputs, labels)

    def error(batch: np.ndarray, label_vectors: np.ndarray) -> float:
        gap = fitted.batch_gradient(batch, label_vectors) - reference
        return settings.lr * float(np.linalg.norm(gap))

    raw = forged * dataset.scale + dataset.offset
    step = dataset.domain.value_step or 1.0
    raw = np.clip(
        dataset.domain.value_min
        + step * np.round((raw - dataset.domain.value_min) / step),
        dataset.domain.value_min,
        dataset.domain.value_max,
    )
    projected = (raw - dataset.offset) / dataset.scale
    projected_labels = one_hot(forged_labels.argmax(axis=1), 10)
    return {
        "model": "logreg (softmax, bias)",
        "start": "closed-form construction",
        "batch_size": len(target),
        "tolerance": settings.tolerance,
        "lr": settings.lr,
        "initial_error": None,
        "relaxed_error": error(forged, forged_labels),
        "projected_error": error(projected, projected_labels),
        "relaxed_distinct": distinct_distance(forged, forged_labels, inputs, labels),
        "projected_equals_original": bool(
            np.array_equal(np.sort(projected, axis=0), np.sort(inputs, axis=0))
            and np.array_equal(projected_labels.sum(0), labels.sum(0))
        ),
        "projected_violation": asdict(
            domain_violation(
                forged, forged_labels, dataset.domain, dataset.offset, dataset.scale
            )
        ),
    }


# 3. neural networks


def _networks(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    count = settings.num_network_examples
    inputs, labels = dataset.x_train[:count], dataset.y_train[:count]
    figure, axes = plt.subplots(figsize=(8, 4))
    for name in NETWORK_MODELS[dataset.name]:
        torch.manual_seed(settings.seed)
        model = build_model(ModelSpec(name, dataset.domain.input_shape, 10))
        for summary in analyse_first_layers(model, name, inputs, labels):
            result.networks.append(asdict(summary))
            profile = singular_value_profile(model, inputs, labels, summary.layer)
            median = np.median(np.maximum(profile, 1e-20), axis=0)
            axes.plot(
                np.arange(1, len(median) + 1),
                median,
                marker="o",
                ms=3,
                label=f"{name} {summary.layer} ({summary.kind})",
            )
    axes.set_yscale("log")
    axes.set_xlim(0.5, 12.5)
    axes.set_xlabel("k")
    axes.set_ylabel("median sigma_k / sigma_1 of one example's gradient")
    axes.set_title(
        f"{dataset.name}: first-layer gradients of one example (float64)", fontsize=9
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "first_layer_spectrum.png", dpi=120)
    plt.close(figure)


# 4. float order


def _reorder(
    dataset: Dataset,
    out: Path,
    settings: TheorySettings,
    result: TheoryResult,
    fitted: dict,
) -> None:
    from forgelab.trace import Trace

    trace = Trace(out / "trace")
    dataset = dataset.subset(trace.num_train)
    model = trace.build_model()
    last = trace.load_checkpoint(len(trace.checkpoints) - 1)
    trace.load_weights_into(model, last)
    name = TRACE_MODELS[dataset.name]
    rng = _rng(settings, 4)
    positions = rng.choice(
        len(trace.checkpoints) - 1,
        size=min(settings.num_reorder_batches, len(trace.checkpoints) - 1),
        replace=False,
    )
    figure, axes = plt.subplots(figsize=(8, 4))
    for position in positions:
        indices = trace.load_checkpoint(int(position) + 1).batches[0]
        for size in (4, len(indices)):
            chosen = torch.as_tensor(np.asarray(indices[:size]))
            summary = reorder_gradients(
                model,
                trace.model_spec.loss,
                dataset.x_train[chosen],
                dataset.y_train[chosen],
                lr=settings.lr,
                num_orders=settings.num_orders,
                seed=settings.seed,
                name=name,
            )
            row = asdict(summary)
            row.pop("distances")
            distances = row.pop("update_distances")
            row["checkpoint_step"] = last.step
            result.reorder.append(row)
            if size > 4:
                axes.hist(
                    np.maximum(distances[1:], 1.1e-12),
                    bins=np.geomspace(1e-12, 1e-5, 50),
                    alpha=0.5,
                    label=f"batch of step {int(position) + 1} (0 drawn at 1e-12)",
                )
    tau = result.calibration["tolerance"]
    axes.axvline(tau, color="k", ls="--", label=f"calibrated tau = {tau:.2e}")
    axes.axvline(
        settings.tolerance,
        color="r",
        ls=":",
        label=f"paper tau = {settings.tolerance:.0e}",
    )
    axes.set_xscale("log")
    axes.set_xlabel(
        "L2 distance of float32 weights after one step: reordered vs original order"
    )
    axes.set_ylabel("orderings")
    axes.set_title(
        f"{dataset.name}/{name}, b = 100: reordering a batch changes the float32 step",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "float_order.png", dpi=120)
    plt.close(figure)


# report


def _e(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == float("inf"):
        return "none"
    return f"{value:.2e}"


def render_report(result: TheoryResult) -> str:
    """The Markdown report; every sentence quotes a number measured in ``result``."""
    settings = result.settings
    tau = settings["tolerance"]
    lr = settings["lr"]
    calibration = result.calibration
    lines = [
        f"# Can two batches share a gradient? ({result.dataset})",
        "",
        "Forging error of a batch B' replacing B: eta * ||g(B) - g(B')||, the weight "
        f"distance after one SGD step with eta = {lr:g}. Decisions use tau = "
        f"{tau:.1e} (the re-evaluation's threshold). For comparison, forgelab's "
        f"verifier calibrated tau = {calibration['tolerance']:.2e} on a "
        f"{calibration['num_steps']}-step {calibration['model']} trace of the first "
        f"{settings['trace_examples']} training examples "
        "(10 x the largest benign distance: "
        + ", ".join(f"{k} {v:.1e}" for k, v in calibration["benign"].items())
        + ").",
        "",
        "## 1. Linear models in closed form",
        "",
        "Single examples: with a bias the input is pinned (x' = x) and the label "
        "too; without one, (s x, y'(s)) has the same gradient for every s != 0, "
        "and is in the domain only if s x is on the grid and y'(s) is one-hot.",
        "",
        "| model | train acc. | examples | grid rescalings s x (s != 1) exist | "
        "candidates tried | distinct in-domain forgery | closest label gap | "
        "smallest gradient distance ||dg|| | zero residual (undecided) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.single:
        lines.append(
            f"| {row['model']} | {row['train_accuracy']:.1%} | {row['num_examples']} "
            f"| {row['num_with_rescaling']} | {row['num_candidates']} | "
            f"{row['num_forgeable']} ({row['fraction_forgeable']:.1%}) | "
            f"{_e(row['label_gap_min'])} | {_e(row['gradient_error_min'])} | "
            f"{row['num_zero_residuals']} |"
        )
    lines += [
        "",
        "Batches: inputs T X and residuals T^-T R with T = 0.75 I + 0.25 "
        "(cyclic shift) give exactly the same batch gradient.",
        "",
        "| model | b | relative gradient error (float64) | min distance to an "
        "original example | inputs out of range | off grid | labels not one-hot | "
        "largest label gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.constructions:
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['relative_error']:.1e} | "
            f"{row['distinct_distance']:.3f} | {row['fraction_out_of_range']:.1%} | "
            f"{row['fraction_off_grid']:.1%} | "
            f"{row['fraction_labels_not_one_hot']:.1%} | {row['max_label_gap']:.3f} |"
        )
    worst = max(row["relative_error"] for row in result.constructions)
    lines += [
        "",
        f"Largest relative error over {len(result.constructions)} constructions: "
        f"{worst:.1e} ({'within' if worst <= EXACT_RELATIVE else 'ABOVE'} "
        f"{EXACT_RELATIVE:.0e}).",
        "",
        "## 2. Search inside the domain",
        "",
        "Exact search over every example of a downsampled domain (softmax "
        "regression fitted to the downsampled training set):",
        "",
        "| model | image | b | examples in domain | distinct batches searched | "
        "decision at tau | within 100 tau | certificate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.exact:
        shape = "x".join(map(str, row["image_shape"]))
        decision = "FORGERY FOUND" if row["found"] else "no forgery"
        lines.append(
            f"| {row['model']} (acc. {row['train_accuracy']:.0%}) | {shape} | "
            f"{row['batch_size']} | {row['num_examples']} | {row['num_batches']:.3e} "
            f"| {decision} | {row['within'].get('100', 'n/a')} | "
            f"{row['certificate']} |"
        )
    lines += [
        "",
        "Full-size inputs, softmax regression with bias: gradient matching in the "
        "continuous relaxation (inputs in range, labels on the simplex; Adam, "
        f"{settings['relaxed_steps']} steps) started from other real examples, and "
        "the exact closed-form construction of section 1; each then projected onto "
        "the domain (round to the grid, clip, arg-max label):",
        "",
        "| b | started from | its error | real-valued result | after projection "
        "| real-valued inputs off grid | real-valued labels not one-hot | "
        "projection = original batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.relaxed:
        violation = row["projected_violation"]
        lines.append(
            f"| {row['batch_size']} | {row['start']} | {_e(row['initial_error'])} | "
            f"{row['relaxed_error']:.2e} | {row['projected_error']:.2e} | "
            f"{violation['fraction_off_grid']:.1%} | "
            f"{violation['fraction_labels_not_one_hot']:.1%} | "
            f"{'yes' if row['projected_equals_original'] else 'no'} |"
        )
    optimised = [r for r in result.relaxed if r["start"] != "closed-form construction"]
    closed = [r for r in result.relaxed if r["start"] == "closed-form construction"]

    def count(rows: list[dict], key: str) -> int:
        return sum(
            1
            for r in rows
            if r[key] <= tau
            and (key == "relaxed_error" or not r["projected_equals_original"])
        )

    lines += [
        "",
        f"Within tau before projection: {count(optimised, 'relaxed_error')} of "
        f"{len(optimised)} optimised batches and {count(closed, 'relaxed_error')} of "
        f"{len(closed)} closed-form constructions; after projection onto the "
        f"domain: {count(optimised, 'projected_error')} of {len(optimised)} and "
        f"{count(closed, 'projected_error')} of {len(closed)}.",
        "",
        "## 3. Neural networks: first-layer gradients",
        "",
        "| model | layer | kind | examples | rank one | max sigma2/sigma1 | "
        "median rank | input recovered exactly | max recovery error | "
        "label recovered |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.networks:
        lines.append(
            f"| {row['model']} | {row['layer']} | {row['kind']} | "
            f"{row['num_examples']} | {row['num_rank_one']} | "
            f"{row['max_second_singular_ratio']:.1e} | "
            f"{row['median_numerical_rank']:g} | "
            f"{'n/a' if row['num_recovered'] is None else row['num_recovered']} | "
            f"{_e(row['max_recovery_error'])} | {row['num_labels_recovered']} |"
        )
    lines += ["", *_network_implications(result.networks), ""]
    lines += [
        "## 4. Float order",
        "",
        f"Batches logged in the trace, at its last checkpoint (step "
        f"{result.reorder[0]['checkpoint_step']}). Gradient spread: largest "
        "eta * ||g_a - g_b|| between two orderings; weight spread: largest distance "
        "between the float32 weights W - eta g after one step (what the verifier "
        "compares).",
        "",
        "| model | b | orderings | all orderings? | distinct float32 gradients | "
        "gradient spread | distinct weights after the step | weight spread | "
        "weight spread / calibrated tau | weight spread / paper tau |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.reorder:
        lines.append(
            f"| {row['model']} | {row['batch_size']} | {row['num_orders']} | "
            f"{'yes' if row['exhaustive'] else 'no (sampled)'} | "
            f"{row['num_distinct']} | {row['max_distance']:.2e} | "
            f"{row['num_distinct_updates']} | {row['max_update_distance']:.2e} | "
            f"{row['max_update_distance'] / calibration['tolerance']:.3f} | "
            f"{row['max_update_distance'] / tau:.3f} |"
        )
    spread = max(row["max_update_distance"] for row in result.reorder)
    lines += [
        "",
        f"Largest weight spread {spread:.2e} is "
        f"{spread / calibration['tolerance']:.3f} of the calibrated tau and "
        f"{spread / tau:.3f} of the paper's tau.",
        "",
        "Figures: `single_example_family.png`, `batch_domain.png`, "
        "`relaxed_search.png`, `first_layer_spectrum.png`, `float_order.png`. "
        "All numbers: `theory.json`. Run time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _network_implications(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["kind"] != "linear":
            lines.append(
                f"- {row['model']} {row['layer']} is a convolution: its gradient has "
                f"median numerical rank {row['median_numerical_rank']:g}, not one "
                f"(largest sigma2/sigma1 {row['max_second_singular_ratio']:.2f})."
            )
            continue
        pinned = row["num_recovered"] or 0
        what = "pixels" if row["layer"] == "1.weight" else "layer inputs (features)"
        lines.append(
            f"- {row['model']} {row['layer']}: {row['num_rank_one']} of "
            f"{row['num_examples']} per-example gradients are rank one and "
            f"{pinned} recover their {what} exactly "
            f"(error <= {_e(row['max_recovery_error'])}); "
            f"{row['num_labels_recovered']} labels are read off the output bias "
            "gradient. For these examples the gradient fixes the "
            + (
                "example itself, so no distinct single example has the same gradient."
                if what == "pixels"
                else "features and the label; a distinct single-example forgery "
                "would need another image with identical convolutional features."
            )
        )
    return lines
