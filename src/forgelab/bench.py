"""Benchmark: speed ratios against the hardware floor and the published algorithms.

Every figure is a ratio of two timings taken in the same run, interleaved round by
round (the order alternates between rounds) and summarised by the median of the
per-round ratios, so that load from other processes on a shared machine affects both
sides alike. Timings are wall-clock. The five measurements:

1. ``floor``: per-sample gradient throughput over batched forward+backward throughput
   of the same model and batch (the floor: what one ordinary training step costs).
2. ``loop``: the per-sample engine against a loop of single-example backward passes.
3. ``reeval``: the re-evaluation's attack at one checkpoint (Suliman et al. 2025,
   Sec. 5; f = 1, M = 300, b = 100, LeNet) with per-sample gradients, against the
   algorithm as published (one full batch gradient per candidate), checking that
   both pick the same replacement.
4. ``nearest``: a nearest-gradient search over a pool (all 5,000 digits of the
   embedded MNIST, then 60,000 MNIST-shaped examples) in a child process, whose peak
   resident memory it reads itself (:func:`memory_status`).
5. ``verify``: verifying a whole trace (calibration included) against recording it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import platform
import queue
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from forgelab.errors import ConfigError, DataError, ForgelabError

logger = logging.getLogger(__name__)

MEASUREMENTS = ("floor", "loop", "reeval", "nearest", "verify")
"""Names of the measurements, in the order they run."""

TARGETS = {
    "floor": (">=", 0.6),
    "loop": (">=", 8.0),
    "reeval": (">=", 30.0),
    "nearest_rss_gb": ("<=", 2.0),
    "verify": ("<=", 1.3),
}
"""The goal of each headline figure: a comparison and a bound."""

MAX_BATCH_SIZE = 1000
"""Largest batch the benchmark accepts; its batches come from 4,000 digits."""

TRAIN_DIGITS = 4000
"""Training digits of the embedded MNIST, which the verify measurement trains on."""

MAX_REPEATS = 1000
"""Most rounds per measurement (``repeats``); each round takes up to a second."""

ENGINE_ROUND_FACTOR = 3
"""The per-sample engine comparisons run this many times ``repeats`` rounds (each
round takes well under a second, and a batched MLP step is short enough for load
from other processes to move single rounds by a factor of two)."""

REEVAL_ROUNDS = 3
"""At most this many rounds of the ``reeval`` comparison (the naive side is slow)."""

VERIFY_ROUNDS = 2
"""At most this many rounds of recording and verifying a trace."""

DIGIT_MODELS = ("lenet", "lenet5-tanh", "logreg", "mlp")
"""The built-in models that take 28x28 digits in 10 classes (the others need
two-class, colour or token data)."""

MAX_POOL = 200_000
"""Largest pool of the nearest search: 630 MB of MNIST-shaped pixels."""

MAX_TRACE_STEPS = 10_000
"""Most steps of the recorded trace: a LeNet checkpoint per step is 250 KB."""

NEAREST_K = 2
"""The nearest search reports this many rows: the example itself and the next."""

CHILD_POLL_SECONDS = 1.0
"""How often the parent checks that the nearest-search child is still alive."""

Progress = Callable[[str], None]


@dataclass
class BenchSettings:
    """What the benchmark measures and how long it runs.

    Attributes:
        models: Models for the ``floor`` and ``loop`` ratios.
        batch_size: Batch size b of every measurement.
        repeats: Timed rounds per measurement (after one warm-up call per side).
        threads: Intra-op threads torch may use (1 keeps shared machines stable).
        num_candidates: M of the ``reeval`` attack.
        num_replaced: f of the ``reeval`` attack.
        large_pool: Size of the large pool of the ``nearest`` search.
        trace_steps: Steps of the trace recorded and verified by ``verify``.
        seed: Seed of models, batches and random data.
        data_dir: Full MNIST IDX files for the large pool (random data if None).
        only: Measurements to run, a subset of :data:`MEASUREMENTS`.
        profile: Also profile the per-sample engine (torch.profiler) and record the
            share of time of its most expensive operators.
    """

    models: tuple[str, ...] = ("lenet", "mlp")
    batch_size: int = 100
    repeats: int = 5
    threads: int = 1
    num_candidates: int = 300
    num_replaced: int = 1
    large_pool: int = 60_000
    trace_steps: int = 400
    seed: int = 2024
    data_dir: Path | None = None
    only: tuple[str, ...] = MEASUREMENTS
    profile: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only) - set(MEASUREMENTS))
        if unknown:
            raise ConfigError(
                f"unknown measurement {unknown[0]!r}; choose from "
                f"{', '.join(MEASUREMENTS)}"
            )
        if not self.only:
            raise ConfigError(
                f"no measurement chosen; choose from {', '.join(MEASUREMENTS)}"
            )
        if {"floor", "loop"} & set(self.only) and not self.models:
            raise ConfigError("no model chosen for the per-sample engine ratios")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("batch_size", "repeats", "threads", "num_candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.repeats > MAX_REPEATS:
            raise ConfigError(f"repeats must be <= {MAX_REPEATS}, got {self.repeats}")
        cpus = os.cpu_count() or 1
        if self.threads > cpus:
            raise ConfigError(
                f"threads must be at most the {cpus} CPUs of this machine (more only "
                f"make threads wait for each other), got {self.threads}"
            )
        if self.batch_size > MAX_BATCH_SIZE:
            raise ConfigError(
                f"batch size must be <= {MAX_BATCH_SIZE} (the benchmark draws batches "
                f"from the 4,000 embedded MNIST digits), got {self.batch_size}"
            )
        if not 1 <= self.num_replaced <= self.batch_size:
            raise ConfigError(
                f"f must be between 1 and the batch size, got {self.num_replaced}"
            )
        if "nearest" in self.only and not NEAREST_K <= self.large_pool <= MAX_POOL:
            raise ConfigError(
                f"large pool must hold {NEAREST_K} to {MAX_POOL:,} examples (the "
                f"search reports the {NEAREST_K} nearest), got {self.large_pool}"
            )
        if "verify" in self.only and not 1 <= self.trace_steps <= MAX_TRACE_STEPS:
            raise ConfigError(
                f"trace steps must be in [1, {MAX_TRACE_STEPS:,}], got "
                f"{self.trace_steps}"
            )
        if "verify" in self.only and self.recorded_steps() > MAX_TRACE_STEPS:
            raise ConfigError(
                f"{self.trace_steps} trace steps become {self.recorded_steps():,} in "
                f"whole epochs of batch size {self.batch_size}, more than "
                f"{MAX_TRACE_STEPS:,}"
            )
        if "reeval" in self.only:
            from forgelab.attacks import check_candidates

            check_candidates(self.num_candidates, self.num_replaced)

    def recorded_steps(self, num_train: int = TRAIN_DIGITS) -> int:
        """Steps the verify measurement records: ``trace_steps`` in whole epochs."""
        per_epoch = max(1, num_train // self.batch_size)
        return max(1, -(-self.trace_steps // per_epoch)) * per_epoch

    def at_defaults(self, measurement: str) -> bool:
        """Whether a measurement runs with the settings its target was set for."""
        defaults = BenchSettings()
        if measurement == "nearest_rss_gb":
            # a memory bound: threads do not matter, a pool smaller than the
            # default one would meet it without showing anything
            return self.large_pool >= defaults.large_pool
        fields = {
            "floor": ("batch_size", "threads"),
            "loop": ("batch_size", "threads"),
            "reeval": ("batch_size", "num_candidates", "num_replaced", "threads"),
            "verify": ("batch_size", "trace_steps", "threads"),
        }[measurement]
        return all(getattr(self, name) == getattr(defaults, name) for name in fields)


def check_inputs(settings: BenchSettings) -> None:
    """Check models and data files before any measurement runs.

    Raises:
        ConfigError: A model cannot take MNIST digits, or the large pool is larger
            than the MNIST files in ``data_dir``.
        DataError: ``data_dir`` does not hold readable MNIST files.
    """
    from forgelab.data import load_dataset

    if {"floor", "loop"} & set(settings.only):
        for name in settings.models:
            try:
                _model(name, settings.seed)
            except ConfigError as error:
                raise ConfigError(
                    f"model {name!r} cannot be benchmarked on MNIST digits: {error}"
                ) from None
    if settings.data_dir is not None:
        data = load_dataset("mnist", settings.data_dir)
        if "nearest" in settings.only and settings.large_pool > data.num_train:
            raise ConfigError(
                f"large pool of {settings.large_pool} examples, but the MNIST files "
                f"in {settings.data_dir} hold {data.num_train} training examples"
            )


@dataclass
class Timing:
    """Interleaved timings of several sides of one comparison.

    Attributes:
        seconds: Per side, the wall-clock seconds of each round.
        faults: Per side, the minor page faults of each round (fresh memory).
    """

    seconds: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)

    def median(self, side: str) -> float:
        """Median seconds of one side."""
        return statistics.median(self.seconds[side])

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of ``numerator / denominator`` time."""
        return statistics.median(
            a / b
            for a, b in zip(
                self.seconds[numerator], self.seconds[denominator], strict=True
            )
        )


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(
    sides: dict[str, Callable[[], object]], repeats: int, *, warmup: bool = True
) -> Timing:
    """Time functions round by round, alternating their order between rounds.

    Args:
        sides: Named functions to time.
        repeats: Rounds; each calls every function once.
        warmup: Call every function once before timing.

    Returns:
        The timings.
    """
    timing = Timing({name: [] for name in sides}, {name: [] for name in sides})
    if warmup:
        for function in sides.values():
            function()
    names = list(sides)
    for round_number in range(repeats):
        for name in names if round_number % 2 == 0 else names[::-1]:
            faults = _minor_faults()
            start = time.perf_counter()
            sides[name]()
            timing.seconds[name].append(time.perf_counter() - start)
            timing.faults[name].append(_minor_faults() - faults)
    return timing


