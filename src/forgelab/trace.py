"""The execution trace: its on-disk format, an atomic writer and a validating reader.

A trace is a directory::

    manifest.json                    what was trained, how; a sha256 per checkpoint
    checkpoints/step-00000000.safetensors
    checkpoints/step-00000001.safetensors
    ...

Checkpoint ``s`` holds the weights after ``s`` steps (``param/<name>``), the optimizer
state (``optim/<name>/<key>``) and the example indices of every step since the previous
checkpoint (``batch_indices``, flat, and ``batch_sizes``). Step ``s`` is the update that
turns checkpoint ``s - 1`` into checkpoint ``s``; checkpoint 0 holds the initial
weights and no batch.

Checkpoint ``s`` is always stored under the name ``checkpoints/step-%08d.safetensors``,
its safetensors metadata records ``format`` and ``step``, and its header is written with
sorted keys so that equal checkpoints are equal byte for byte.

The trace comes from the party being audited, so the reader trusts nothing in it: only
JSON and safetensors are parsed (nothing is unpickled), the manifest is parsed strictly
(see :mod:`forgelab.safeio`) and validated against a schema and across fields, every
path must stay inside the directory, stray files that could pass for trace content are
refused, sizes are checked before anything is read or built, and each checkpoint must
match its recorded hash, then (from its header alone) the model's tensor names, shapes
and dtype, then finite values, the batch size and the dataset's index range.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from forgelab.data import DATASETS
from forgelab.errors import ConfigError, ForgelabError, TraceError
from forgelab.models import (
    ENTRY_POINT_MODEL,
    ENTRY_POINT_PATTERN,
    LOSSES,
    MODELS,
    ModelSpec,
    build_model,
)
from forgelab.optim import OPTIMIZERS, OptimizerConfig, export_state, state_keys
from forgelab.safeio import (
    SAFETENSORS_DTYPES,
    TensorInfo,
    parse_json,
    read_regular_file,
    read_safetensors_header,
)

logger = logging.getLogger(__name__)

FORMAT_NAME = "forgelab-trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "forgelab-checkpoint"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_STEPS = 10**8
MAX_BATCH_SIZE = 10**6
MAX_INPUT_SIZE = 10**7
"""Most scalars in one input example (a 3x1024x1024 image has about 3e6)."""
MAX_PARAMETERS = 2 * 10**8
"""Most weights a trace's model may have before the reader refuses to build it."""
MAX_STRAY_FILES = 1000
"""Most interrupted-write leftovers tolerated in the checkpoints directory."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float64: "F64"}
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_CHECKPOINT_FILE = re.compile(r"^step-(\d{8,9})\.safetensors$")
_TEMPORARY_FILE = re.compile(r"^\.(step-\d{8,9}\.safetensors|manifest\.json)\.\w+$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".safetensors")
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_STEPS}
_SHAPE = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1, "maximum": MAX_INPUT_SIZE},
    "minItems": 1,
    "maxItems": 4,
}
_NUM_CLASSES = {"type": "integer", "minimum": 2, "maximum": 10**5}

MANIFEST_SCHEMA = {
    "type": "object",
    "required": [
        "format",
        "format_version",
        "status",
        "dataset",
        "model",
        "optimizer",
        "batch_size",
        "seed",
        "dtype",
        "deterministic",
        "checkpoint_interval",
        "num_steps",
        "checkpoints",
    ],
    "properties": {
        "format": {"const": FORMAT_NAME},
        "format_version": {"type": "integer"},
        "status": {"enum": ["recording", "complete"]},
        "dataset": {
            "type": "object",
            "required": ["name", "fingerprint", "num_train"],
            "properties": {
                "name": {"enum": list(DATASETS)},
                "source": {"type": "string", "maxLength": 4096},
                "fingerprint": _HEX64,
                "num_train": {"type": "integer", "minimum": 1, "maximum": 10**9},
                "num_test": {"type": "integer", "minimum": 0, "maximum": 10**9},
                "input_shape": _SHAPE,
                "num_classes": _NUM_CLASSES,
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "input_shape", "num_classes", "loss"],
            "properties": {
                "name": {"enum": [*MODELS, ENTRY_POINT_MODEL]},
                "input_shape": _SHAPE,
                "num_classes": _NUM_CLASSES,
                "loss": {"enum": list(LOSSES)},
                "vocab_size": {"type": "integer", "minimum": 2, "maximum": 10**7},
                "entry_point": {
                    "type": "string",
                    "maxLength": 300,
                    "pattern": ENTRY_POINT_PATTERN,
                },
            },
        },
        "optimizer": {
            "type": "object",
            "required": ["name", "lr"],
            "properties": {
                "name": {"enum": list(OPTIMIZERS)},
                "lr": {"type": "number", "exclusiveMinimum": 0},
                "momentum": {"type": "number", "minimum": 0},
                "weight_decay": {"type": "number", "minimum": 0},
                "beta1": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "beta2": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                "eps": {"type": "number", "minimum": 0},
            },
            "additionalProperties": False,
        },
        "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "dtype": {"enum": list(DTYPES)},
        "deterministic": {"type": "boolean"},
        "checkpoint_interval": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
        "num_steps": _COUNT,
        "num_epochs": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
        "total_steps": _COUNT,
        "checkpoints": {
            "type": "array",
            "maxItems": MAX_STEPS + 1,
            "items": {
                "type": "object",
                "required": ["step", "file", "sha256"],
                "properties": {
                    "step": _COUNT,
                    "file": {"type": "string", "maxLength": 4096},
                    "sha256": _HEX64,
                },
                "additionalProperties": False,
            },
        },
        "test_accuracy": {
            "type": "array",
            "maxItems": MAX_STEPS,
            "items": {
                "type": "object",
                "required": ["epoch", "step", "accuracy"],
                "properties": {
                    "epoch": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
                    "step": _COUNT,
                    "accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "environment": {"type": "object"},
        "resumed": {
            "type": "array",
            "maxItems": MAX_STEPS,
            "items": {
                "type": "object",
                "required": ["step"],
                "properties": {"step": _COUNT, "environment": {"type": "object"}},
            },
        },
        "claim": {"type": "object"},
    },
}


def _is_integer(_checker: object, instance: object) -> bool:
    # JSON Schema counts 3.0 (and, through Python, True) as an integer; a trace
    # uses counts as list sizes and indices, so only real integers pass
    return isinstance(instance, int) and not isinstance(instance, bool)


_ManifestValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", _is_integer
    ),
)
_MANIFEST_VALIDATOR = _ManifestValidator(MANIFEST_SCHEMA)


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as listed in the manifest."""

    step: int
    file: str
    sha256: str


