"""Helpers that tamper with a trace the way a dishonest owner would."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, save

from forgelab.trace import MANIFEST_NAME, sha256_bytes


def read_manifest(trace: Path) -> dict:
    return json.loads((trace / MANIFEST_NAME).read_text())


def write_manifest(trace: Path, manifest: dict) -> None:
    (trace / MANIFEST_NAME).write_text(json.dumps(manifest))


def rewrite_checkpoint(
    trace: Path, step: int, change, *, update_hash: bool = True
) -> None:
    """Apply ``change`` to the tensors of checkpoint ``step`` and save them back.

    With ``update_hash`` the manifest records the new file's hash, so only replay can
    tell that anything changed.
    """
    manifest = read_manifest(trace)
    entry = next(e for e in manifest["checkpoints"] if e["step"] == step)
    path = trace / entry["file"]
    tensors = load(path.read_bytes())
    change(tensors)
    payload = save(
        tensors, metadata={"format": "forgelab-checkpoint", "step": str(step)}
    )
    path.write_bytes(payload)
    if update_hash:
        entry["sha256"] = sha256_bytes(payload)
        write_manifest(trace, manifest)


def shift_one_weight(amount: float):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        name = sorted(k for k in tensors if k.startswith("param/"))[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += amount

    return change


def replace_index(position: int, new_index: int):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors["batch_indices"].clone()
        indices[position] = new_index
        tensors["batch_indices"] = indices

    return change


def checkpoint_path(trace: Path, step: int) -> Path:
    entry = next(e for e in read_manifest(trace)["checkpoints"] if e["step"] == step)
    return trace / entry["file"]


def rehash(trace: Path, step: int) -> None:
    """Record the current hash of checkpoint ``step``'s file, as a forger would."""
    manifest = read_manifest(trace)
    entry = next(e for e in manifest["checkpoints"] if e["step"] == step)
    entry["sha256"] = sha256_bytes((trace / entry["file"]).read_bytes())
    write_manifest(trace, manifest)


def set_tensor(key: str, value: torch.Tensor):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value

    return change