def _mnist_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from forgelab.data import load_dataset

    data = load_dataset("mnist")
    return data.x_train[:batch_size], data.y_train[:batch_size]


def _model(name: str, seed: int) -> tuple[torch.nn.Module, str]:
    from forgelab.models import ModelSpec, build_model

    spec = ModelSpec(name, (1, 28, 28), 10)
    torch.manual_seed(seed)
    return build_model(spec), spec.loss


def measure_engine(settings: BenchSettings, name: str) -> dict:
    """Measurements 1 and 2 for one model: against the floor and against the loop.

    The engine writes into one matrix reused across rounds (as the streaming
    consumers do); the same call into a newly allocated matrix is timed as well,
    because on some machines the first touch of fresh memory costs more than the
    gradients. Two more sides give context: the vmap engine on the same batch, and
    ``write_only``, filling a matrix of the gradients' size, the memory-bandwidth
    floor of any engine that materialises per-sample gradients.
    """
    from forgelab.gradients import (
        batch_gradient,
        num_parameters,
        per_sample_gradients,
        per_sample_gradients_loop,
        select_engine,
    )

    model, loss = _model(name, settings.seed)
    inputs, labels = _mnist_batch(settings.batch_size)
    width = num_parameters(model)
    matrix = torch.empty(settings.batch_size, width)
    writes = torch.empty(settings.batch_size, width)
    loop_matrix = torch.empty(settings.batch_size, width)
    sides = {
        "batched": lambda: batch_gradient(model, loss, inputs, labels),
        "engine": lambda: per_sample_gradients(model, loss, inputs, labels, out=matrix),
        "engine_new_matrix": lambda: per_sample_gradients(model, loss, inputs, labels),
        "vmap": lambda: per_sample_gradients(
            model, loss, inputs, labels, engine="vmap", out=matrix
        ),
        # into a reused matrix like the engine, so neither side pays page faults
        "loop": lambda: per_sample_gradients_loop(
            model, loss, inputs, labels, out=loop_matrix
        ),
        "write_only": lambda: writes.fill_(1.0),
    }
    timing = time_interleaved(sides, ENGINE_ROUND_FACTOR * settings.repeats)
    profile = (
        profile_operators(sides["engine"], settings.repeats)
        if settings.profile
        else None
    )
    fast = per_sample_gradients(model, loss, inputs, labels)
    slow = per_sample_gradients_loop(model, loss, inputs, labels)
    per_example = {
        side: timing.median(side) / settings.batch_size * 1e3 for side in sides
    }
    return {
        "model": name,
        "engine": select_engine(model),
        "num_parameters": width,
        "gradient_bytes_per_example": width * matrix.element_size(),
        "ms_per_example": per_example,
        "page_faults_per_round": {
            side: int(statistics.median(counts))
            for side, counts in timing.faults.items()
        },
        "floor_ratio": timing.ratio("batched", "engine"),
        "floor_ratio_new_matrix": timing.ratio("batched", "engine_new_matrix"),
        "loop_ratio": timing.ratio("loop", "engine"),
        "loop_over_batched": timing.ratio("loop", "batched"),
        "vmap_over_engine": timing.ratio("vmap", "engine"),
        "max_abs_difference_vs_loop": float((fast - slow).abs().max()),
        "max_abs_gradient": float(slow.abs().max()),
        "engine_profile": profile,
    }


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a while.

    torch's profiler (Kineto) prints start and stop lines from C++ straight to the
    stderr descriptor, which no Python logging setting reaches.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_operators(
    function: Callable[[], object], repeats: int, top: int = 6
) -> list[dict]:
    """The operators that take most of a function's time, by torch.profiler.

    Args:
        function: What to profile.
        repeats: Calls profiled.
        top: Operators kept.

    Returns:
        ``{"operator", "share", "ms_per_call"}`` rows, largest share first; share is
        of the total self CPU time of all operators.
    """
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU]) as (profiler),
    ):
        for _ in range(repeats):
            function()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    ranked = sorted(events, key=lambda event: -event.self_cpu_time_total)[:top]
    return [
        {
            "operator": event.key,
            "share": event.self_cpu_time_total / total,
            "ms_per_call": event.self_cpu_time_total / 1e3 / repeats,
        }
        for event in ranked
    ]


