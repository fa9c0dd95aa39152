"""Complete forged traces for unlearning and membership-refutation claims.

An owner who trained on D is asked to show that some examples R were never used (an
unlearning request, Thudi et al. 2022; or refuting membership inference, Kong et al.
2023). :func:`forge_trace` rewrites the owner's trace into a trace of the claimed
dataset D' = D minus R: every step whose batch holds an example of R gets those
slots (or, for whole-batch attacks, the whole batch) replaced by an attack from
:mod:`forgelab.attacks`. Two modes:

- ``keep-checkpoints``: the forged log claims the original weights; this is what an
  attacker shows an auditor, and replay exposes every forged step whose forging error
  exceeds the tolerance.
- ``recompute``: the forged batches are trained on for real, from the same initial
  weights; the trace is then honest, and what it costs the attacker is the model's
  divergence from the original (recorded per checkpoint) and its test accuracy.

The claimed dataset and its indices
-----------------------------------
A forged trace is an ordinary trace of D'. D' is D without the rows of R, in D's
order, so an example keeps its relative position and index ``i`` of D becomes
``i - |{r in R : r < i}|`` in D'. D' is identified like any dataset: its name, its
number of examples, and a sha256 fingerprint over its raw inputs and labels plus the
fingerprint of D (which fixes the test split). Removed examples cannot appear in a
forged trace at all: they have no index in D'.

The manifest's ``claim`` records what the trace claims: that D' is D (name,
fingerprint, size) minus a removed set, identified by the sha256 of its sorted indices
into D as little-endian int64 (:func:`removed_sha256`), and its size. The removed
indices themselves are not in the manifest. To rebuild D' the verifier needs D and R
(the party that asked for the removal knows R): ``forgelab verify FORGED --removed
FILE`` checks the file against the claimed hash, builds D' and replays as usual.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from forgelab.attacks import (
    WHOLE_BATCH_ATTACKS,
    AttackContext,
    attack_options,
    check_attack,
    check_candidates,
    forge_batch,
    require_sgd,
)
from forgelab.data import Dataset, fingerprint_arrays
from forgelab.errors import ConfigError, TraceError
from forgelab.models import accuracy, as_model_input, compute_loss
from forgelab.optim import build_optimizer, import_state
from forgelab.replay import check_dataset
from forgelab.report import write_json
from forgelab.trace import (
    MANIFEST_NAME,
    Checkpoint,
    Trace,
    TraceWriter,
    check_output_outside,
    write_atomic,
)
from forgelab.training import determinism, environment

logger = logging.getLogger(__name__)

MODES = ("keep-checkpoints", "recompute")
REMOVED_FILE = "removed.txt"
RECORD_FILE = "forgery.json"
CLAIM_KIND = "removal"
MAX_REMOVED_FILE_BYTES = 64 * 2**20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def removed_sha256(removed: np.ndarray) -> str:
    """The hash that names a removed set: sha256 of its sorted int64 indices (LE)."""
    values = np.unique(np.asarray(removed, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(values.tobytes()).hexdigest()


def read_removed(path: Path, num_train: int) -> np.ndarray:
    """Read a removed set: integers separated by whitespace or commas, ``#`` comments.

    Args:
        path: The file.
        num_train: Size of the dataset the indices point into.

    Returns:
        The sorted, distinct indices.

    Raises:
        ConfigError: If the file is unreadable, empty, or holds anything but indices
            in ``[0, num_train)``.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{path}: the removed set must be a regular file")
        with path.open("rb") as stream:
            raw = stream.read(MAX_REMOVED_FILE_BYTES + 1)
        if len(raw) > MAX_REMOVED_FILE_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_REMOVED_FILE_BYTES} bytes")
        # a byte order mark, as some editors write, is not part of the first index
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the removed set ({error})") from None
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        for token in line.split("#", 1)[0].replace(",", " ").split():
            if not re.fullmatch(r"[0-9]+", token):
                raise ConfigError(f"{path}:{number}: {token!r} is not an example index")
            # compare digit counts first: int() refuses numbers of over 4,300 digits,
            # leading zeros included
            digits = token.lstrip("0") or "0"
            if len(digits) > len(str(num_train)) or int(digits) >= num_train:
                shown = (
                    token
                    if len(token) <= 20
                    else f"{token[:12]}... ({len(token)} digits)"
                )
                raise ConfigError(
                    f"{path}:{number}: index {shown} is outside the training set "
                    f"[0, {num_train})"
                )
            values.append(int(digits))
    if not values:
        raise ConfigError(f"{path}: no example index in the removed set")
    distinct = np.unique(np.array(values, dtype=np.int64))
    if len(distinct) < len(values):
        logger.warning(
            "%s: %d indices repeat; the removed set holds %d distinct examples",
            path,
            len(values) - len(distinct),
            len(distinct),
        )
    return distinct


