"""How often a replay verifier catches each forging attack on one trace.

For a removal claim (a set R of examples the owner says it never used), every attack
forges the steps whose batch touches R, at the original weights, exactly as
:func:`forgelab.forgery.forge_trace` does with ``keep-checkpoints``. One verifier run
on the original trace calibrates the tolerance tau and replays every honest step;
the same verifier (same replayer, same tau) then replays each forged step with its
forged batch against the logged checkpoints. Per attack this gives:

- the forging errors ``eta ||g(B) - g(B')||`` the attack reached;
- the verifier's replay error of each forged step, and the detection rate at tau
  (a step is rejected when its replay error exceeds tau, as in
  :func:`forgelab.replay.verify_trace`);
- the margin: the smallest forged replay error divided by tau;
- the ROC curve and AUC of the replay error as a score separating forged steps from
  honest ones, with the honest steps' replay errors from the same verifier run. On
  one machine honest replays are usually exact (error 0), which makes any forgery
  with a non-zero error separable; a second ROC uses honest steps replayed with their
  batch in another order (a benign change of summation order, as a verifier on other
  hardware would see), which is the harder comparison.

The approach follows the re-evaluation (Suliman et al. 2025, Sec. 5): compare the
errors forging leaves with the benign error of re-running a step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from forgelab.attacks import (
    ATTACKS,
    AttackContext,
    attack_defaults,
    attack_options,
    check_attack,
    require_sgd,
)
from forgelab.data import Dataset
from forgelab.errors import ConfigError
from forgelab.forgery import ForgedStep, forge_segment, without
from forgelab.replay import (
    DEFAULT_SAFETY_FACTOR,
    Replayer,
    VerifyReport,
    check_dataset,
    verify_trace,
)
from forgelab.trace import Checkpoint, Trace

logger = logging.getLogger(__name__)

DEFAULT_MAX_STEPS = 10
"""Forged steps evaluated per attack when the removed set touches more."""

DEFAULT_BENIGN_STEPS = 20
"""Honest steps replayed with a permuted batch for the benign ROC."""


def roc_curve(
    honest: np.ndarray, forged: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the rule "reject a step whose error exceeds tau", over every tau.

    Args:
        honest: Errors of honest steps (negatives).
        forged: Errors of forged steps (positives).

    Returns:
        ``(false_positive_rate, true_positive_rate, thresholds)``, from the strictest
        threshold (nothing rejected) to the loosest (everything rejected).
    """
    honest = np.asarray(honest, dtype=np.float64)
    forged = np.asarray(forged, dtype=np.float64)
    if len(honest) == 0 or len(forged) == 0:
        raise ConfigError("an ROC needs at least one honest and one forged step")
    values = np.unique(np.concatenate([honest, forged]))[::-1]
    thresholds = np.concatenate([values, [-np.inf]])
    fpr = np.array([np.mean(honest > t) for t in thresholds])
    tpr = np.array([np.mean(forged > t) for t in thresholds])
    return fpr, tpr, thresholds


def roc_auc(honest: np.ndarray, forged: np.ndarray) -> float:
    """Area under the ROC: P(forged error > honest error), ties counting one half."""
    fpr, tpr, _ = roc_curve(honest, forged)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


