"""Replay verification of a trace with a calibrated tolerance.

A verifier recomputes every logged segment (a checkpoint, the batches after it, the
next checkpoint) and measures the reproduction error: the distance between the logged
checkpoint and the recomputed one. It accepts a step when that distance is at most the
tolerance tau (Suliman et al. 2025, Sec. 4; Thudi et al. 2022 define the same check).

With ``tolerance="auto"`` the verifier measures benign nondeterminism itself on a
random sample of segments, comparing its own recomputations with each other (never with
the logged weights, so a forged step cannot widen its own tolerance):

- the batch in a permuted order (a different summation order);
- a different number of threads;
- the whole segment in float64, rounded once to the trace's dtype: the correctly
  rounded result, against which the rounding error of the replay shows.

tau is the largest such distance times a safety factor (:data:`DEFAULT_SAFETY_FACTOR`).

For a stateful optimizer (SGD with momentum, Adam) the replay also restores the logged
optimizer state and compares the recomputed state with the next checkpoint's, one kind
of state tensor at a time (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``).
Each kind gets its own tolerance, calibrated the same way from the distances between
the benign recomputations, because Adam's second moments are orders of magnitude
smaller than its first moments and both live on other scales than the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from forgelab.data import Dataset
from forgelab.errors import TraceError, UndecidableError
from forgelab.models import as_model_input, compute_loss
from forgelab.optim import build_optimizer, import_state
from forgelab.trace import MANIFEST_NAME, Checkpoint, Trace
from forgelab.training import determinism

logger = logging.getLogger(__name__)

DEFAULT_SAFETY_FACTOR = 10.0
"""tau is this many times the largest benign distance the verifier measured.