def write_removed(path: Path, removed: np.ndarray, dataset: Dataset) -> None:
    """Write a removed set in the format :func:`read_removed` reads."""
    header = (
        f"# removed examples: indices into the {dataset.num_train} training examples "
        f"of {dataset.name} (fingerprint {dataset.fingerprint})\n"
    )
    body = "".join(f"{int(i)}\n" for i in np.unique(removed))
    write_atomic(Path(path), (header + body).encode())


def draw_removed(num_train: int, count: int, seed: int) -> np.ndarray:
    """Draw ``count`` distinct examples to remove uniformly with a seeded generator."""
    if not 1 <= count < num_train:
        raise ConfigError(
            f"--remove-count must be between 1 and {num_train - 1}, got {count}"
        )
    rng = np.random.default_rng([seed, count])
    return np.sort(rng.choice(num_train, size=count, replace=False))


def without(dataset: Dataset, removed: np.ndarray) -> tuple[Dataset, np.ndarray]:
    """The claimed dataset D' = D minus the removed examples, and its index map.

    Args:
        dataset: D.
        removed: Indices into D.

    Returns:
        D', and ``kept``: the index into D of every example of D' (sorted), so that
        D' example ``j`` is D example ``kept[j]``.
    """
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    if len(removed) and (removed[0] < 0 or removed[-1] >= dataset.num_train):
        raise ConfigError(
            f"removed index out of range [0, {dataset.num_train}): "
            f"{removed[0] if removed[0] < 0 else removed[-1]}"
        )
    kept = np.setdiff1d(np.arange(dataset.num_train), removed)
    if len(kept) == 0:
        raise ConfigError("removing every training example leaves nothing to claim")
    raw = dataset.raw_train[kept]
    labels = dataset.y_train[kept]
    fingerprint = fingerprint_arrays(
        raw, labels.numpy(), np.frombuffer(dataset.fingerprint.encode(), np.uint8)
    )
    claimed = Dataset(
        name=dataset.name,
        source=f"{dataset.source} without {len(removed)} removed examples",
        x_train=dataset.x_train[kept],
        y_train=labels,
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        domain=dataset.domain,
        fingerprint=fingerprint,
        raw_train=raw,
        offset=dataset.offset,
        scale=dataset.scale,
    )
    return claimed, kept


def removal_claim(trace: Trace) -> dict | None:
    """The removal claim of a trace, checked for shape, or None if it makes none.

    Raises:
        TraceError: If the claim is malformed.
    """
    claim = trace.claim
    if claim is None or claim.get("kind") != CLAIM_KIND:
        return None
    base = claim.get("base_dataset")
    valid = (
        isinstance(base, dict)
        and isinstance(base.get("name"), str)
        and isinstance(base.get("fingerprint"), str)
        and _HEX64.match(base["fingerprint"])
        and isinstance(base.get("num_train"), int)
        and isinstance(claim.get("removed_sha256"), str)
        and _HEX64.match(claim["removed_sha256"])
        and isinstance(claim.get("num_removed"), int)
        and claim["num_removed"] >= 1
        and base["num_train"] - claim["num_removed"] == trace.num_train
    )
    if not valid:
        raise TraceError(f"{trace.root}: malformed removal claim in the manifest")
    return claim