@dataclass
class AttackEvaluation:
    """One attack against one trace.

    Attributes:
        attack: Attack name.
        options: Its options (published defaults unless overridden).
        steps: The forged steps evaluated (end steps of their segments).
        forging_errors: Per step, ``eta ||g(B) - g(B')||`` summed over the forged
            steps of the segment (one value per segment for interval 1).
        replay_errors: Per step, the verifier's L2 distance between the logged
            checkpoint and the replay with the forged batch.
        num_replaced: Examples replaced in each segment.
        tolerance: The calibrated tau.
        honest_errors: Replay errors of the honest steps, same verifier run.
        benign_errors: Replay errors of honest steps with their batch permuted.
        seconds: Time the attack took over all its steps.
        records: Every forged step.
    """

    attack: str
    options: dict
    steps: list[int]
    forging_errors: list[float]
    replay_errors: list[float]
    num_replaced: list[int]
    tolerance: float
    honest_errors: list[float] = field(repr=False, default_factory=list)
    benign_errors: list[float] = field(repr=False, default_factory=list)
    seconds: float = 0.0
    records: list[ForgedStep] = field(repr=False, default_factory=list)

    @property
    def num_detected(self) -> int:
        """Forged steps the verifier rejects at tau."""
        return sum(1 for e in self.replay_errors if e > self.tolerance)

    @property
    def detection_rate(self) -> float:
        """Fraction of forged steps rejected at tau."""
        return self.num_detected / len(self.replay_errors)

    @property
    def false_rejection_rate(self) -> float:
        """Fraction of honest steps rejected at tau."""
        errors = self.honest_errors
        return sum(1 for e in errors if e > self.tolerance) / max(1, len(errors))

    @property
    def margin(self) -> float:
        """Smallest forged replay error divided by tau."""
        smallest = min(self.replay_errors)
        return smallest / self.tolerance if self.tolerance > 0 else math.inf

    @property
    def auc(self) -> float:
        """AUC against the honest replay errors of the same verifier run."""
        return roc_auc(np.array(self.honest_errors), np.array(self.replay_errors))

    @property
    def benign_auc(self) -> float:
        """AUC against honest steps replayed with a permuted batch."""
        if not self.benign_errors:
            return math.nan
        return roc_auc(np.array(self.benign_errors), np.array(self.replay_errors))

    def summary(self) -> dict:
        """The figures of the evaluate table."""
        errors = np.array(self.forging_errors)
        return {
            "attack": self.attack,
            "num_steps": len(self.steps),
            "num_replaced_median": float(np.median(self.num_replaced)),
            "forging_error_min": float(errors.min()),
            "forging_error_median": float(np.median(errors)),
            "forging_error_max": float(errors.max()),
            "replay_error_min": float(min(self.replay_errors)),
            "tolerance": self.tolerance,
            "margin": self.margin,
            "num_detected": self.num_detected,
            "detection_rate": self.detection_rate,
            "false_rejection_rate": self.false_rejection_rate,
            "auc": self.auc,
            "benign_auc": self.benign_auc,
            "seconds": self.seconds,
        }

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return self.summary() | {
            "options": self.options,
            "steps": self.steps,
            "forging_errors": self.forging_errors,
            "replay_errors": self.replay_errors,
            "num_replaced": self.num_replaced,
            "records": [r.__dict__ for r in self.records],
        }


@dataclass
class Evaluation:
    """Every attack against one trace, with the verifier run they share.

    Attributes:
        trace: The trace.
        removed: Indices of the removed examples.
        verification: The verifier's run on the original trace.
        honest_steps: End steps of the honest segments (not touching the removed set).
        honest_errors: Their replay errors.
        benign_steps: Honest steps replayed with a permuted batch.
        benign_errors: Those replays' distance to the logged checkpoint.
        touched_steps: Every step that touches the removed set.
        attacks: One evaluation per attack.
    """

    trace: Trace
    removed: np.ndarray
    verification: VerifyReport
    honest_steps: list[int]
    honest_errors: list[float]
    benign_steps: list[int]
    benign_errors: list[float]
    touched_steps: list[int]
    attacks: list[AttackEvaluation]

    @property
    def tolerance(self) -> float:
        """The calibrated tau."""
        return self.verification.calibration.tolerance

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return {
            "trace": str(self.trace.root),
            "removed": [int(i) for i in self.removed],
            "tolerance": self.tolerance,
            "calibration": self.verification.calibration.__dict__,
            "honest_steps": self.honest_steps,
            "honest_errors": self.honest_errors,
            "benign_steps": self.benign_steps,
            "benign_errors": self.benign_errors,
            "touched_steps": self.touched_steps,
            "attacks": [a.to_json() for a in self.attacks],
        }