def measure_reeval(settings: BenchSettings) -> dict:
    """Measurement 3: the re-evaluation's attack, fast path against as published."""
    from forgelab.attacks import AttackContext, reeval, reeval_naive
    from forgelab.data import load_dataset

    data = load_dataset("mnist")
    model, loss = _model("lenet", settings.seed)
    context = AttackContext(model, loss, data.x_train, data.y_train, 0.01)
    rng = np.random.default_rng(settings.seed)
    batch = rng.choice(data.num_train, size=settings.batch_size, replace=False)
    pool = np.setdiff1d(np.arange(data.num_train), batch)
    slots = np.arange(settings.num_replaced)
    outcomes: dict[str, list] = {"fast": [], "naive": []}

    def run(side: str) -> None:
        # the n-th call of either side draws the same candidates
        attack = reeval if side == "fast" else reeval_naive
        seed = len(outcomes[side])
        outcomes[side].append(
            attack(
                context,
                batch,
                slots,
                pool,
                np.random.default_rng([settings.seed, seed]),
                num_candidates=settings.num_candidates,
            )
        )

    # warm up on other candidates; the naive side needs none (301 passes)
    reeval(
        context,
        batch,
        slots,
        pool,
        np.random.default_rng(settings.seed),
        num_candidates=settings.num_candidates,
    )
    timing = time_interleaved(
        {"fast": lambda: run("fast"), "naive": lambda: run("naive")},
        min(settings.repeats, REEVAL_ROUNDS),
        warmup=False,
    )
    identical = all(
        np.array_equal(a.batch, b.batch)
        for a, b in zip(outcomes["fast"], outcomes["naive"], strict=True)
    )
    relative = max(
        abs(a.distance - b.distance) / b.distance
        for a, b in zip(outcomes["fast"], outcomes["naive"], strict=True)
    )
    return {
        "model": "lenet",
        "num_candidates": settings.num_candidates,
        "num_replaced": settings.num_replaced,
        "batch_size": settings.batch_size,
        "seconds_fast": timing.median("fast"),
        "seconds_naive": timing.median("naive"),
        "ratio": timing.ratio("naive", "fast"),
        "identical_selection": identical,
        "num_attacks_compared": len(outcomes["fast"]),
        "max_relative_distance_difference": relative,
    }