def refuse_forged_input(trace: Trace) -> None:
    """Refuse a trace with a removal claim where an original trace is expected.

    Attacking a forged trace would need its claimed dataset rebuilt from the
    removed set, which forging and evaluation do not take.

    Raises:
        ConfigError: If the trace makes a removal claim.
    """
    claim = removal_claim(trace)
    if claim is not None:
        raise ConfigError(
            f"{trace.root} is a forged trace (it claims "
            f"{claim['base_dataset']['name']} without {claim['num_removed']} "
            "examples); forge and evaluate take the original trace"
        )


def dataset_for_trace(
    trace: Trace, base: Dataset, removed_path: Path | None = None
) -> Dataset:
    """The dataset a trace claims, built from the verifier's copy of the base data.

    For an ordinary trace this is ``base`` itself. For a trace with a removal claim it
    is ``base`` minus the removed set read from ``removed_path``, after checking the
    base dataset and the set's hash against the claim.

    Args:
        trace: The trace.
        base: The verifier's copy of the dataset named in the trace.
        removed_path: The removed set, required for a trace with a removal claim.

    Returns:
        The dataset to replay the trace on.

    Raises:
        ConfigError: If the removed set is missing, not needed, or not the claimed one.
        TraceError: If the claim is malformed or names other base data.
    """
    claim = removal_claim(trace)
    if claim is None:
        if removed_path is not None:
            raise ConfigError(
                f"{trace.root}: the trace makes no removal claim; drop --removed"
            )
        return base
    if removed_path is None:
        raise ConfigError(
            f"{trace.root}: the trace claims {claim['base_dataset']['name']} without "
            f"{claim['num_removed']} removed examples (sha256 "
            f"{claim['removed_sha256']}); pass the removed set with --removed"
        )
    if (
        claim["base_dataset"]["name"] != base.name
        or claim["base_dataset"]["fingerprint"] != base.fingerprint
        or claim["base_dataset"]["num_train"] != base.num_train
    ):
        raise TraceError(
            f"{trace.root}: the claimed dataset derives from "
            f"{claim['base_dataset']['name']} with fingerprint "
            f"{claim['base_dataset']['fingerprint']}, not the verifier's "
            f"{base.name} ({base.fingerprint})"
        )
    removed = read_removed(removed_path, base.num_train)
    digest = removed_sha256(removed)
    if digest != claim["removed_sha256"]:
        raise ConfigError(
            f"{removed_path}: this removed set has sha256 {digest}, the trace "
            f"claims {claim['removed_sha256']}"
        )
    return without(base, removed)[0]


@dataclass
class ForgedStep:
    """One forged step of a forged trace.

    Indices are into the original dataset D (the trace itself holds them as indices
    into D').

    Attributes:
        step: The step (1-based: step s turns checkpoint s-1 into checkpoint s).
        slots: Positions replaced in the batch.
        replaced: Indices (into D) of the examples that were replaced.
        replacement: Indices (into D) of the examples put in their place.
        forging_error: ``eta * ||g(B) - g(B')||`` at the original weights.
        paper_error: ``sqrt(eta) * ||g(B) - g(B')||``.
        distance: ``||g(B) - g(B')||``.
        criterion: What the attack minimised.
        score: That criterion's value for the chosen replacement.
        num_candidates: Candidates the attack ranked.
    """

    step: int
    slots: list[int]
    replaced: list[int]
    replacement: list[int]
    forging_error: float
    paper_error: float
    distance: float
    criterion: str
    score: float
    num_candidates: int