Across different hardware the re-evaluation saw about 1e-6 against 1e-8 on one GPU, a
factor of 100 over its same-machine figure; fp32-versus-fp64 is itself an upper-range
measure of rounding error, so a factor of 10 over it covers summation-order and
thread-count effects with room to spare while staying far below the one-example
forging errors (about 3e-5 for LeNet/MNIST).
"""

DEFAULT_CALIBRATION_SEGMENTS = 8
MAX_BENIGN_SHARE = 0.05
"""Benign recomputations differing by more than this share of an update: undecidable."""
ProgressCallback = Callable[[int, int], None]


@dataclass
class SegmentResult:
    """Reproduction error of one replayed segment.

    Attributes:
        start_step: Step count of the segment's first checkpoint.
        end_step: Step count of its last checkpoint; steps ``start_step + 1`` to
            ``end_step`` were replayed.
        l2: L2 distance between logged and recomputed weights.
        linf: Largest absolute difference of one weight.
        update_norm: L2 norm of the logged update (end weights minus start weights).
        relative: ``l2 / update_norm``.
        state_l2: L2 distance of the whole optimizer state (0 for plain SGD).
        passed: Whether ``l2`` and every entry of ``state_errors`` are within their
            tolerances.
        state_errors: L2 distance per kind of optimizer state tensor (inf when the
            logged and recomputed state do not have the same entries).
    """

    start_step: int
    end_step: int
    l2: float
    linf: float
    update_norm: float
    relative: float
    state_l2: float = 0.0
    passed: bool = True
    state_errors: dict[str, float] = field(default_factory=dict)


@dataclass
class Calibration:
    """How the tolerance was chosen.

    Attributes:
        tolerance: The tolerance tau (L2, in weight space).
        method: ``"auto"`` or ``"fixed"``.
        safety_factor: Multiplier applied to the largest benign distance.
        benign: Largest benign distance per source (permuted, threads, float64).
        sampled_steps: End steps of the segments the calibration replayed.
        state_tolerances: Tolerance (L2) per kind of optimizer state tensor; a
            kind not listed (with a fixed tolerance) is held to ``tolerance``.
        benign_state: Largest benign distance per kind of state tensor and source.
    """

    tolerance: float
    method: str
    safety_factor: float = DEFAULT_SAFETY_FACTOR
    benign: dict[str, float] = field(default_factory=dict)
    sampled_steps: list[int] = field(default_factory=list)
    state_tolerances: dict[str, float] = field(default_factory=dict)
    benign_state: dict[str, dict[str, float]] = field(default_factory=dict)

    def state_tolerance(self, key: str) -> float:
        """The tolerance applied to one kind of optimizer state tensor."""
        return self.state_tolerances.get(key, self.tolerance)


@dataclass
class VerifyReport:
    """Outcome of verifying a trace.

    Attributes:
        accepted: True when every replayed segment passed. For an interrupted
            recording this covers the steps up to its last checkpoint.
        calibration: The tolerance and how it was obtained.
        segments: Per-segment reproduction errors and verdicts.
        complete: Whether the recording had finished.
        suspect_checkpoints: Checkpoints (by step) inconsistent with both the segment
            before and the segment after them: a tampered checkpoint makes both fail.
        schedule: What :func:`epoch_repeats` found in the batch schedule, or None
            where the trace does not say how many steps make an epoch. It does not
            enter the decision.
    """

    accepted: bool
    calibration: Calibration
    segments: list[SegmentResult]
    complete: bool
    suspect_checkpoints: list[int] = field(default_factory=list)
    schedule: dict | None = None

    @property
    def failed_steps(self) -> list[int]:
        """End steps of the segments that failed."""
        return [s.end_step for s in self.segments if not s.passed]

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return {
            "accepted": self.accepted,
            "complete": self.complete,
            "calibration": asdict(self.calibration),
            "failed_steps": self.failed_steps,
            "suspect_checkpoints": self.suspect_checkpoints,
            "schedule": self.schedule,
            "segments": [asdict(s) for s in self.segments],
        }


def check_dataset(trace: Trace, dataset: Dataset) -> None:
    """Refuse to replay a trace on data other than the data it claims.

    Raises:
        TraceError: If the dataset's name, fingerprint or size, or the input shape
            and number of classes the model was built for, differ from the verifier's
            copy of the data.
    """
    manifest = trace.root / MANIFEST_NAME
    claimed = trace.manifest["dataset"]
    if claimed["name"] != dataset.name:
        raise TraceError(
            f"{manifest}: dataset.name is {claimed['name']!r}, but the verifier "
            f"loaded {dataset.name!r}"
        )
    if claimed["fingerprint"] != dataset.fingerprint:
        raise TraceError(
            f"{manifest}: dataset.fingerprint {claimed['fingerprint']} "
            f"differs from the verifier's copy of {dataset.name} ({dataset.source}, "
            f"{dataset.fingerprint}); point --data-dir at the data the trace "
            "was recorded on"
        )
    if claimed["num_train"] != dataset.num_train:
        raise TraceError(
            f"{manifest}: dataset.num_train is {claimed['num_train']}, the "
            f"verifier's copy has {dataset.num_train} examples"
        )
    spec = trace.model_spec
    if spec.input_shape != dataset.domain.input_shape:
        raise TraceError(
            f"{manifest}: model.input_shape {list(spec.input_shape)} differs from "
            f"the dataset's {list(dataset.domain.input_shape)}"
        )
    if spec.num_classes != dataset.domain.num_classes:
        raise TraceError(
            f"{manifest}: model.num_classes {spec.num_classes} differs from the "
            f"dataset's {dataset.domain.num_classes}"
        )


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """Run a block with a given number of intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Replayer:
    """Recomputes segments of one trace on one dataset.

    Args:
        trace: The trace (validated on open).
        dataset: The verifier's copy of the claimed training data.
    """

    def __init__(self, trace: Trace, dataset: Dataset) -> None:
        check_dataset(trace, dataset)
        self.trace = trace
        self.dataset = dataset
        self.model = trace.build_model()
        self.names = [name for name, _ in self.model.named_parameters()]

    def replay(
        self,
        start: Checkpoint,
        batches: list[np.ndarray],
        *,
        dtype: torch.dtype | None = None,
        permute: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Replay batches from a checkpoint.

        Args:
            start: The checkpoint to start from (weights and optimizer state).
            batches: Example indices of each step.
            dtype: Compute in this dtype instead of the trace's.
            permute: If given, shuffle each batch's order with this generator.

        Returns:
            The recomputed weights, flattened, and the optimizer state as one float64
            vector per kind of state tensor.
        """
        weights, optimizer = self._replay(start, batches, dtype, permute)
        return weights, _state_by_key(optimizer, self.model)

    def _replay(
        self,
        start: Checkpoint,
        batches: list[np.ndarray],
        dtype: torch.dtype | None,
        permute: np.random.Generator | None,
    ) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        dtype = dtype or self.trace.dtype
        model = self.model.to(dtype)
        self.trace.load_weights_into(model, start)
        optimizer = build_optimizer(self.trace.optimizer, model)
        import_state(optimizer, model, start.optimizer_state)
        loss_name = self.trace.model_spec.loss
        for indices in batches:
            if permute is not None:
                indices = permute.permutation(indices)
            inputs = as_model_input(self.dataset.x_train[indices], dtype)
            labels = self.dataset.y_train[indices]
            optimizer.zero_grad(set_to_none=True)
            compute_loss(loss_name, model(inputs), labels).backward()
            optimizer.step()
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return weights.clone(), optimizer

    def flat(self, checkpoint: Checkpoint) -> torch.Tensor:
        """A checkpoint's weights, flattened in the model's parameter order."""
        return torch.cat([checkpoint.params[n].reshape(-1) for n in self.names])

    def state_by_key(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """A checkpoint's optimizer state, one float64 vector per kind of tensor."""
        parts: dict[str, list[torch.Tensor]] = {}
        for name in self.names:
            for key, value in checkpoint.optimizer_state.get(name, {}).items():
                parts.setdefault(key, []).append(value.reshape(-1).to(torch.float64))
        return {key: torch.cat(values) for key, values in sorted(parts.items())}

    def compare(self, start: Checkpoint, end: Checkpoint) -> SegmentResult:
        """Replay the segment from ``start`` to ``end`` and measure its error."""
        with determinism(self.trace.manifest["deterministic"]):
            weights, state = self.replay(start, end.batches)
        logged = self.flat(end).to(torch.float64)
        difference = weights.to(torch.float64) - logged
        update = float(
            torch.linalg.vector_norm(logged - self.flat(start).to(torch.float64))
        )
        l2 = float(torch.linalg.vector_norm(difference))
        state_errors = _state_distances(state, self.state_by_key(end))
        state_l2 = math.sqrt(sum(e**2 for e in state_errors.values()))
        return SegmentResult(
            start_step=start.step,
            end_step=end.step,
            l2=l2,
            linf=float(difference.abs().max()) if difference.numel() else 0.0,
            update_norm=update,
            relative=l2 / update if update > 0 else (0.0 if l2 == 0 else math.inf),
            state_l2=state_l2,
            state_errors=state_errors,
        )


def replay_segment(trace: Trace, dataset: Dataset, position: int) -> SegmentResult:
    """Replay one segment: a checkpoint, the batches after it, the next checkpoint.

    A segment needs nothing but its two checkpoint files and the data, so segments can
    be replayed independently, in any order, by separate processes or machines.

    Args:
        trace: The trace.
        dataset: The verifier's copy of the data.
        position: Index of the segment's end checkpoint in the manifest (>= 1).

    Returns:
        The reproduction error of the segment (``passed`` is left True; compare
        ``l2`` with a tolerance to decide).
    """
    if not 1 <= position < len(trace.checkpoints):
        raise ValueError(f"segment position must be in [1, {len(trace.checkpoints)})")
    replayer = Replayer(trace, dataset)
    start = trace.load_checkpoint(position - 1)
    return replayer.compare(start, trace.load_checkpoint(position))


def _state_distances(
    replayed: dict[str, torch.Tensor], logged: dict[str, torch.Tensor]
) -> dict[str, float]:
    """L2 distance per kind of state tensor; inf where the entries differ."""
    distances = {}
    for key in sorted(set(replayed) | set(logged)):
        a, b = replayed.get(key), logged.get(key)
        if a is None or b is None or a.shape != b.shape:
            distances[key] = math.inf
        else:
            distances[key] = float(torch.linalg.vector_norm(a - b))
    return distances


def _state_by_key(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for param in model.parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                parts.setdefault(key, []).append(
                    value.detach().reshape(-1).to(torch.float64)
                )
    return {key: torch.cat(values) for key, values in sorted(parts.items())}


def calibrate_tolerance(
    trace: Trace,
    dataset: Dataset,
    *,
    num_segments: int = DEFAULT_CALIBRATION_SEGMENTS,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
    seed: int = 0,
) -> Calibration:
    """Measure benign nondeterminism on a random sample of segments and derive tau.

    The verifier chooses the segments itself, with its own seed. Each sampled segment
    is replayed in the logged way, then with permuted batches, with a different thread
    count and in float64; the distances between these recomputations are the benign
    errors.

    Args:
        trace: The trace to calibrate for.
        dataset: The verifier's copy of the data.
        num_segments: How many segments to sample.
        safety_factor: Multiplier on the largest benign distance.
        seed: The verifier's seed for sampling segments and permutations.

    Returns:
        The calibration, with tau and its sources.
    """
    if safety_factor <= 0:
        raise ValueError(f"safety factor must be positive, got {safety_factor}")
    replayer = Replayer(trace, dataset)
    rng = np.random.default_rng(seed)
    count = len(trace.checkpoints) - 1
    if count < 1:
        raise TraceError(f"{trace.root}: no step to calibrate on (only checkpoint 0)")
    chosen = np.sort(rng.choice(count, size=min(num_segments, count), replace=False))
    benign = {"permuted": 0.0, "threads": 0.0, "float64": 0.0}
    benign_state: dict[str, dict[str, float]] = {}
    other_threads = 1 if torch.get_num_threads() > 1 else 2
    update_norms: list[float] = []
    state_norms: dict[str, list[float]] = {}
    for position in chosen:
        start = trace.load_checkpoint(int(position))
        end = trace.load_checkpoint(int(position) + 1)
        reference, reference_state = replayer.replay(start, end.batches)
        reference = reference.to(torch.float64)
        update_norms.append(
            float(torch.linalg.vector_norm(reference - replayer.flat(start).double()))
        )
        for key, value in reference_state.items():
            state_norms.setdefault(key, []).append(
                float(torch.linalg.vector_norm(value))
            )
        permuted = replayer.replay(start, end.batches, permute=rng)
        with num_threads(other_threads):
            threaded = replayer.replay(start, end.batches)
        # the float64 replay rounded once to the trace's dtype: the closest result
        # any implementation in that dtype could produce
        precise_weights, precise_state = replayer.replay(
            start, end.batches, dtype=torch.float64
        )
        precise = (
            precise_weights.to(trace.dtype),
            {
                key: value.to(trace.dtype).to(torch.float64)
                for key, value in precise_state.items()
            },
        )
        for source, (weights, state) in (
            ("permuted", permuted),
            ("threads", threaded),
            ("float64", precise),
        ):
            distance = float(
                torch.linalg.vector_norm(weights.to(torch.float64) - reference)
            )
            benign[source] = max(benign[source], distance)
            for key, state_distance in _state_distances(state, reference_state).items():
                sources = benign_state.setdefault(key, dict.fromkeys(benign, 0.0))
                # mismatched entries (inf) must never widen a tolerance
                if math.isfinite(state_distance):
                    sources[source] = max(sources[source], state_distance)
    # if every benign recomputation agreed exactly, fall back to one unit of
    # round-off on the size of a typical update (or state) rather than zero
    eps = torch.finfo(trace.dtype).eps
    largest = max(benign.values())
    tolerance = safety_factor * max(largest, eps * float(np.median(update_norms)))
    state_tolerances = {
        key: safety_factor
        * max(max(benign_state[key].values()), eps * float(np.median(norms)))
        for key, norms in state_norms.items()
    }
    # a tolerance that is not finite, or benign recomputations that disagree by a
    # sizeable share of the update (randomness in the model, e.g. dropout), would
    # accept anything: the verifier cannot decide and says so instead
    typical_update = float(np.median(update_norms))
    if not math.isfinite(tolerance) or not all(
        math.isfinite(t) for t in state_tolerances.values()
    ):
        raise UndecidableError(
            f"{trace.root}: benign recomputations overflow (non-finite distances); "
            "cannot calibrate a tolerance for this trace"
        )
    if largest > MAX_BENIGN_SHARE * typical_update:
        raise UndecidableError(
            f"{trace.root}: benign recomputations of the same step differ by "
            f"{largest:.2e}, {largest / typical_update:.0%} of a typical update "
            f"({typical_update:.2e}); replay is not reproducible (randomness in the "
            "model such as dropout?), so no tolerance can separate honest from forged"
        )
    logger.info("calibrated tolerance %.3e from %s", tolerance, benign)
    return Calibration(
        tolerance=tolerance,
        method="auto",
        safety_factor=safety_factor,
        benign=benign,
        sampled_steps=[trace.checkpoints[int(p) + 1].step for p in chosen],
        state_tolerances=state_tolerances,
        benign_state=benign_state,
    )


def epoch_repeats(batches: dict[int, np.ndarray], steps_per_epoch: int) -> dict:
    """Examples that a batch schedule uses more than once within one epoch.

    One shuffled pass over the data per epoch, as forgelab's trainer and most data
    loaders make, uses every example at most once per epoch. A forged trace that
    keeps the original schedule but claims a smaller dataset cannot: the slots of
    the removed examples are filled with examples the epoch already holds. Thudi et
    al. (USENIX Security 2022) forge the batches of a step and Suliman et al. (2025)
    replay them; neither looks at the schedule as a whole.

    Args:
        batches: Batch indices by step (steps numbered from 1).
        steps_per_epoch: Steps of one epoch.

    Returns:
        ``steps_per_epoch``, ``repeated_examples`` (surplus uses summed over epochs)
        and ``epochs_with_repeats`` (0-based epoch numbers).
    """
    by_epoch: dict[int, list[np.ndarray]] = {}
    for step, batch in batches.items():
        by_epoch.setdefault((step - 1) // steps_per_epoch, []).append(batch)
    repeats = {}
    for epoch, parts in sorted(by_epoch.items()):
        indices = np.concatenate(parts)
        surplus = len(indices) - len(np.unique(indices))
        if surplus:
            repeats[epoch] = int(surplus)
    return {
        "steps_per_epoch": steps_per_epoch,
        "repeated_examples": sum(repeats.values()),
        "epochs_with_repeats": sorted(repeats),
    }


def _steps_per_epoch(trace: Trace) -> int | None:
    manifest = trace.manifest
    epochs, total = manifest.get("num_epochs"), manifest.get("total_steps")
    valid = isinstance(epochs, int) and isinstance(total, int) and epochs > 0
    if valid and total > 0 and total % epochs == 0:
        return total // epochs
    return None


def verify_trace(
    trace: Trace,
    dataset: Dataset,
    *,
    tolerance: float | None = None,
    calibration: Calibration | None = None,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
    num_calibration_segments: int = DEFAULT_CALIBRATION_SEGMENTS,
    seed: int = 0,
    callback: ProgressCallback | None = None,
) -> VerifyReport:
    """Replay every segment of a trace and decide whether it is consistent.

    Args:
        trace: The trace to verify.
        dataset: The verifier's copy of the claimed data.
        tolerance: A fixed tau; None calibrates one (see :func:`calibrate_tolerance`).
        calibration: A calibration measured earlier, used instead of a new one.
        safety_factor: Multiplier for the automatic tolerance.
        num_calibration_segments: Segments sampled by the automatic calibration.
        seed: The verifier's seed.
        callback: Called with ``(segments_done, total_segments)``.

    Returns:
        Per-segment errors, verdicts and the overall decision.

    Raises:
        TraceError: If the trace holds no step, or a checkpoint is malformed.
    """
    if len(trace.checkpoints) < 2:
        raise TraceError(
            f"{trace.root / MANIFEST_NAME}: lists only checkpoint 0; there is no step "
            "to verify"
        )
    replayer = Replayer(trace, dataset)
    if calibration is None:
        if tolerance is None:
            calibration = calibrate_tolerance(
                trace,
                dataset,
                num_segments=num_calibration_segments,
                safety_factor=safety_factor,
                seed=seed,
            )
        else:
            if not tolerance >= 0:
                raise ValueError(f"tolerance must be non-negative, got {tolerance}")
            calibration = Calibration(
                tolerance=tolerance, method="fixed", safety_factor=1
            )
    tau = calibration.tolerance
    results: list[SegmentResult] = []
    total = len(trace.checkpoints) - 1
    start = trace.load_checkpoint(0)
    batches: dict[int, np.ndarray] = {}
    for position in range(1, len(trace.checkpoints)):
        # load the next checkpoint, replay the segment, compare
        end = trace.load_checkpoint(position)
        first = end.step - len(end.batches) + 1
        for offset, batch in enumerate(end.batches):
            batches[first + offset] = np.asarray(batch)
        result = replayer.compare(start, end)
        # a non-finite error never passes, whatever the tolerance
        result.passed = (
            math.isfinite(result.l2)
            and result.l2 <= tau
            and all(
                math.isfinite(error) and error <= calibration.state_tolerance(key)
                for key, error in result.state_errors.items()
            )
        )
        if not result.passed:
            logger.info(
                "step %d fails: l2 %.3e (tau %.3e), state errors %s",
                end.step,
                result.l2,
                tau,
                result.state_errors,
            )
        results.append(result)
        start = end
        if callback is not None:
            callback(position, total)
    suspects = [
        before.end_step
        for before, after in zip(results, results[1:], strict=False)
        if not before.passed and not after.passed
    ]
    per_epoch = _steps_per_epoch(trace)
    return VerifyReport(
        accepted=all(r.passed for r in results),
        calibration=calibration,
        segments=results,
        complete=trace.complete,
        suspect_checkpoints=suspects,
        schedule=epoch_repeats(batches, per_epoch) if per_epoch else None,
    )