def evaluate_attacks(
    trace: Trace,
    dataset: Dataset,
    removed: np.ndarray,
    *,
    attacks: list[str] | None = None,
    num_candidates: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    num_benign: int = DEFAULT_BENIGN_STEPS,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
    seed: int = 2024,
    verifier_seed: int = 0,
    callback: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Run attacks against one trace and measure how the verifier separates them.

    Args:
        trace: An honest SGD trace.
        dataset: Its training data.
        removed: Indices of the examples the forged trace must not use.
        attacks: Attack names; all of :data:`forgelab.attacks.ATTACKS` by default.
        num_candidates: M for every attack that takes one; None keeps each
            attack's published default.
        max_steps: Forged steps evaluated per attack: a random sample (by ``seed``)
            of the steps that touch the removed set, when there are more.
        num_benign: Honest steps replayed with a permuted batch.
        safety_factor: Multiplier of the calibrated tolerance.
        seed: Seed of the step sample and the attacks.
        verifier_seed: The verifier's seed (calibration and permutations).
        callback: Called with ``(stage, done, total)``.

    Returns:
        The evaluation.
    """
    names = list(attacks or ATTACKS)
    for name in names:
        check_attack(name)
    if max_steps < 1 or num_benign < 0:
        raise ConfigError("--max-steps must be >= 1 and --benign-steps >= 0")
    require_sgd(trace)
    check_dataset(trace, dataset)
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    _, kept = without(dataset, removed)

    # one verifier run: tolerance and the honest replay errors
    report = verify_trace(
        trace,
        dataset,
        safety_factor=safety_factor,
        seed=verifier_seed,
        callback=None if callback is None else lambda d, t: callback("verifying", d, t),
    )
    touched_positions, touched_steps = [], []
    for position in range(1, len(trace.checkpoints)):
        checkpoint = trace.load_checkpoint(position)
        hits = [
            checkpoint.step - len(checkpoint.batches) + offset + 1
            for offset, batch in enumerate(checkpoint.batches)
            if np.isin(batch, removed).any()
        ]
        if hits:
            touched_positions.append(position)
            touched_steps.extend(hits)
    if not touched_positions:
        raise ConfigError(
            f"no step of {trace.root} uses any of the {len(removed)} removed examples"
        )
    touched = set(touched_positions)
    honest = [s for p, s in enumerate(report.segments, start=1) if p not in touched]
    if not honest:
        raise ConfigError("every step touches the removed set; no honest step is left")
    rng = np.random.default_rng([seed, len(removed)])
    chosen = sorted(
        rng.choice(
            touched_positions,
            size=min(max_steps, len(touched_positions)),
            replace=False,
        ).tolist()
    )
    benign_steps, benign_errors = _benign_errors(
        trace, dataset, [s.end_step for s in honest], num_benign, verifier_seed
    )

    # each attack forges the chosen steps; the same verifier replays them
    replayer = Replayer(trace, dataset)
    segments = {
        p: (trace.load_checkpoint(p - 1), trace.load_checkpoint(p)) for p in chosen
    }
    model = trace.build_model()
    context = AttackContext(
        model,
        trace.model_spec.loss,
        dataset.x_train,
        dataset.y_train,
        trace.optimizer.lr,
    )
    evaluations = []
    for name in names:
        options = attack_options(
            name,
            num_candidates=num_candidates
            if "num_candidates" in attack_defaults(name)
            else None,
        )
        evaluation = AttackEvaluation(
            attack=name,
            options=options,
            steps=[],
            forging_errors=[],
            replay_errors=[],
            num_replaced=[],
            tolerance=report.calibration.tolerance,
            honest_errors=[s.l2 for s in honest],
            benign_errors=benign_errors,
        )
        started = time.perf_counter()
        for done, position in enumerate(chosen, start=1):
            start, end = segments[position]
            batches, records = forge_segment(
                trace,
                dataset,
                context,
                start,
                end,
                removed,
                kept,
                attack=name,
                options=options,
                seed=seed,
            )
            forged_end = Checkpoint(end.step, end.params, end.optimizer_state, batches)
            replayed = replayer.compare(start, forged_end)
            evaluation.steps.append(end.step)
            evaluation.forging_errors.append(sum(r.forging_error for r in records))
            evaluation.replay_errors.append(replayed.l2)
            evaluation.num_replaced.append(sum(len(r.slots) for r in records))
            evaluation.records.extend(records)
            if callback is not None:
                callback(name, done, len(chosen))
        evaluation.seconds = time.perf_counter() - started
        logger.info(
            "%s: %d/%d forged steps detected, margin %.3g",
            name,
            evaluation.num_detected,
            len(chosen),
            evaluation.margin,
        )
        evaluations.append(evaluation)
    return Evaluation(
        trace=trace,
        removed=removed,
        verification=report,
        honest_steps=[s.end_step for s in honest],
        honest_errors=[s.l2 for s in honest],
        benign_steps=benign_steps,
        benign_errors=benign_errors,
        touched_steps=touched_steps,
        attacks=evaluations,
    )


def _benign_errors(
    trace: Trace,
    dataset: Dataset,
    honest_steps: list[int],
    count: int,
    seed: int,
) -> tuple[list[int], list[float]]:
    """Replay sampled honest segments with each batch permuted; distance to the log."""
    if count == 0:
        return [], []
    rng = np.random.default_rng([seed, 1])
    steps = sorted(
        rng.choice(honest_steps, size=min(count, len(honest_steps)), replace=False)
    )
    position_of = {entry.step: p for p, entry in enumerate(trace.checkpoints)}
    replayer = Replayer(trace, dataset)
    errors = []
    for step in steps:
        position = position_of[int(step)]
        start = trace.load_checkpoint(position - 1)
        end = trace.load_checkpoint(position)
        weights, _ = replayer.replay(start, end.batches, permute=rng)
        logged = replayer.flat(end).to(torch.float64)
        errors.append(float(torch.linalg.vector_norm(weights.double() - logged)))
    return [int(s) for s in steps], errors
