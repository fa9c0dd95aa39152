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

The trace comes from the party being audited, so the reader trusts nothing in it: only
JSON and safetensors are parsed (nothing is unpickled), the manifest is validated
against a schema, every path must stay inside the directory, sizes are checked before
anything is read, and each checkpoint must match its recorded hash, the model's shapes
and dtype, and the dataset's index range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from forgelab.errors import TraceError
from forgelab.models import (
    ENTRY_POINT_MODEL,
    ENTRY_POINT_PATTERN,
    LOSSES,
    MODELS,
    ModelSpec,
    build_model,
)
from forgelab.optim import OPTIMIZERS, OptimizerConfig, export_state, state_keys

logger = logging.getLogger(__name__)

FORMAT_NAME = "forgelab-trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKPOINT_DIR = "checkpoints"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_STEPS = 10**8
MAX_BATCH_SIZE = 10**6
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_COUNT = {"type": "integer", "minimum": 0}

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
                "name": {"type": "string", "maxLength": 200},
                "source": {"type": "string"},
                "fingerprint": _HEX64,
                "num_train": {"type": "integer", "minimum": 1, "maximum": 10**9},
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "input_shape", "num_classes", "loss"],
            "properties": {
                "name": {"enum": [*MODELS, ENTRY_POINT_MODEL]},
                "input_shape": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 1, "maximum": 10**6},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "num_classes": {"type": "integer", "minimum": 2, "maximum": 10**5},
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
                "beta1": {"type": "number"},
                "beta2": {"type": "number"},
                "eps": {"type": "number"},
            },
            "additionalProperties": False,
        },
        "batch_size": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE},
        "seed": {"type": "integer"},
        "dtype": {"enum": list(DTYPES)},
        "deterministic": {"type": "boolean"},
        "checkpoint_interval": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS},
        "num_steps": {"type": "integer", "minimum": 0, "maximum": MAX_STEPS},
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
            },
        },
        "test_accuracy": {"type": "array"},
        "claim": {"type": "object"},
    },
}


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
    return save_safetensors(
        tensors, metadata={"format": "forgelab-checkpoint", "step": str(step)}
    )


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
    message = error.message
    if len(message) > 160:
        message = message[:157] + "..."
    return f"field {where}: {message}"