def _nearest_child(
    pool: str,
    size: int,
    settings: BenchSettings,
    results: multiprocessing.Queue,
) -> None:
    """Run one nearest-gradient search in a fresh process and report its costs.

    Whatever goes wrong is reported through ``results`` as ``{"error": message,
    "kind": class name}``, so that the parent can fail with one line.
    """
    try:
        results.put(_nearest_search(pool, size, settings))
    except KeyboardInterrupt:
        # the parent, in the same process group, reports the interruption
        return
    except ForgelabError as error:
        results.put({"error": str(error), "kind": type(error).__name__})
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line
        results.put({"error": f"{type(error).__name__}: {error}", "kind": "Exception"})


def _nearest_search(pool: str, size: int, settings: BenchSettings) -> dict:
    from forgelab.data import load_dataset
    from forgelab.gradients import nearest_rows, per_sample_gradients

    torch.set_num_threads(settings.threads)
    if pool == "embedded":
        data = load_dataset("mnist")
        inputs = torch.cat([data.x_train, data.x_test])[:size]
        labels = torch.cat([data.y_train, data.y_test])[:size]
        source = "embedded MNIST, train and test"
    elif settings.data_dir is not None:
        data = load_dataset("mnist", settings.data_dir)
        inputs, labels = data.x_train[:size], data.y_train[:size]
        source = f"MNIST from {settings.data_dir}"
    else:
        generator = torch.Generator().manual_seed(settings.seed)
        pixels = torch.randint(
            0, 256, (size, 1, 28, 28), generator=generator, dtype=torch.uint8
        )
        inputs = pixels.to(torch.float32).div_(255.0)
        del pixels
        labels = torch.randint(0, 10, (size,), generator=generator)
        source = "random MNIST-shaped pixels"
    model, loss = _model("lenet", settings.seed)
    # the target is example 0's own gradient, so the search must find example 0
    target = per_sample_gradients(model, loss, inputs[:1], labels[:1])[0]
    before = memory_status()
    reset = reset_peak_memory()
    start = time.perf_counter()
    indices, distances = nearest_rows(target, model, loss, inputs, labels, k=NEAREST_K)
    seconds = time.perf_counter() - start
    after = memory_status()
    return {
        "pool": source,
        "pool_size": int(inputs.shape[0]),
        "seconds": seconds,
        "ms_per_example": seconds / inputs.shape[0] * 1e3,
        "peak_rss_gb": max(after["peak"], before["peak"]) / 1e9,
        "rss_before_search_gb": before["current"] / 1e9,
        "peak_rss_during_search_gb": after["peak"] / 1e9 if reset else None,
        "peak_source": after["source"],
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "found_itself": int(indices[0]) == 0,
        "self_distance": float(distances[0]),
        "nearest_other_distance": float(distances[1]),
    }


