"""Figures, JSON and Markdown for verification and forging results.

Figures use matplotlib's non-interactive Agg backend so that they render without a
display.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forgelab.attacks import CheckpointForgery  # noqa: E402
from forgelab.replay import VerifyReport  # noqa: E402
from forgelab.trace import write_atomic  # noqa: E402


def write_json(path: Path, payload: dict) -> None:
    """Write a JSON document atomically (NaN and inf become null)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return clean(float(value))
        return value

    write_atomic(path, json.dumps(clean(payload), indent=1).encode())


def _positive(values: list[float], floor: float) -> list[float]:
    return [max(v, floor) for v in values]


def _log_axis(axes: plt.Axes, drawn: list[float]) -> None:
    """A logarithmic y axis; a decade around the values when they are all equal."""
    positive = [v for v in drawn if v > 0 and math.isfinite(v)]
    if positive and min(positive) == max(positive):
        axes.set_ylim(positive[0] / 10, positive[0] * 10)
    axes.set_yscale("log")


def plot_verification(report: VerifyReport, path: Path, title: str = "") -> Path:
    """Plot the reproduction error of every replayed step against the tolerance.

    Zero errors are drawn at a floor far below the tolerance so the log scale can
    show them; the legend says so.
    """
    tau = report.calibration.tolerance
    steps = [s.end_step for s in report.segments]
    errors = [s.l2 for s in report.segments]
    floor = tau * 1e-6 if tau > 0 else 1e-16
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot(
        steps, _positive(errors, floor), ".", ms=3, label="reproduction error (L2)"
    )
    failed = [s for s in report.segments if not s.passed]
    if failed:
        axes.plot(
            [s.end_step for s in failed],
            [max(s.l2, floor) for s in failed],
            "rx",
            label="failed step",
        )
    axes.axhline(
        max(tau, floor), color="k", ls="--", label=f"tolerance tau = {tau:.2e}"
    )
    _log_axis(axes, [*_positive(errors, floor), max(tau, floor)])
    axes.set_xlabel("step")
    axes.set_ylabel("L2 distance to logged checkpoint")
    zero = sum(1 for e in errors if e == 0)
    note = f" ({zero} steps with error exactly 0 drawn at {floor:.0e})" if zero else ""
    axes.set_title((title or "Replay verification") + note, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_forging(
    records: list[CheckpointForgery],
    tolerance: float,
    path: Path,
    reproduction: dict[int, float] | None = None,
    title: str = "",
) -> Path:
    """Plot forging error per checkpoint, one line per run, against the tolerance."""
    runs: dict[int, list[CheckpointForgery]] = defaultdict(list)
    for record in records:
        runs[record.run].append(record)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for run, rows in sorted(runs.items()):
        rows.sort(key=lambda r: r.step)
        axes.plot(
            [r.step for r in rows],
            [r.forging_error for r in rows],
            marker="o",
            ms=3,
            lw=1,
            alpha=0.7,
            label="forging error, one line per run" if run == 0 else None,
        )
    drawn = [r.forging_error for r in records]
    floor = tolerance * 1e-6 if tolerance > 0 else 1e-16
    if reproduction:
        steps = sorted(reproduction)
        values = [reproduction[s] for s in steps]
        zero = sum(1 for v in values if v == 0)
        note = f" ({zero} exactly 0, drawn at {floor:.0e})" if zero else ""
        axes.plot(
            steps,
            _positive(values, floor),
            "k.",
            label=f"reproduction error of the logged step{note}",
        )
        drawn += _positive(values, floor)
    axes.axhline(
        max(tolerance, floor),
        color="k",
        ls="--",
        label=f"tolerance tau = {tolerance:.2e}",
    )
    _log_axis(axes, [*drawn, max(tolerance, floor)])
    axes.set_xlabel("checkpoint (step)")
    axes.set_ylabel("L2 distance after one step")
    axes.set_title(title or "Forging error vs tolerance", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_detection(
    path: Path,
    *,
    title: str,
    tolerance: float,
    honest: tuple[list[int], list[float]],
    benign: tuple[list[int], list[float]],
    forged: tuple[list[int], list[float]],
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
) -> Path:
    """Plot one attack's forged replay errors against honest ones, and its ROC.

    Args:
        path: Where to write the PNG.
        title: Figure title.
        tolerance: The calibrated tau.
        honest: Steps and replay errors of the honest steps.
        benign: Steps and errors of honest steps replayed with a permuted batch.
        forged: Steps and replay errors of the forged steps.
        curves: ROC curves by label: ``(false positive rate, true positive rate,
            AUC)``.

    Returns:
        ``path``.
    """
    values = [v for _, errors in (honest, benign, forged) for v in errors if v > 0]
    floor = min([tolerance, *values]) * 1e-3 if tolerance > 0 or values else 1e-16
    figure, (errors_axes, roc_axes) = plt.subplots(
        1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    for (steps, errors), style, label in (
        (honest, dict(color="0.6", marker=".", ms=3, ls=""), "honest replay"),
        (
            benign,
            dict(color="tab:blue", marker="^", ms=4, ls=""),
            "honest, batch permuted",
        ),
        (forged, dict(color="tab:red", marker="x", ms=6, ls=""), "forged step"),
    ):
        if steps:
            zero = sum(1 for e in errors if e <= 0)
            note = f" ({zero} exactly 0, drawn at {floor:.0e})" if zero else ""
            errors_axes.plot(
                steps, _positive(list(errors), floor), label=label + note, **style
            )
    errors_axes.axhline(tolerance, color="k", ls="--", label=f"tau = {tolerance:.2e}")
    errors_axes.set_yscale("log")
    errors_axes.set_xlabel("step")
    errors_axes.set_ylabel("replay error (L2 to logged checkpoint)")
    errors_axes.legend(
        fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2
    )
    for label, (fpr, tpr, auc) in curves.items():
        roc_axes.plot(fpr, tpr, drawstyle="steps-post", label=f"{label}: AUC {auc:.3f}")
    roc_axes.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    roc_axes.set_xlabel("honest steps rejected")
    roc_axes.set_ylabel("forged steps rejected")
    roc_axes.set_xlim(-0.02, 1.02)
    roc_axes.set_ylim(-0.02, 1.02)
    roc_axes.legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


@dataclass
class CheckpointSummary:
    """Forging errors at one checkpoint, across runs, next to the tolerance."""

    step: int
    reproduction_error: float | None
    tolerance: float
    minimum: float
    median: float
    maximum: float
    paper_minimum: float
    num_detected: int
    num_runs: int

    @property
    def margin(self) -> float:
        """Smallest forging error divided by the tolerance."""
        return self.minimum / self.tolerance if self.tolerance > 0 else math.inf


def summarise_forging(
    records: list[CheckpointForgery],
    tolerance: float,
    reproduction: dict[int, float] | None = None,
) -> list[CheckpointSummary]:
    """Group forging records by checkpoint and compare each with the tolerance."""
    steps: dict[int, list[float]] = defaultdict(list)
    paper: dict[int, list[float]] = defaultdict(list)
    for record in records:
        steps[record.step].append(record.forging_error)
        paper[record.step].append(record.paper_error)
    return [
        CheckpointSummary(
            step=step,
            reproduction_error=(reproduction or {}).get(step),
            tolerance=tolerance,
            minimum=float(np.min(errors)),
            median=float(np.median(errors)),
            maximum=float(np.max(errors)),
            paper_minimum=float(np.min(paper[step])),
            num_detected=sum(1 for e in errors if e > tolerance),
            num_runs=len(errors),
        )
        for step, errors in sorted(steps.items())
    ]


def reproduction_by_start(report: VerifyReport) -> dict[int, float]:
    """Reproduction error of the logged step that starts at each checkpoint."""
    return {s.start_step: s.l2 for s in report.segments}