class Trace:
    """A validated, read-only view of a trace directory.

    Opening checks the manifest; each checkpoint is checked when it is loaded.

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
        try:
            self.model_spec = ModelSpec.from_manifest(self.manifest["model"])
        except Exception as error:  # noqa: BLE001 - any bad field is a bad trace
            raise TraceError(f"{self._manifest_path}: model: {error}") from None
        try:
            self.optimizer = OptimizerConfig.from_manifest(self.manifest["optimizer"])
        except Exception as error:  # noqa: BLE001 - any bad field is a bad trace
            raise TraceError(f"{self._manifest_path}: optimizer: {error}") from None
        if self.model_spec.loss != self.manifest["model"]["loss"]:
            raise TraceError(
                f"{self._manifest_path}: model {self.model_spec.name!r} trains with "
                f"{self.model_spec.loss!r}, not {self.manifest['model']['loss']!r}"
            )
        self.checkpoints = self._check_checkpoint_list(allow_incomplete)
        self._param_shapes = self._expected_shapes()

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
        if path.is_symlink() or not path.is_file():
            raise TraceError(f"{path}: missing manifest (is this a forgelab trace?)")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise TraceError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TraceError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise TraceError(f"{path}: not a forgelab trace manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise TraceError(
                f"{path}: unsupported format version {version!r} "
                f"(this forgelab reads version {FORMAT_VERSION})"
            )
        validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
        error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
        if error is not None:
            raise TraceError(f"{path}: {_schema_error_line(error)}")
        return manifest

    def _check_checkpoint_list(self, allow_incomplete: bool) -> list[CheckpointEntry]:
        path = self._manifest_path
        interval = self.manifest["checkpoint_interval"]
        entries = [CheckpointEntry(**e) for e in self.manifest["checkpoints"]]
        if not entries:
            raise TraceError(f"{path}: lists no checkpoints")
        if entries[0].step != 0:
            raise TraceError(
                f"{path}: first checkpoint is step {entries[0].step}, not 0"
            )
        seen_files: set[str] = set()
        for previous, entry in zip(entries, entries[1:], strict=False):
            gap = entry.step - previous.step
            if gap <= 0:
                kind = "duplicate" if gap == 0 else "out-of-order"
                raise TraceError(f"{path}: {kind} checkpoint at step {entry.step}")
            if gap > interval or (gap < interval and entry is not entries[-1]):
                raise TraceError(
                    f"{path}: checkpoint missing between steps {previous.step} and "
                    f"{entry.step} (interval {interval})"
                )
        for entry in entries:
            if entry.file in seen_files:
                raise TraceError(f"{path}: file {entry.file} listed twice")
            seen_files.add(entry.file)
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
            raise TraceError(f"{self._manifest_path}: unsafe file name {relative!r}")
        path = self.root / relative
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise TraceError(f"{path}: leads outside the trace directory") from None
        return path

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        try:
            model = build_model(self.model_spec, trusted_entry_point=self.allow_import)
        except Exception as error:  # noqa: BLE001 - unbuildable spec is a bad trace
            raise TraceError(f"{self._manifest_path}: model: {error}") from None
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    def _max_checkpoint_bytes(self, num_batches: int) -> int:
        num_params = sum(math.prod(s) for s in self._param_shapes.values())
        num_tensors = 1 + len(state_keys(self.optimizer))
        itemsize = torch.finfo(self.dtype).bits // 8
        indices = num_batches * (self.batch_size + 1) * 8
        return 2 * (num_params * num_tensors * itemsize + indices) + 2**20

    def load_checkpoint(self, position: int) -> Checkpoint:
        """Load and check the checkpoint at ``position`` in the manifest's list.

        Raises:
            TraceError: If the file is missing, too large, does not match its hash, is
                not safetensors, or its tensors do not match the model, the dtype, the
                batch size or the dataset's index range.
        """
        entry = self.checkpoints[position]
        num_batches = (
            entry.step - self.checkpoints[position - 1].step if position else 0
        )
        path = self.resolve(entry.file)
        if path.is_symlink() or not path.is_file():
            raise TraceError(f"{path}: checkpoint file missing")
        size = path.stat().st_size
        if size > self._max_checkpoint_bytes(num_batches):
            raise TraceError(f"{path}: {size} bytes, too large for this model")
        payload = path.read_bytes()
        if sha256_bytes(payload) != entry.sha256:
            raise TraceError(f"{path}: sha256 does not match the manifest")
        try:
            tensors = load_safetensors(payload)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise TraceError(
                f"{path}: not a safetensors checkpoint ({error})"
            ) from None
        return self._check_tensors(path, entry.step, num_batches, tensors)

    def _check_tensors(
        self, path: Path, step: int, num_batches: int, tensors: dict[str, torch.Tensor]
    ) -> Checkpoint:
        params: dict[str, torch.Tensor] = {}
        state: dict[str, dict[str, torch.Tensor]] = {}
        allowed_state = set(state_keys(self.optimizer))
        for key, value in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "param" and rest in self._param_shapes:
                params[rest] = value
            elif kind == "optim" and rest.rpartition("/")[0] in self._param_shapes:
                name, _, state_key = rest.rpartition("/")
                if state_key not in allowed_state:
                    raise TraceError(f"{path}: unexpected optimizer state {key!r}")
                state.setdefault(name, {})[state_key] = value
            elif key not in ("batch_indices", "batch_sizes"):
                raise TraceError(f"{path}: unexpected tensor {key!r}")
        missing = set(self._param_shapes) - set(params)
        if missing:
            raise TraceError(f"{path}: missing weights {sorted(missing)[0]!r}")
        for name, value in params.items():
            self._check_float(path, f"param/{name}", value, self._param_shapes[name])
        for name, entries in state.items():
            if set(entries) != allowed_state:
                raise TraceError(f"{path}: incomplete optimizer state for {name!r}")
            for key, value in entries.items():
                shape = () if key == "step" else self._param_shapes[name]
                self._check_float(
                    path, f"optim/{name}/{key}", value, shape, key == "step"
                )
        batches = self._check_batches(path, num_batches, tensors)
        return Checkpoint(step, params, state, batches)

    def _check_float(
        self,
        path: Path,
        key: str,
        value: torch.Tensor,
        shape: tuple[int, ...],
        any_float: bool = False,
    ) -> None:
        if tuple(value.shape) != tuple(shape):
            raise TraceError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        if (not value.is_floating_point()) or (
            not any_float and value.dtype != self.dtype
        ):
            raise TraceError(
                f"{path}: {key} has dtype {value.dtype}, expected {self.dtype}"
            )
        if not bool(torch.isfinite(value).all()):
            raise TraceError(f"{path}: {key} holds NaN or inf")

    def _check_batches(
        self, path: Path, num_batches: int, tensors: dict[str, torch.Tensor]
    ) -> list[np.ndarray]:
        indices, sizes = tensors.get("batch_indices"), tensors.get("batch_sizes")
        if indices is None or sizes is None:
            raise TraceError(f"{path}: missing batch_indices or batch_sizes")
        if indices.dtype != torch.int64 or sizes.dtype != torch.int64:
            raise TraceError(f"{path}: batch indices must be int64")
        if indices.dim() != 1 or sizes.dim() != 1:
            raise TraceError(f"{path}: batch indices must be one-dimensional")
        if sizes.numel() != num_batches:
            raise TraceError(
                f"{path}: holds {sizes.numel()} batches, expected {num_batches} "
                f"(steps since the previous checkpoint)"
            )
        if bool((sizes != self.batch_size).any()):
            raise TraceError(
                f"{path}: a batch has {int(sizes[sizes != self.batch_size][0])} "
                "examples,"
                f" expected {self.batch_size}"
            )
        if indices.numel() != num_batches * self.batch_size:
            raise TraceError(f"{path}: batch_indices length does not match batch_sizes")
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