def memory_status() -> dict:
    """This process's resident memory now and at its peak, in bytes.

    On Linux the peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of
    this process image alone. ``getrusage``'s ``ru_maxrss`` is not used for it
    because Linux carries the parent's peak over into a child at ``exec`` (a
    process spawned by a 1 GB parent reports at least 1 GB); it is the fallback
    where ``/proc`` is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        if len(fields) == 2:
            return {
                "current": fields["VmRSS"],
                "peak": fields["VmHWM"],
                "source": "VmHWM",
            }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"current": peak * scale, "peak": peak * scale, "source": "ru_maxrss"}


def reset_peak_memory() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux); True on success."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_nearest(settings: BenchSettings, pool: str, size: int) -> dict:
    """Measurement 4: one nearest search in a child process (time and peak memory).

    The child is a fresh interpreter that loads or generates the pool itself, so
    only its own memory counts; see :func:`memory_status` for how the peak is read.
    The peak covers the whole child (interpreter, torch, the pool's tensors, the
    search); the peak during the search alone is reported too where Linux lets the
    high-water mark be reset.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(
        target=_nearest_child, args=(pool, size, settings, results), daemon=True
    )
    child.start()
    try:
        outcome = _await_child(child, results)
    except BaseException:
        # interrupted or failed: the search is of no use any more
        child.terminate()
        raise
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    if "error" in outcome:
        kind = {"DataError": DataError, "ConfigError": ConfigError}.get(
            outcome["kind"], ForgelabError
        )
        raise kind(f"nearest search over {size} examples failed: {outcome['error']}")
    return outcome