@dataclass
class ForgeResult:
    """What :func:`forge_trace` did.

    Attributes:
        out: The forged trace directory.
        attack: Attack name.
        options: The attack's options (published defaults unless overridden).
        mode: ``"keep-checkpoints"`` or ``"recompute"``.
        removed: Indices (into D) of the removed examples.
        steps: Every forged step.
        num_steps: Steps in the trace.
        divergence: For ``recompute``: ``{"step", "l2", "relative"}`` per checkpoint,
            the L2 distance between the forged model's and the original weights.
        accuracy: Final test accuracy of the original and of the forged model.
        claimed_dataset: The identity of D' as written into the manifest.
        source: The original trace that was forged.
    """

    out: Path
    attack: str
    options: dict
    mode: str
    removed: np.ndarray
    steps: list[ForgedStep]
    num_steps: int
    divergence: list[dict] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    claimed_dataset: dict = field(default_factory=dict)
    source: Path | None = None

    @property
    def forged_steps(self) -> list[int]:
        """Steps whose batch was forged."""
        return [s.step for s in self.steps]

    def to_json(self) -> dict:
        """A JSON-ready dictionary."""
        return {
            "trace": str(self.out),
            "source_trace": None if self.source is None else str(self.source),
            "attack": self.attack,
            "options": self.options,
            "mode": self.mode,
            "removed": [int(i) for i in self.removed],
            "removed_sha256": removed_sha256(self.removed),
            "num_steps": self.num_steps,
            "forged_steps": self.forged_steps,
            "claimed_dataset": self.claimed_dataset,
            "accuracy": self.accuracy,
            "divergence": self.divergence,
            "steps": [asdict(s) for s in self.steps],
        }


def _flat(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([params[name].reshape(-1) for name in names]).to(torch.float64)


def _model_flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(
        torch.float64
    )


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: str,
    dataset: Dataset,
    indices: np.ndarray,
) -> None:
    dtype = next(model.parameters()).dtype
    optimizer.zero_grad(set_to_none=True)
    compute_loss(
        loss,
        model(as_model_input(dataset.x_train[indices], dtype)),
        dataset.y_train[indices],
    ).backward()
    optimizer.step()


def _test_accuracy(model: torch.nn.Module, loss: str, dataset: Dataset) -> float:
    model.eval()
    value = accuracy(model, loss, dataset.x_test, dataset.y_test)
    model.train()
    return value


def forge_trace(
    trace: Trace,
    dataset: Dataset,
    removed: np.ndarray,
    out: str | Path,
    *,
    attack: str,
    options: dict[str, object] | None = None,
    mode: str = "keep-checkpoints",
    seed: int = 2024,
    callback: Callable[[int, int], None] | None = None,
) -> ForgeResult:
    """Rewrite a trace of D into a trace of D' = D minus ``removed``.

    Every step whose batch holds a removed example is forged at the original weights
    of that step (the honest trajectory; within a segment of several steps the
    honest batches are replayed to reach them). Slot attacks replace only the removed
    examples' slots, from the pool D' minus the batch; whole-batch attacks
    (:data:`forgelab.attacks.WHOLE_BATCH_ATTACKS`) replace the batch from that pool.
    The generator of the attack at step s is seeded with ``(seed, s)``.

    Args:
        trace: The original trace.
        dataset: Its training data D.
        removed: Indices into D of the examples the forged trace must not use.
        out: Directory of the forged trace; must not hold a trace already.
        attack: Attack name.
        options: Attack options; None values keep the published defaults.
        mode: ``"keep-checkpoints"`` or ``"recompute"`` (see the module docstring).
        seed: Seed of the attacks' generators.
        callback: Called with ``(steps_done, total_steps)``.

    Returns:
        The forged steps, and for ``recompute`` the divergence and accuracies.
    """
    check_attack(attack)
    resolved = attack_options(attack, **(options or {}))
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    require_sgd(trace)
    check_dataset(trace, dataset)
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise ConfigError(f"{out} already holds a trace; choose another --out")
    check_output_outside(out, trace.root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} exists and is not an empty directory; the forged trace needs a "
            "new one"
        )
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    claimed, kept = without(dataset, removed)
    if claimed.num_train < trace.batch_size:
        # a trace of D' with a batch larger than D' is one no verifier accepts
        raise ConfigError(
            f"removing {len(removed)} examples leaves {claimed.num_train}, fewer "
            f"than one batch of {trace.batch_size}"
        )
    if attack in WHOLE_BATCH_ATTACKS:
        # the pool of a step is D' minus its batch; it must hold a whole batch
        if claimed.num_train - trace.batch_size < trace.batch_size:
            raise ConfigError(
                f"{attack} replaces whole batches, but D' minus one batch holds "
                f"{claimed.num_train - trace.batch_size} examples, fewer than one "
                f"batch of {trace.batch_size}"
            )
        if "num_candidates" in resolved:
            check_candidates(int(resolved["num_candidates"]), trace.batch_size)
        if int(resolved.get("pool_size", trace.batch_size)) < trace.batch_size:
            raise ConfigError(
                f"--pool-size {resolved['pool_size']} is smaller than one batch of "
                f"{trace.batch_size}"
            )
    created = not out.exists()
    try:
        return _write_forged_trace(
            trace,
            dataset,
            removed,
            claimed,
            kept,
            out,
            attack=attack,
            resolved=resolved,
            mode=mode,
            seed=seed,
            callback=callback,
        )
    except BaseException:
        # what was written is an unfinished forged trace, in a directory that was
        # new or empty: remove it so that the same --out can be used again
        shutil.rmtree(out, ignore_errors=True)
        if not created:
            out.mkdir(parents=True, exist_ok=True)
        raise