@dataclass
class Checkpoint:
    """The contents of one checkpoint file.

    Attributes:
        step: Number of steps taken before these weights.
        params: Weights by parameter name.
        optimizer_state: Optimizer state by parameter name, then state name.
        batches: Example indices of each step since the previous checkpoint.
    """

    step: int
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    batches: list[np.ndarray]


def sha256_bytes(payload: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(payload).hexdigest()


def checkpoint_name(step: int) -> str:
    """Relative path of the checkpoint file after ``step`` steps."""
    return f"{CHECKPOINT_DIR}/step-{step:08d}.safetensors"


def is_temporary_file(name: str) -> bool:
    """Whether a file name is that of an unfinished :func:`write_atomic`."""
    return _TEMPORARY_FILE.match(name) is not None


def check_own_trace(trace_dir: Path) -> None:
    """Refuse a directory unless it is entirely a forgelab trace.

    Commands that rewrite their own trace (``reproduce``, ``theory``) call this on
    the previous one before replacing it. The directory must load as a trace (its
    manifest passes the schema) and every entry must be a file a trace writer
    creates (the manifest, checkpoint files, unfinished atomic writes); anything
    else, such as a user's file saved inside it, makes this refuse.

    Raises:
        ConfigError: If the directory is not entirely a forgelab trace.
    """
    refusal = f"{trace_dir} exists and is not a forgelab trace; not touching it"
    if trace_dir.is_symlink() or not trace_dir.is_dir():
        raise ConfigError(refusal)
    for entry in trace_dir.iterdir():
        if entry.name == MANIFEST_NAME or is_temporary_file(entry.name):
            if entry.is_file() and not entry.is_symlink():
                continue
        elif entry.name == CHECKPOINT_DIR and entry.is_dir() and not entry.is_symlink():
            for item in entry.iterdir():
                own = _CHECKPOINT_FILE.match(item.name) or is_temporary_file(item.name)
                if not own or item.is_symlink() or not item.is_file():
                    raise ConfigError(f"{refusal} ({item} is not a checkpoint file)")
            continue
        raise ConfigError(f"{refusal} ({entry} is not part of a trace)")
    try:
        Trace(trace_dir)
    except ForgelabError as error:
        raise ConfigError(f"{refusal} ({error})") from None


@contextlib.contextmanager
def replacing_own_trace(trace_dir: Path) -> Iterator[Path]:
    """Record a new trace at ``trace_dir`` in place of a previous one, safely.

    A previous trace there (checked with :func:`check_own_trace`) is moved aside
    first. If the block completes, it is deleted; if the block fails or is
    interrupted, whatever the block wrote at ``trace_dir`` is removed and the
    previous trace is put back, so an interrupted run loses nothing.

    Yields:
        ``trace_dir``, free for the new trace.

    Raises:
        ConfigError: If ``trace_dir`` holds anything but a forgelab trace.
    """
    previous = None
    if trace_dir.exists() or trace_dir.is_symlink():
        check_own_trace(trace_dir)
        previous = Path(
            tempfile.mkdtemp(dir=trace_dir.parent, prefix=f".{trace_dir.name}.old-")
        )
        os.replace(trace_dir, previous / trace_dir.name)
    try:
        yield trace_dir
    except BaseException:
        if trace_dir.exists():
            shutil.rmtree(trace_dir, ignore_errors=True)
        if previous is not None:
            os.replace(previous / trace_dir.name, trace_dir)
            previous.rmdir()
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _umask() -> int:
    """The process's file mode creation mask (read without changing it for long)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_atomic(path: Path, payload: bytes, *, sync: bool = False) -> None:
    """Write a file so that readers see either the old or the new content, never half.

    The bytes go to a temporary file in the same directory, which is renamed over
    ``path``. The rename alone survives the writing process being killed; ``sync``
    also flushes the data to the disk, which only matters for power loss and costs
    milliseconds per file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file readable by its owner only; give it the mode an
        # ordinary new file would get, so that a trace or report can be shared
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            if sync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def encode_checkpoint(
    params: dict[str, torch.Tensor],
    optimizer_state: dict[str, dict[str, torch.Tensor]],
    batches: list[np.ndarray],
    step: int,
) -> bytes:
    """Serialise a checkpoint to safetensors bytes."""
    tensors = {
        f"param/{name}": value.detach().contiguous() for name, value in params.items()
    }
    for name, state in optimizer_state.items():
        for key, value in state.items():
            tensors[f"optim/{name}/{key}"] = value.detach().contiguous()
    flat = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    tensors["batch_indices"] = torch.from_numpy(flat.astype(np.int64))
    tensors["batch_sizes"] = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    payload = save_safetensors(
        tensors, metadata={"format": CHECKPOINT_FORMAT, "step": str(step)}
    )
    return _canonical_header(payload)


def _canonical_header(payload: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys, so equal tensors give equal bytes.

    The safetensors library stores its metadata in a hash map whose order varies
    from one call to the next; two recordings of the same run would then differ in
    their bytes and hashes though not in a single tensor. The data section and the
    tensors' byte ranges, which are relative to it, are unchanged; the header is
    padded with spaces to a multiple of 8 bytes, as the library does.
    """
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + payload[8 + length :]


class TraceWriter:
    """Writes a trace directory step by step; every write is atomic.

    The manifest is rewritten (atomically) after every checkpoint with status
    ``recording``, so a run killed at any moment leaves a trace that is valid up to its
    last complete checkpoint. :meth:`finish` marks it ``complete``.

    Args:
        root: The trace directory; created if missing.
        manifest: The manifest fields that do not change during recording.
        checkpoints: Entries already written (when resuming).
    """

    def __init__(
        self,
        root: Path,
        manifest: dict,
        checkpoints: list[CheckpointEntry] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = dict(manifest)
        self.manifest.setdefault("test_accuracy", [])
        self.checkpoints = list(checkpoints or [])

    def write_checkpoint(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        batches: list[np.ndarray],
    ) -> CheckpointEntry:
        """Write the checkpoint after ``step`` steps and record it in the manifest."""
        params = {name: p.detach() for name, p in model.named_parameters()}
        state = export_state(optimizer, model) if optimizer is not None else {}
        return self.write_raw_checkpoint(step, params, state, batches)

    def write_raw_checkpoint(
        self,
        step: int,
        params: dict[str, torch.Tensor],
        optimizer_state: dict[str, dict[str, torch.Tensor]],
        batches: list[np.ndarray],
    ) -> CheckpointEntry:
        """Write a checkpoint from tensors (used when rewriting a trace)."""
        payload = encode_checkpoint(params, optimizer_state, batches, step)
        entry = CheckpointEntry(step, checkpoint_name(step), sha256_bytes(payload))
        write_atomic(self.root / entry.file, payload)
        self.checkpoints.append(entry)
        self.manifest["num_steps"] = step
        self._write_manifest("recording")
        return entry

    def record_accuracy(self, epoch: int, step: int, test_accuracy: float) -> None:
        """Add the test accuracy measured after an epoch."""
        self.manifest["test_accuracy"].append(
            {"epoch": epoch, "step": step, "accuracy": test_accuracy}
        )

    def finish(self) -> Path:
        """Mark the trace complete, flush it to disk, and return its directory."""
        os.sync()
        self._write_manifest("complete", sync=True)
        return self.root

    def _write_manifest(self, status: str, sync: bool = False) -> None:
        self.manifest["status"] = status
        self.manifest["checkpoints"] = [
            {"step": e.step, "file": e.file, "sha256": e.sha256}
            for e in self.checkpoints
        ]
        text = json.dumps(self.manifest, indent=1, sort_keys=True)
        write_atomic(self.root / MANIFEST_NAME, text.encode(), sync=sync)


def _schema_error_line(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    message = " ".join(error.message.split())
    if len(message) > 160:
        message = message[:157] + "..."
    return f"field {where}: {message}"


@dataclass(frozen=True)
class _Expected:
    """What one tensor of a checkpoint must look like, before it is read."""

    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


def check_output_outside(out: Path, root: Path) -> None:
    """Refuse an output directory that is a trace directory or lies inside one.

    Anything written there would make the trace unreadable (its reader refuses
    unknown files) or replace its files.

    Raises:
        ConfigError: If ``out`` is ``root`` or below it.
    """
    out, root = Path(out).resolve(), Path(root).resolve()
    if out == root or root in out.parents:
        raise ConfigError(
            f"--out {out} is inside the trace {root}; choose a directory outside it"
        )


def _scheduled_num_train(claim: object, num_train: int) -> int:
    """Training-set size behind a trace's batch schedule.

    ``num_train`` itself, unless the trace carries a removal claim naming a larger
    base dataset of which its claimed dataset is what remains; the claim's own
    checks are in :func:`forgelab.forgery.removal_claim`.
    """
    if not isinstance(claim, dict) or claim.get("kind") != "removal":
        return num_train
    base = claim.get("base_dataset")
    removed = claim.get("num_removed")
    if (
        isinstance(base, dict)
        and isinstance(base.get("num_train"), int)
        and isinstance(removed, int)
        and removed >= 1
        and base["num_train"] - removed == num_train
    ):
        return base["num_train"]
    return num_train


class Trace:
    """A validated, read-only view of a trace directory.

    Opening reads and checks the manifest and lists the trace's files; each
    checkpoint is checked when it is loaded.

    Args:
        root: The trace directory.
        allow_incomplete: Accept a trace whose recording was interrupted; its valid
            part ends at the last checkpoint listed.
        allow_import: For a trace whose model is built by an entry point
            (``package.module:factory``), the entry point the caller trusts. The
            model is imported, which runs its code, only if the manifest names this
            same entry point; otherwise opening such a trace fails.

    Raises:
        TraceError: If anything in the manifest is malformed or unsafe.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        allow_incomplete: bool = True,
        allow_import: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.allow_import = allow_import
        if not self.root.is_dir():
            raise TraceError(f"{self.root}: not a trace directory")
        self.manifest = self._read_manifest()
        model = self.manifest["model"]
        try:
            self.model_spec = ModelSpec.from_manifest(model)
        except Exception as error:  # noqa: BLE001 - any bad field is a bad trace
            raise TraceError(f"{self._manifest_path}: model: {error}") from None
        try:
            self.optimizer = OptimizerConfig.from_manifest(self.manifest["optimizer"])
        except ForgelabError as error:
            raise TraceError(f"{self._manifest_path}: optimizer: {error}") from None
        if self.model_spec.loss != model["loss"]:
            raise TraceError(
                f"{self._manifest_path}: model {self.model_spec.name!r} trains with "
                f"{self.model_spec.loss!r}, not {model['loss']!r}"
            )
        self._check_consistency()
        self.checkpoints = self._check_checkpoint_list(allow_incomplete)
        self._param_shapes = self._expected_shapes()
        self._check_files()

    @property
    def _manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def complete(self) -> bool:
        """Whether the recording finished."""
        return self.manifest["status"] == "complete"

    @property
    def num_steps(self) -> int:
        """Number of steps covered by the checkpoints."""
        return self.checkpoints[-1].step

    @property
    def batch_size(self) -> int:
        """Number of examples in every batch."""
        return int(self.manifest["batch_size"])

    @property
    def num_train(self) -> int:
        """Size of the claimed training set the indices point into."""
        return int(self.manifest["dataset"]["num_train"])

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the weights."""
        return DTYPES[self.manifest["dtype"]]

    @property
    def claim(self) -> dict | None:
        """What a forged trace claims (e.g. a removed set), if anything."""
        return self.manifest.get("claim")

    def build_model(self) -> nn.Module:
        """A model of the trace's architecture and dtype (weights not loaded)."""
        model = build_model(self.model_spec, trusted_entry_point=self.allow_import)
        return model.to(self.dtype)

    def _read_manifest(self) -> dict:
        path = self._manifest_path
        if not path.exists() and not path.is_symlink():
            raise TraceError(f"{path}: missing manifest (is this a forgelab trace?)")
        payload = read_regular_file(path, MAX_MANIFEST_BYTES, "manifest")
        manifest = parse_json(payload, path, "manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise TraceError(f"{path}: not a forgelab trace manifest")
        version = manifest.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            shown = " ".join(repr(version).split())[:40]
            raise TraceError(
                f"{path}: unsupported format version {shown} "
                f"(this forgelab reads version {FORMAT_VERSION})"
            )
        error = jsonschema.exceptions.best_match(
            _MANIFEST_VALIDATOR.iter_errors(manifest)
        )
        if error is not None:
            raise TraceError(f"{path}: {_schema_error_line(error)}")
        return manifest

    def _check_consistency(self) -> None:
        """Cross-field checks the schema cannot express, before anything is built."""
        path = self._manifest_path
        manifest = self.manifest
        dataset, model = manifest["dataset"], manifest["model"]
        for key in ("input_shape", "num_classes"):
            if key in dataset and dataset[key] != model[key]:
                raise TraceError(
                    f"{path}: dataset {key} {dataset[key]} differs from model "
                    f"{key} {model[key]}"
                )
        input_size = math.prod(model["input_shape"])
        if input_size > MAX_INPUT_SIZE:
            raise TraceError(
                f"{path}: model input_shape {model['input_shape']} has {input_size} "
                f"values per example, more than {MAX_INPUT_SIZE}"
            )
        num_train, batch_size = dataset["num_train"], manifest["batch_size"]
        if batch_size > num_train:
            raise TraceError(
                f"{path}: batch_size {batch_size} exceeds num_train {num_train}"
            )
        total = manifest.get("total_steps")
        if "num_epochs" in manifest and total is not None:
            # a trace that claims a smaller dataset than it was scheduled on (a
            # forged removal claim) keeps the schedule of the base dataset
            scheduled = _scheduled_num_train(manifest.get("claim"), num_train)
            expected = manifest["num_epochs"] * (scheduled // batch_size)
            if total != expected:
                raise TraceError(
                    f"{path}: total_steps {total} is not num_epochs x "
                    f"(num_train // batch_size) = {expected}"
                )
        if total is not None and manifest["num_steps"] > total:
            raise TraceError(
                f"{path}: num_steps {manifest['num_steps']} exceeds total_steps {total}"
            )
        if total is not None and self.complete and manifest["num_steps"] != total:
            raise TraceError(
                f"{path}: status is complete but num_steps {manifest['num_steps']} "
                f"is not total_steps {total}"
            )

    def _check_checkpoint_list(self, allow_incomplete: bool) -> list[CheckpointEntry]:
        path = self._manifest_path
        interval = self.manifest["checkpoint_interval"]
        entries = [
            CheckpointEntry(e["step"], e["file"], e["sha256"])
            for e in self.manifest["checkpoints"]
        ]
        if not entries:
            raise TraceError(f"{path}: lists no checkpoints")
        if entries[0].step != 0:
            raise TraceError(
                f"{path}: first checkpoint is step {entries[0].step}, not 0"
            )
        pairs = list(zip(entries, entries[1:], strict=False))
        for previous, entry in pairs:
            if entry.step <= previous.step:
                kind = "duplicate" if entry.step == previous.step else "out-of-order"
                raise TraceError(
                    f"{path}: {kind} checkpoint: step {entry.step} listed after "
                    f"step {previous.step}"
                )
        for previous, entry in pairs:
            gap = entry.step - previous.step
            if gap > interval or (gap < interval and entry is not entries[-1]):
                raise TraceError(
                    f"{path}: checkpoint missing between steps {previous.step} and "
                    f"{entry.step} (interval {interval})"
                )
        for entry in entries:
            expected = checkpoint_name(entry.step)
            if entry.file != expected:
                shown = " ".join(repr(entry.file).split())[:80]
                raise TraceError(
                    f"{path}: checkpoint of step {entry.step} is listed as {shown}, "
                    f"expected {expected!r}"
                )
            self.resolve(entry.file)
        if self.manifest["num_steps"] != entries[-1].step:
            raise TraceError(
                f"{path}: num_steps is {self.manifest['num_steps']} but the last "
                f"checkpoint is step {entries[-1].step}"
            )
        if self.manifest["status"] != "complete" and not allow_incomplete:
            raise TraceError(f"{path}: recording was interrupted (status 'recording')")
        return entries

    def resolve(self, relative: str) -> Path:
        """The path of a file named in the manifest, checked to stay inside the trace.

        Raises:
            TraceError: For absolute paths, ``..``, odd characters, or symlinks that
                lead out of the trace directory.
        """
        if not _SAFE_PATH.match(relative) or ".." in relative.split("/"):
            shown = " ".join(repr(relative).split())[:80]
            raise TraceError(f"{self._manifest_path}: unsafe file name {shown}")
        path = self.root / relative
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise TraceError(f"{path}: leads outside the trace directory") from None
        except (OSError, RuntimeError) as error:
            # Python 3.11 reports a symlink loop as RuntimeError, later ones as OSError
            reason = getattr(error, "strerror", None) or "symlink loop"
            raise TraceError(f"{path}: cannot resolve ({reason})") from None
        return path

    def _check_files(self) -> None:
        """List the trace's files (without opening any) and refuse stray ones.

        A trace holds ``manifest.json`` and ``checkpoints/step-NNNNNNNN.safetensors``
        files. Leftovers of an interrupted atomic write (hidden temporary files) and,
        while recording, checkpoints written after the last one listed are allowed;
        anything else that could pass for trace content, such as a pickle named like
        a checkpoint, is rejected.
        """
        for name in self._list(self.root, MAX_STRAY_FILES):
            if name in (MANIFEST_NAME, CHECKPOINT_DIR) or _TEMPORARY_FILE.match(name):
                continue
            # code beside the trace could be imported by --allow-import from here
            if name == "__pycache__" or name.lower().endswith((".py", ".pyc", ".so")):
                raise TraceError(
                    f"{self.root / name}: unexpected code file in the trace directory"
                )
            if name.startswith("step-") or name.lower().endswith(_PICKLE_SUFFIXES):
                raise TraceError(
                    f"{self.root / name}: unexpected file; checkpoints are read only "
                    f"from {CHECKPOINT_DIR}/ as safetensors, nothing is unpickled"
                )
        directory = self.root / CHECKPOINT_DIR
        if directory.is_symlink() or not directory.is_dir():
            raise TraceError(f"{directory}: missing or not a plain directory")
        listed = {Path(entry.file).name for entry in self.checkpoints}
        last = self.checkpoints[-1].step
        for name in self._list(directory, len(listed) + MAX_STRAY_FILES):
            path = directory / name
            match = _CHECKPOINT_FILE.match(name)
            if match is None and not _TEMPORARY_FILE.match(name):
                raise TraceError(
                    f"{path}: unexpected file; a trace's checkpoints are "
                    "step-NNNNNNNN.safetensors files, nothing is unpickled"
                )
            if match is not None and (path.is_symlink() or not path.is_file()):
                raise TraceError(f"{path}: not a regular file")
            # a checkpoint written after the last manifest update of a killed run is
            # tolerated while recording; any other unlisted checkpoint is not
            unlisted = match is not None and name not in listed
            if unlisted and (self.complete or int(match[1]) <= last):
                raise TraceError(f"{path}: checkpoint not listed in the manifest")

    @staticmethod
    def _list(directory: Path, limit: int) -> list[str]:
        names: list[str] = []
        try:
            with os.scandir(directory) as scan:
                for entry in scan:
                    names.append(entry.name)
                    if len(names) > limit:
                        raise TraceError(
                            f"{directory}: more than {limit} files; not a trace"
                        )
        except OSError as error:
            raise TraceError(f"{directory}: cannot list ({error.strerror})") from None
        return names

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        # build on the meta device: shapes without allocating a single weight
        try:
            with torch.device("meta"):
                model = build_model(
                    self.model_spec, trusted_entry_point=self.allow_import
                )
        except ForgelabError as error:
            raise TraceError(f"{self._manifest_path}: model: {error}") from None
        except (RuntimeError, ValueError, OverflowError) as error:
            message = " ".join(str(error).split())[:120]
            raise TraceError(
                f"{self._manifest_path}: model {self.model_spec.name!r} cannot be "
                f"built for input_shape {list(self.model_spec.input_shape)} "
                f"({message})"
            ) from None
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        num_params = sum(math.prod(shape) for shape in shapes.values())
        if num_params > MAX_PARAMETERS:
            raise TraceError(
                f"{self._manifest_path}: model {self.model_spec.name!r} with "
                f"input_shape {list(self.model_spec.input_shape)} has {num_params} "
                f"weights, more than {MAX_PARAMETERS}"
            )
        return shapes

    def _expected_layout(self, step: int, num_batches: int) -> dict[str, _Expected]:
        """Every tensor checkpoint ``step`` must hold, with its dtype and shape."""
        weights = (_SAFETENSORS_DTYPE[self.dtype],)
        layout = {
            f"param/{name}": _Expected(weights, shape)
            for name, shape in self._param_shapes.items()
        }
        # an optimizer has state only once it has taken a step
        if step > 0:
            for name, shape in self._param_shapes.items():
                for key in state_keys(self.optimizer):
                    if key == "step":
                        layout[f"optim/{name}/{key}"] = _Expected(("F32", "F64"), ())
                    else:
                        layout[f"optim/{name}/{key}"] = _Expected(weights, shape)
        layout["batch_indices"] = _Expected(("I64",), (num_batches * self.batch_size,))
        layout["batch_sizes"] = _Expected(("I64",), (num_batches,))
        return layout

    def _check_layout(
        self,
        path: Path,
        step: int,
        layout: dict[str, _Expected],
        tensors: dict[str, TensorInfo],
        metadata: dict[str, str],
    ) -> None:
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise TraceError(f"{path}: not a forgelab checkpoint (metadata format)")
        if metadata.get("step") != str(step):
            shown = " ".join(repr(metadata.get("step")).split())[:40]
            raise TraceError(
                f"{path}: holds step {shown}, but the manifest lists it as step {step}"
            )
        for key in tensors:
            if key not in layout:
                shown = " ".join(repr(key).split())[:80]
                raise TraceError(f"{path}: unexpected tensor {shown}")
        for key, expected in layout.items():
            if key not in tensors:
                raise TraceError(f"{path}: missing tensor {key!r}")
            info = tensors[key]
            if info.shape != expected.shape:
                raise TraceError(
                    f"{path}: {key} has shape {info.shape}, expected {expected.shape}"
                )
            if info.dtype not in expected.dtypes:
                raise TraceError(
                    f"{path}: {key} has dtype {info.dtype}, expected "
                    f"{' or '.join(expected.dtypes)}"
                )

    def _max_checkpoint_bytes(self, layout: dict[str, _Expected]) -> int:
        data = sum(
            math.prod(e.shape) * max(SAFETENSORS_DTYPES[d] for d in e.dtypes)
            for e in layout.values()
        )
        return 8 + 2**16 + 256 * len(layout) + data

    def load_checkpoint(self, position: int) -> Checkpoint:
        """Load and check the checkpoint at ``position`` in the manifest's list.

        The file's size is checked before it is read, its hash before it is parsed,
        and its header (every tensor's name, dtype and shape) before any tensor is
        built.

        Raises:
            TraceError: If the file is missing, too large, does not match its hash, is
                not safetensors, or its tensors do not match the model, the dtype, the
                batch size or the dataset's index range.
        """
        entry = self.checkpoints[position]
        num_batches = (
            entry.step - self.checkpoints[position - 1].step if position else 0
        )
        layout = self._expected_layout(entry.step, num_batches)
        path = self.resolve(entry.file)
        payload = read_regular_file(
            path, self._max_checkpoint_bytes(layout), "checkpoint"
        )
        if sha256_bytes(payload) != entry.sha256:
            raise TraceError(f"{path}: sha256 does not match the manifest")
        header, metadata = read_safetensors_header(path, payload)
        self._check_layout(path, entry.step, layout, header, metadata)
        try:
            tensors = load_safetensors(payload)
        except Exception as error:  # noqa: BLE001 - any parser failure is bad input
            message = " ".join(str(error).split())[:120]
            raise TraceError(
                f"{path}: not a valid safetensors file ({message})"
            ) from None
        return self._check_values(path, entry.step, num_batches, tensors)

    def _check_values(
        self, path: Path, step: int, num_batches: int, tensors: dict[str, torch.Tensor]
    ) -> Checkpoint:
        params: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "param":
                params[rest] = value
            elif kind == "optim":
                name, _, state_key = rest.rpartition("/")
                state.setdefault(name, {})[state_key] = value
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TraceError(f"{path}: {key} holds NaN or inf")
        for name, entries in state.items():
            if "step" in entries and float(entries["step"]) != step:
                raise TraceError(
                    f"{path}: optim/{name}/step is {float(entries['step']):g}, "
                    f"expected {step}"
                )
        batches = self._check_batches(path, num_batches, tensors)
        return Checkpoint(step, params, state, batches)

    def _check_batches(
        self, path: Path, num_batches: int, tensors: dict[str, torch.Tensor]
    ) -> list[np.ndarray]:
        indices, sizes = tensors["batch_indices"], tensors["batch_sizes"]
        if bool((sizes != self.batch_size).any()):
            wrong = int(sizes[sizes != self.batch_size][0])
            raise TraceError(
                f"{path}: batch_sizes holds a batch of {wrong} examples, expected "
                f"{self.batch_size}"
            )
        if indices.numel() and (
            int(indices.min()) < 0 or int(indices.max()) >= self.num_train
        ):
            raise TraceError(
                f"{path}: example index out of range [0, {self.num_train}) "
                f"(min {int(indices.min())}, max {int(indices.max())})"
            )
        return list(indices.numpy().reshape(num_batches, self.batch_size))

    def load_weights_into(self, model: nn.Module, checkpoint: Checkpoint) -> None:
        """Copy a checkpoint's weights into a model of the trace's architecture."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(checkpoint.params[name])


def flat_weights(checkpoint: Checkpoint, names: list[str]) -> torch.Tensor:
    """A checkpoint's weights as one vector, in the given parameter order."""
    return torch.cat([checkpoint.params[name].reshape(-1) for name in names])