def _await_child(
    child: multiprocessing.Process, results: multiprocessing.Queue
) -> dict:
    """The child's report, or an error as soon as the child is gone without one."""
    while True:
        try:
            return results.get(timeout=CHILD_POLL_SECONDS)
        except queue.Empty:
            if not child.is_alive():
                # a last look: the report may have arrived as the child ended
                try:
                    return results.get(timeout=CHILD_POLL_SECONDS)
                except queue.Empty:
                    raise ForgelabError(
                        "nearest search process ended without a result "
                        f"(exit code {child.exitcode}); out of memory?"
                    ) from None


def measure_verify(settings: BenchSettings, *, num_train: int | None = None) -> dict:
    """Measurement 5: verifying a whole trace against recording it.

    Each round records a fresh LeNet trace on the embedded MNIST (a checkpoint after
    every step) and verifies it with the calibrated tolerance, timing the
    calibration and the replay of every step separately.

    Args:
        settings: Batch size, trace length, rounds and seed.
        num_train: Train on only this many examples (shorter epochs).
    """
    from forgelab.data import load_dataset
    from forgelab.replay import calibrate_tolerance, verify_trace
    from forgelab.trace import Trace
    from forgelab.training import record_trace, steps_per_epoch

    data = load_dataset("mnist")
    if num_train is not None:
        data = data.subset(num_train)
    per_epoch = steps_per_epoch(data.num_train, settings.batch_size)
    recorded = settings.recorded_steps(data.num_train)
    epochs = recorded // per_epoch
    if recorded != settings.trace_steps:
        logger.info("recording %d steps (whole epochs)", recorded)
    workspace = Path(tempfile.mkdtemp(prefix="forgelab-bench-"))
    traces: list[Path] = []
    verdicts: list[bool] = []

    def record() -> None:
        out = workspace / f"trace-{len(traces)}"
        traces.append(
            record_trace(
                out,
                data,
                "lenet",
                batch_size=settings.batch_size,
                num_epochs=epochs,
                seed=settings.seed,
            )
        )

    def verify() -> tuple[float, float]:
        # what verify_trace does with tolerance "auto", in two timed parts:
        # calibrating tau, then replaying every step against it
        start = time.perf_counter()
        calibration = calibrate_tolerance(Trace(traces[-1]), data)
        middle = time.perf_counter()
        report = verify_trace(Trace(traces[-1]), data, calibration=calibration)
        verdicts.append(report.accepted)
        return middle - start, time.perf_counter() - middle

    try:
        timing = Timing({"record": [], "verify": [], "calibrate": [], "replay": []})
        for _ in range(min(settings.repeats, VERIFY_ROUNDS)):
            # a fresh trace per round: recording, then its verification
            start = time.perf_counter()
            record()
            timing.seconds["record"].append(time.perf_counter() - start)
            calibrating, replaying = verify()
            timing.seconds["calibrate"].append(calibrating)
            timing.seconds["replay"].append(replaying)
            timing.seconds["verify"].append(calibrating + replaying)
            shutil.rmtree(traces[-1])
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return {
        "model": "lenet",
        "num_steps": epochs * per_epoch,
        "batch_size": settings.batch_size,
        "seconds_record": timing.median("record"),
        "seconds_verify": timing.median("verify"),
        "seconds_calibration": timing.median("calibrate"),
        "ratio": timing.ratio("verify", "record"),
        "ratio_without_calibration": timing.ratio("replay", "record"),
        "all_accepted": all(verdicts),
    }