def _write_forged_trace(
    trace: Trace,
    dataset: Dataset,
    removed: np.ndarray,
    claimed: Dataset,
    kept: np.ndarray,
    out: Path,
    *,
    attack: str,
    resolved: dict[str, object],
    mode: str,
    seed: int,
    callback: Callable[[int, int], None] | None,
) -> ForgeResult:
    """Write the forged trace for :func:`forge_trace`, whose checks have passed."""
    index_in_claimed = np.full(dataset.num_train, -1, dtype=np.int64)
    index_in_claimed[kept] = np.arange(len(kept))
    names = [name for name, _ in trace.build_model().named_parameters()]
    loss = trace.model_spec.loss

    # the manifest of D': the original's, with the claimed dataset and the claim
    manifest = {
        key: value
        for key, value in trace.manifest.items()
        if key not in ("checkpoints", "status", "num_steps", "claim")
    }
    manifest["dataset"] = claimed.describe()
    manifest["claim"] = {
        "kind": CLAIM_KIND,
        "base_dataset": {
            "name": dataset.name,
            "fingerprint": dataset.fingerprint,
            "num_train": dataset.num_train,
        },
        "num_removed": int(len(removed)),
        "removed_sha256": removed_sha256(removed),
        "removed_hash": "sha256 of the sorted removed indices into the base "
        "dataset's training set, as little-endian int64",
    }
    if mode == "recompute":
        manifest["environment"] = environment()
        manifest["test_accuracy"] = []
    out.mkdir(parents=True, exist_ok=True)
    writer = TraceWriter(out, manifest)
    accuracy_steps = {
        int(entry["step"]): int(entry["epoch"])
        for entry in trace.manifest.get("test_accuracy", [])
        if isinstance(entry, dict) and "step" in entry and "epoch" in entry
    }

    # the honest trajectory the attacks forge against, and the forged model
    honest = trace.build_model()
    context = AttackContext(
        honest, loss, dataset.x_train, dataset.y_train, trace.optimizer.lr
    )
    first = trace.load_checkpoint(0)
    forged_model = forged_optimizer = None
    if mode == "recompute":
        forged_model = trace.build_model()
        trace.load_weights_into(forged_model, first)
        forged_optimizer = build_optimizer(trace.optimizer, forged_model)
        import_state(forged_optimizer, forged_model, first.optimizer_state)
    writer.write_raw_checkpoint(0, first.params, first.optimizer_state, [])
    result = ForgeResult(
        out=out,
        source=trace.root,
        attack=attack,
        options=resolved,
        mode=mode,
        removed=removed,
        steps=[],
        num_steps=trace.num_steps,
        claimed_dataset=claimed.describe(),
    )
    previous = first
    with determinism(trace.manifest["deterministic"]):
        for position in range(1, len(trace.checkpoints)):
            checkpoint = trace.load_checkpoint(position)
            forged_batches, records = forge_segment(
                trace,
                dataset,
                context,
                previous,
                checkpoint,
                removed,
                kept,
                attack=attack,
                options=resolved,
                seed=seed,
            )
            result.steps.extend(records)
            remapped = [index_in_claimed[batch] for batch in forged_batches]
            if forged_model is None:
                writer.write_raw_checkpoint(
                    checkpoint.step,
                    checkpoint.params,
                    checkpoint.optimizer_state,
                    remapped,
                )
            else:
                for offset, batch in enumerate(forged_batches):
                    _train_step(forged_model, forged_optimizer, loss, dataset, batch)
                    step = previous.step + offset + 1
                    if step in accuracy_steps:
                        writer.record_accuracy(
                            accuracy_steps[step],
                            step,
                            _test_accuracy(forged_model, loss, dataset),
                        )
                writer.write_checkpoint(
                    checkpoint.step, forged_model, forged_optimizer, remapped
                )
                original = _flat(checkpoint.params, names)
                gap = float(
                    torch.linalg.vector_norm(_model_flat(forged_model) - original)
                )
                norm = float(torch.linalg.vector_norm(original))
                result.divergence.append(
                    {
                        "step": checkpoint.step,
                        "l2": gap,
                        "relative": gap / norm if norm else math.nan,
                    }
                )
            previous = checkpoint
            if callback is not None:
                callback(checkpoint.step, trace.num_steps)
    writer.finish()

    # final test accuracy of both models, then the experimenter's records
    trace.load_weights_into(honest, previous)
    result.accuracy["original"] = _test_accuracy(honest, loss, dataset)
    if forged_model is not None:
        result.accuracy["forged"] = _test_accuracy(forged_model, loss, dataset)
    write_removed(out / REMOVED_FILE, removed, dataset)
    write_json(out / RECORD_FILE, result.to_json())
    logger.info(
        "forged %d of %d steps with %s into %s",
        len(result.steps),
        trace.num_steps,
        attack,
        out,
    )
    return result