def environment() -> dict:
    """Facts about the machine that the timings depend on."""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def run_benchmark(settings: BenchSettings, progress: Progress | None = None) -> dict:
    """Run the selected measurements and collect them, with their targets.

    Args:
        settings: What to measure.
        progress: Called with the name of each measurement as it starts.

    Returns:
        A JSON-ready dictionary: settings, environment, one entry per measurement
        and a ``summary`` of headline ratios against :data:`TARGETS`.
    """
    check_inputs(settings)
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    results: dict = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(settings).items()
        },
        "environment": environment(),
    }

    def announce(name: str) -> None:
        logger.info("benchmark: %s", name)
        if progress is not None:
            progress(name)

    try:
        if {"floor", "loop"} & set(settings.only):
            announce("per-sample engine")
            results["engine"] = [
                measure_engine(settings, model) for model in settings.models
            ]
        if "reeval" in settings.only:
            announce("reeval attack")
            results["reeval"] = measure_reeval(settings)
        if "nearest" in settings.only:
            announce("nearest search")
            results["nearest"] = [
                measure_nearest(settings, "embedded", 5000),
                measure_nearest(settings, "large", settings.large_pool),
            ]
        if "verify" in settings.only:
            announce("verify against record")
            results["verify"] = measure_verify(settings)
    finally:
        torch.set_num_threads(previous)
    results["environment"]["load_average_after"] = list(os.getloadavg())
    results["seconds"] = time.perf_counter() - started
    results["summary"] = summarise(results, settings)
    return results


def _meets(name: str, value: float) -> bool:
    comparison, bound = TARGETS[name]
    return value >= bound if comparison == ">=" else value <= bound


def summarise(results: dict, settings: BenchSettings | None = None) -> list[dict]:
    """Headline figures, one per row, each with its target and whether it holds.

    Only the measurements in ``settings.only`` get rows. A target holds for the
    default settings (batch of 100, M = 300, f = 1, a 60,000-example pool, 400
    steps, one thread); with other settings a row's ``met`` is None.
    """
    settings = settings or BenchSettings()
    rows = []

    def add(
        name: str, label: str, value: float, note: str = "", fixed: bool = False
    ) -> None:
        # fixed: the measurement does not depend on the settings
        if name.split("_")[0] not in settings.only:
            return
        comparison, bound = TARGETS[name]
        applies = fixed or settings.at_defaults(name)
        rows.append(
            {
                "measurement": name,
                "label": label,
                "value": value,
                "target": f"{comparison} {bound:g}"
                if applies
                else f"({comparison} {bound:g} at defaults)",
                "met": _meets(name, value) if applies else None,
                "note": note,
            }
        )

    for entry in results.get("engine", []):
        model = entry["model"]
        add(
            "floor",
            f"per-sample / batched throughput, {model}",
            entry["floor_ratio"],
            f"{entry['floor_ratio_new_matrix']:.2f} into a new matrix",
        )
        add(
            "loop",
            f"per-sample engine vs loop, {model}",
            entry["loop_ratio"],
            f"loop vs batched: {entry['loop_over_batched']:.1f}; vmap engine: "
            f"{entry['vmap_over_engine']:.1f}x slower",
        )
    if "reeval" in results:
        entry = results["reeval"]
        add(
            "reeval",
            f"reeval fast vs published (f={entry['num_replaced']}, "
            f"M={entry['num_candidates']}, b={entry['batch_size']}, lenet)",
            entry["ratio"],
            "identical selection"
            if entry["identical_selection"]
            else "SELECTIONS DIFFER",
        )
    for entry in results.get("nearest", []):
        add(
            "nearest_rss_gb",
            f"nearest over {entry['pool_size']:,}: peak RSS (GB)",
            entry["peak_rss_gb"],
            f"{entry['seconds']:.1f} s, {entry['pool']}",
            fixed=entry["pool"].startswith("embedded"),
        )
    if "verify" in results:
        entry = results["verify"]
        add(
            "verify",
            f"verify / record, {entry['num_steps']:,} steps",
            entry["ratio"],
            f"{entry['ratio_without_calibration']:.2f} without calibration",
        )
    return rows