def forge_segment(
    trace: Trace,
    dataset: Dataset,
    context: AttackContext,
    start: Checkpoint,
    end: Checkpoint,
    removed: np.ndarray,
    kept: np.ndarray,
    *,
    attack: str,
    options: dict[str, object],
    seed: int,
) -> tuple[list[np.ndarray], list[ForgedStep]]:
    """Forge the batches of one segment (``start`` to ``end``) that touch ``removed``.

    Each step is forged at its honest weights: ``start``'s weights, then the honest
    batches replayed up to that step.

    Args:
        trace: The original trace.
        dataset: Its training data D.
        context: Attack context whose model is overwritten with the honest weights.
        start: The segment's first checkpoint.
        end: Its last checkpoint (its batches are the segment's steps).
        removed: Indices into D that must not be used.
        kept: The indices into D of D', sorted.
        attack: Attack name.
        options: The attack's resolved options.
        seed: The generator of the attack at step s is seeded with ``(seed, s)``.

    Returns:
        The batches with forged ones in place (indices into D), and a record per
        forged step.
    """
    model = context.model
    trace.load_weights_into(model, start)
    optimizer = None
    batches: list[np.ndarray] = []
    records: list[ForgedStep] = []
    for offset, batch in enumerate(end.batches):
        step = start.step + offset + 1
        touched = np.flatnonzero(np.isin(batch, removed))
        if len(touched) == 0:
            batches.append(batch)
        else:
            pool = np.setdiff1d(kept, batch)
            rng = np.random.default_rng([seed, step])
            forgery = forge_batch(attack, context, batch, touched, pool, rng, **options)
            batches.append(forgery.batch)
            slots = np.arange(len(batch)) if attack in WHOLE_BATCH_ATTACKS else touched
            records.append(
                ForgedStep(
                    step=step,
                    slots=[int(s) for s in slots],
                    replaced=[int(i) for i in batch[slots]],
                    replacement=[int(i) for i in forgery.batch[slots]],
                    forging_error=forgery.forging_error,
                    paper_error=forgery.paper_error,
                    distance=forgery.distance,
                    criterion=forgery.criterion,
                    score=forgery.score,
                    num_candidates=forgery.num_candidates,
                )
            )
        # move the honest trajectory on to the next step of the segment
        if offset < len(end.batches) - 1:
            if optimizer is None:
                optimizer = build_optimizer(trace.optimizer, model)
                import_state(optimizer, model, start.optimizer_state)
            _train_step(model, optimizer, context.loss, dataset, batch)
    if np.any(np.isin(np.concatenate(batches), removed)):
        raise RuntimeError(
            "internal error: a forged batch still uses a removed example"
        )
    return batches, records
