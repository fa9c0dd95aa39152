"""Fuzzing the trace reader and the verifier with mutations of a small valid trace.

Each case copies the tiny digits trace (7 steps, 5 checkpoints), breaks it one way and
verifies it in-process with a one-thread replay and tolerance 0: the trace was
recorded with one thread, so its honest reproduction error is exactly 0. For every
case three things must hold:

1. no traceback: nothing but a ``ForgelabError`` escapes;
2. a clear message: a rejection for unusable input is one line that starts with the
   path of the file at fault inside the trace;
3. no acceptance of a changed trace that no longer reproduces: an accepted trace has
   the recorded checkpoints (all of them, or a prefix if it says it was interrupted)
   and the fields replay uses are unchanged; if anything replay uses did change, an
   independent replay written here with plain torch must reproduce every checkpoint
   bit for bit.

Mutations that change nothing a verifier uses (JSON whitespace, key order, the
informational ``environment`` or ``test_accuracy`` fields, leftover temporary files)
may be accepted; those marked neutral must be. The terminal summary prints how many
cases ran and how each family ended.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from forgelab.cli import main
from forgelab.errors import ForgelabError
from forgelab.optim import OptimizerConfig
from forgelab.replay import num_threads, verify_trace
from forgelab.trace import MANIFEST_NAME, Trace, sha256_bytes

Mutation = Callable[[Path], None]
CLI_SAMPLE_EVERY = 50
"""Every this many cases also run through ``forgelab verify`` in-process."""


@dataclass
class Case:
    """One mutation of the base trace.

    Attributes:
        name: What was changed, for failure messages.
        mutate: Applies the change to a fresh copy of the trace.
        neutral: The change is meaningless to a verifier; the trace must be accepted.
    """

    name: str
    mutate: Mutation
    neutral: bool = False


@dataclass
class Base:
    """The valid trace every case starts from, and what its verification uses."""

    files: dict[str, bytes]
    manifest: dict
    checkpoints: list
    replayed: dict


class _Marker:
    """A pickle payload that creates a file when (and only when) it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# loading, comparing and replaying traces (the oracle)


def load_contents(trace: Trace) -> list:
    return [trace.load_checkpoint(i) for i in range(len(trace.checkpoints))]


def replayed_fields(manifest: dict) -> dict:
    """Everything in a manifest that changes what a replay computes."""
    optimizer = OptimizerConfig.from_manifest(manifest["optimizer"])
    used = (
        ("lr", "momentum", "weight_decay")
        if optimizer.name == "sgd"
        else ("lr", "beta1", "beta2", "eps", "weight_decay")
    )
    dataset = manifest["dataset"]
    return {
        "dataset": [dataset["name"], dataset["fingerprint"], dataset["num_train"]],
        "model": manifest["model"],
        "optimizer": [optimizer.name, *(getattr(optimizer, k) for k in used)],
        "batch_size": manifest["batch_size"],
        "dtype": manifest["dtype"],
        "checkpoint_interval": manifest["checkpoint_interval"],
    }


def without_hashes(manifest: dict) -> dict:
    """A manifest without checkpoint hashes (the checkpoints are compared instead)."""
    return {
        **manifest,
        "checkpoints": [
            {k: v for k, v in entry.items() if k != "sha256"}
            for entry in manifest["checkpoints"]
        ],
    }


def same_checkpoint(a, b) -> bool:
    def same_tensors(x: dict, y: dict) -> bool:
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x
        )

    return (
        a.step == b.step
        and same_tensors(a.params, b.params)
        and a.optimizer_state.keys() == b.optimizer_state.keys()
        and all(
            same_tensors(a.optimizer_state[k], b.optimizer_state[k])
            for k in a.optimizer_state
        )
        and len(a.batches) == len(b.batches)
        and all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    )


def reproduces_independently(trace: Trace, dataset) -> bool:
    """Replay a softmax-regression SGD trace with plain torch, bit for bit."""
    config = trace.optimizer
    if trace.model_spec.name != "logreg" or config.name != "sgd":
        return False
    inputs = dataset.x_train.reshape(dataset.num_train, -1).to(trace.dtype)
    checkpoints = load_contents(trace)
    for start, end in zip(checkpoints, checkpoints[1:], strict=False):
        weight = start.params["1.weight"].clone().requires_grad_(True)
        bias = start.params["1.bias"].clone().requires_grad_(True)
        sgd = torch.optim.SGD(
            [weight, bias],
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            foreach=False,
        )
        for param, name in ((weight, "1.weight"), (bias, "1.bias")):
            if name in start.optimizer_state:
                buffer = start.optimizer_state[name]["momentum_buffer"].clone()
                sgd.state[param] = {"momentum_buffer": buffer}
        for indices in end.batches:
            sgd.zero_grad()
            logits = F.linear(inputs[indices], weight, bias)
            F.cross_entropy(logits, dataset.y_train[indices]).backward()
            sgd.step()
        if not (
            torch.equal(weight.detach(), end.params["1.weight"])
            and torch.equal(bias.detach(), end.params["1.bias"])
        ):
            return False
    return True


def classify_acceptance(root: Path, base: Base, dataset, neutral: bool) -> str:
    """Name an accepted case's category, or raise AssertionError if it is unsound."""
    trace = Trace(root)
    contents = load_contents(trace)
    prefix = len(contents) <= len(base.checkpoints) and all(
        same_checkpoint(a, b) for a, b in zip(contents, base.checkpoints, strict=False)
    )
    unchanged_replay = replayed_fields(trace.manifest) == base.replayed
    if prefix and unchanged_replay:
        if len(contents) < len(base.checkpoints):
            assert not trace.complete, "accepted a truncated trace marked complete"
            return "accepted: prefix of an interrupted recording"
        if without_hashes(trace.manifest) == without_hashes(base.manifest):
            return "accepted: same content"
        assert not neutral, "a neutral mutation changed the manifest"
        return "accepted: informational fields differ"
    assert not neutral, "a neutral mutation changed what replay uses"
    assert reproduces_independently(trace, dataset), (
        "accepted a changed trace that an independent replay does not reproduce"
    )
    return "accepted: changed, reproduces exactly"


def verify_in_process(root: Path, dataset) -> tuple[int, str]:
    """What ``forgelab verify --tolerance 0`` decides, without the report files."""
    try:
        trace = Trace(root)
        report = verify_trace(trace, dataset, tolerance=0.0)
    except ForgelabError as error:
        return error.exit_code, str(error)
    return (0 if report.accepted else 1), ""


# building mutated copies


def materialize(root: Path, files: dict[str, bytes]) -> None:
    if root.exists() or root.is_symlink():
        shutil.rmtree(root)
    for relative, payload in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)


def write(relative: str, payload: bytes) -> Mutation:
    def mutate(root: Path) -> None:
        (root / relative).write_bytes(payload)

    return mutate


def write_rehashed(relative: str, payload: bytes) -> Mutation:
    """Replace a checkpoint file and record its new hash, as a forger would."""

    def mutate(root: Path) -> None:
        (root / relative).write_bytes(payload)
        manifest = json.loads((root / MANIFEST_NAME).read_bytes())
        for entry in manifest["checkpoints"]:
            if entry["file"] == relative:
                entry["sha256"] = sha256_bytes(payload)
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    return mutate


def edit_manifest(change: Callable[[dict], None]) -> Mutation:
    def mutate(root: Path) -> None:
        manifest = json.loads((root / MANIFEST_NAME).read_bytes())
        change(manifest)
        (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))

    return mutate


def leaf_paths(value, prefix=()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaf_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from leaf_paths(child, (*prefix, index))


def set_path(path: tuple, value, delete: bool = False) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return change


# the mutation families

_DELETE = object()
_VALUE_POOL = [
    _DELETE,
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    10**12,
    2**64,
    0.5,
    200.0,
    -1e-300,
    1e308,
    "",
    "x",
    "../../etc/passwd",
    "/etc/passwd",
    "checkpoints/step-00000002.pt",
    [],
    {},
    [1, 2],
    {"a": 1},
    "a" * 5000,
]


def manifest_byte_cases(base: Base, rng: np.random.Generator) -> list[Case]:
    text = base.files[MANIFEST_NAME]
    size = len(text)
    cases = []
    for cut in sorted({0, 1, size - 1, *rng.integers(0, size, 40).tolist()}):
        cases.append(
            Case(f"manifest cut to {cut} bytes", write(MANIFEST_NAME, text[:cut]))
        )
    for _ in range(150):
        position, bit = int(rng.integers(size)), int(rng.integers(8))
        flipped = bytearray(text)
        flipped[position] ^= 1 << bit
        cases.append(
            Case(
                f"manifest bit {bit} of byte {position} flipped",
                write(MANIFEST_NAME, bytes(flipped)),
            )
        )
    specials = b'"{}[]\\\x00\xff 9-,:e.'
    for _ in range(40):
        position = int(rng.integers(size))
        byte = specials[int(rng.integers(len(specials)))]
        changed = bytearray(text)
        changed[position] = byte
        cases.append(
            Case(
                f"manifest byte {position} set to {byte:#x}",
                write(MANIFEST_NAME, bytes(changed)),
            )
        )
    for _ in range(20):
        position = int(rng.integers(size))
        cases.append(
            Case(
                f"manifest byte {position} deleted",
                write(MANIFEST_NAME, text[:position] + text[position + 1 :]),
            )
        )
        cases.append(
            Case(
                f"manifest byte inserted at {position}",
                write(MANIFEST_NAME, text[:position] + b"0" + text[position:]),
            )
        )
    return cases


def manifest_field_cases(base: Base, rng: np.random.Generator) -> list[Case]:
    cases = []
    for path in leaf_paths(base.manifest):
        if not path:
            continue
        current = base.manifest
        for key in path:
            current = current[key]
        values = [_VALUE_POOL[i] for i in rng.choice(len(_VALUE_POOL), 6, False)]
        if type(current) is int:
            values += [current + 1, current - 1, current * 2, float(current)]
        elif type(current) is float:
            values += [current * 2, -current, 0.0]
        elif isinstance(current, str):
            values += [current + "x", current.upper(), current[:-1]]
        elif isinstance(current, bool):
            values += [not current]
        for value in values:
            delete = value is _DELETE
            if delete and isinstance(path[-1], int):
                continue
            shown = "deleted" if delete else f"= {repr(value)[:40]}"
            cases.append(
                Case(
                    f"manifest {'/'.join(map(str, path))} {shown}",
                    edit_manifest(set_path(path, value, delete)),
                )
            )
    return cases


def manifest_structure_cases(base: Base, rng: np.random.Generator) -> list[Case]:
    manifest = base.manifest
    count = len(manifest["checkpoints"])
    cases = []

    def swap(i: int, j: int) -> Callable[[dict], None]:
        def change(m: dict) -> None:
            entries = m["checkpoints"]
            entries[i], entries[j] = entries[j], entries[i]

        return change

    for i in range(count):
        for j in range(i + 1, count):
            cases.append(
                Case(
                    f"checkpoint entries {i} and {j} swapped", edit_manifest(swap(i, j))
                )
            )
            cases.append(
                Case(
                    f"hashes of entries {i} and {j} swapped",
                    edit_manifest(
                        lambda m, i=i, j=j: (
                            m["checkpoints"][i].update(
                                sha256=base.manifest["checkpoints"][j]["sha256"]
                            ),
                            m["checkpoints"][j].update(
                                sha256=base.manifest["checkpoints"][i]["sha256"]
                            ),
                        )
                    ),
                )
            )
        cases.append(
            Case(
                f"checkpoint entry {i} deleted",
                edit_manifest(lambda m, i=i: m["checkpoints"].pop(i)),
            )
        )
        cases.append(
            Case(
                f"checkpoint entry {i} listed twice",
                edit_manifest(
                    lambda m, i=i: m["checkpoints"].insert(i, m["checkpoints"][i])
                ),
            )
        )
        cases.append(
            Case(
                f"checkpoint entry {i} given an extra field",
                edit_manifest(lambda m, i=i: m["checkpoints"][i].update(note="x")),
            )
        )
    cases.append(
        Case(
            "checkpoints reversed",
            edit_manifest(lambda m: m["checkpoints"].reverse()),
        )
    )
    text = base.files[MANIFEST_NAME].decode()
    for key in ("format_version", "batch_size", "dtype", "num_steps", "checkpoints"):
        duplicated = text.replace("{", '{"' + key + '": 1, ', 1)
        cases.append(
            Case(f"duplicate key {key}", write(MANIFEST_NAME, duplicated.encode()))
        )
    for depth in (20, 500, 5000, 200_000):
        nested = "[" * depth + "]" * depth
        cases.append(
            Case(
                f"environment nested {depth} deep",
                write(
                    MANIFEST_NAME,
                    text.replace(
                        '"environment": {', f'"environment": {{"n": {nested}, ', 1
                    ).encode(),
                ),
            )
        )
    for literal in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 80):
        cases.append(
            Case(
                f"lr written as {literal[:12]}",
                write(
                    MANIFEST_NAME,
                    text.replace('"lr": 0.01', f'"lr": {literal}').encode(),
                ),
            )
        )
    for document in ("", "null", "[]", '"trace"', "1", "{}", "{" * 3, "\ufeff" + text):
        cases.append(
            Case(
                f"manifest replaced by {document[:10]!r}",
                write(MANIFEST_NAME, document.encode()),
            )
        )
    cases.append(
        Case("manifest in UTF-16", write(MANIFEST_NAME, text.encode("utf-16")))
    )
    cases.append(
        Case("manifest with a stray NUL", write(MANIFEST_NAME, text.encode() + b"\x00"))
    )
    # meaningless to a verifier: must be accepted
    reformatted = {
        "compact": json.dumps(manifest, separators=(",", ":")),
        "indented by 4": json.dumps(manifest, indent=4),
        "keys reversed": json.dumps(dict(reversed(list(manifest.items())))),
        "CRLF line ends": text.replace("\n", "\r\n"),
        "tabs": json.dumps(manifest, indent="\t"),
        "escaped ASCII": json.dumps(manifest).replace('"sgd"', '"\\u0073gd"'),
        "trailing whitespace": text + "\n\n  ",
    }
    for name, document in reformatted.items():
        cases.append(
            Case(f"manifest {name}", write(MANIFEST_NAME, document.encode()), True)
        )
    shuffled = dict(manifest)
    keys = list(shuffled)
    rng.shuffle(keys)
    cases.append(
        Case(
            "manifest keys shuffled",
            write(MANIFEST_NAME, json.dumps({k: manifest[k] for k in keys}).encode()),
            True,
        )
    )
    cases.append(
        Case(
            "unknown top-level field added",
            edit_manifest(lambda m: m.update(notes="x")),
        )
    )
    return cases


def _checkpoint_files(base: Base) -> list[str]:
    return [entry["file"] for entry in base.manifest["checkpoints"]]


def checkpoint_byte_cases(base: Base, rng: np.random.Generator) -> list[Case]:
    cases = []
    for relative in _checkpoint_files(base):
        payload = base.files[relative]
        size = len(payload)
        header_end = 8 + int.from_bytes(payload[:8], "little")
        for rehash in (False, True):
            writer = write_rehashed if rehash else write
            label = "rehashed" if rehash else "hash kept"
            cuts = {0, 7, 8, header_end - 1, header_end, size - 1}
            cuts |= set(rng.integers(0, size, 6 if rehash else 3).tolist())
            for cut in sorted(cuts):
                cases.append(
                    Case(
                        f"{relative} cut to {cut} bytes ({label})",
                        writer(relative, payload[:cut]),
                    )
                )
            for region, low, high, count in (
                ("length", 0, 8, 4 if rehash else 1),
                ("header", 8, header_end, 16 if rehash else 4),
                ("data", header_end, size, 30 if rehash else 6),
            ):
                for _ in range(count):
                    position, bit = int(rng.integers(low, high)), int(rng.integers(8))
                    flipped = bytearray(payload)
                    flipped[position] ^= 1 << bit
                    cases.append(
                        Case(
                            f"{relative} {region} byte {position} bit {bit} ({label})",
                            writer(relative, bytes(flipped)),
                        )
                    )
            cases.append(
                Case(f"{relative} doubled ({label})", writer(relative, payload * 2))
            )
    return cases


def _tensor_edit(key: str, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    def change(tensors: dict) -> None:
        result = edit(tensors[key].clone())
        if result is None:
            del tensors[key]
        else:
            tensors[key] = result

    return change


def _set_element(position: int, value) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[position % tensor.numel()] = value
        return tensor

    return edit


def checkpoint_tensor_cases(base: Base, rng: np.random.Generator) -> list[Case]:
    cases = []
    for entry in base.manifest["checkpoints"]:
        relative, step = entry["file"], entry["step"]
        tensors = load(base.files[relative])
        edits: dict[str, Callable[[dict], None]] = {}
        for key in sorted(tensors):
            value = tensors[key]
            if value.is_floating_point():
                position = int(rng.integers(1 << 20))
                edits[f"{key} NaN"] = _tensor_edit(
                    key, _set_element(position, float("nan"))
                )
                edits[f"{key} inf"] = _tensor_edit(
                    key, _set_element(position, float("inf"))
                )
                edits[f"{key} shifted by 1e-7"] = _tensor_edit(key, lambda t: t + 1e-7)
                edits[f"{key} as float64"] = _tensor_edit(key, lambda t: t.double())
                edits[f"{key} as float16"] = _tensor_edit(key, lambda t: t.half())
                edits[f"{key} flattened"] = _tensor_edit(
                    key, lambda t: t.reshape(-1)[:-1]
                )
            elif value.numel():
                position = int(rng.integers(value.numel()))
                for bad in (-1, 1437, 10**15, -(2**63)):
                    edits[f"{key}[{position}] = {bad}"] = _tensor_edit(
                        key, _set_element(position, bad)
                    )
                edits[f"{key} reversed"] = _tensor_edit(key, lambda t: t.flip(0))
                edits[f"{key} as int32"] = _tensor_edit(key, lambda t: t.int())
                edits[f"{key} one short"] = _tensor_edit(key, lambda t: t[:-1].clone())
            edits[f"{key} removed"] = _tensor_edit(key, lambda t: None)
        edits["extra tensor"] = lambda t: t.update(extra=torch.zeros(3))
        if "batch_indices" in tensors and tensors["batch_indices"].numel():
            edits["first batch in reverse order"] = _tensor_edit(
                "batch_indices", lambda t: torch.cat([t[:200].flip(0), t[200:]])
            )
        for metadata_name, metadata in (
            ("no metadata", None),
            (
                "metadata of another step",
                {"format": "forgelab-checkpoint", "step": str(step + 2)},
            ),
            ("metadata of another format", {"format": "other", "step": str(step)}),
        ):
            cases.append(
                Case(
                    f"{relative} {metadata_name}",
                    write_rehashed(relative, save(dict(tensors), metadata=metadata)),
                )
            )
        for name, change in edits.items():
            changed = dict(tensors)
            change(changed)
            payload = save(
                {k: v.contiguous() for k, v in changed.items()},
                metadata={"format": "forgelab-checkpoint", "step": str(step)},
            )
            cases.append(Case(f"{relative} {name}", write_rehashed(relative, payload)))
    return cases


def filesystem_cases(base: Base, outside: Path, marker: Path) -> list[Case]:
    files = _checkpoint_files(base)
    cases = []

    def remove(relative: str) -> Mutation:
        def mutate(root: Path) -> None:
            path = root / relative
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

        return mutate

    def replace_with(relative: str, make: Callable[[Path], None]) -> Mutation:
        def mutate(root: Path) -> None:
            (root / relative).unlink()
            make(root / relative)

        return mutate

    def symlink_outside(relative: str) -> Mutation:
        def mutate(root: Path) -> None:
            outside.mkdir(exist_ok=True)
            target = outside / Path(relative).name
            target.write_bytes(base.files[relative])
            (root / relative).unlink()
            (root / relative).symlink_to(target)

        return mutate

    def swap_files(a: str, b: str, rehash: bool) -> Mutation:
        def mutate(root: Path) -> None:
            (root / a).write_bytes(base.files[b])
            (root / b).write_bytes(base.files[a])
            if rehash:
                write_rehashed(a, base.files[b])(root)
                write_rehashed(b, base.files[a])(root)

        return mutate

    def pickle_payload(kind: str) -> bytes:
        payload = {"param/1.weight": torch.zeros(10, 64), "hook": _Marker(marker)}
        if kind == "pickle":
            return pickle.dumps(payload)
        scratch = outside.parent / "scratch.pt"
        torch.save(payload, scratch)
        return scratch.read_bytes()

    cases.append(Case("manifest deleted", remove(MANIFEST_NAME)))
    cases.append(Case("checkpoints directory deleted", remove("checkpoints")))
    cases.append(
        Case(
            "manifest replaced by a directory", replace_with(MANIFEST_NAME, Path.mkdir)
        )
    )
    cases.append(
        Case("manifest replaced by a FIFO", replace_with(MANIFEST_NAME, os.mkfifo))
    )
    cases.append(Case("manifest is a symlink outside", symlink_outside(MANIFEST_NAME)))

    def move_checkpoints(inside: bool) -> Mutation:
        def mutate(root: Path) -> None:
            outside.mkdir(exist_ok=True)
            target = root / "real" if inside else outside / "checkpoints"
            shutil.move(root / "checkpoints", target)
            (root / "checkpoints").symlink_to(target)

        return mutate

    cases.append(Case("checkpoints directory moved outside", move_checkpoints(False)))
    cases.append(Case("checkpoints directory symlinked inside", move_checkpoints(True)))
    for relative in files:
        name = Path(relative).name
        cases.append(Case(f"{name} deleted", remove(relative)))
        cases.append(
            Case(f"{name} replaced by a directory", replace_with(relative, Path.mkdir))
        )
        cases.append(
            Case(f"{name} replaced by a FIFO", replace_with(relative, os.mkfifo))
        )
        cases.append(Case(f"{name} is a symlink outside", symlink_outside(relative)))
        cases.append(
            Case(
                f"{name} is a symlink to another checkpoint",
                replace_with(
                    relative, lambda p: p.symlink_to(p.parent / Path(files[0]).name)
                ),
            )
        )
        cases.append(
            Case(
                f"{name} is /dev/zero",
                replace_with(relative, lambda p: p.symlink_to("/dev/zero")),
            )
        )
        for kind in ("pickle", "torch.save"):
            for rehash in (False, True):
                writer = write_rehashed if rehash else write
                cases.append(
                    Case(
                        f"{name} is a {kind} ({'rehashed' if rehash else 'hash kept'})",
                        writer(relative, pickle_payload(kind)),
                    )
                )
        cases.append(Case(f"{name} emptied (rehashed)", write_rehashed(relative, b"")))
    for a, b in zip(files, files[1:], strict=False):
        for rehash in (False, True):
            cases.append(
                Case(
                    f"{Path(a).name} and {Path(b).name} swapped"
                    f"{' (rehashed)' if rehash else ''}",
                    swap_files(a, b, rehash),
                )
            )
    stray = pickle.dumps(_Marker(marker))
    for relative in (
        "checkpoints/step-00000002.pt",
        "checkpoints/model.pkl",
        "checkpoints/step-00000003.safetensors",
        "checkpoints/notes.txt",
        "model.pt",
        "step-00000002.safetensors",
        "weights.bin",
    ):
        cases.append(Case(f"stray file {relative}", write(relative, stray)))
    # meaningless to a verifier: must be accepted
    cases.append(
        Case("README next to the manifest", write("README.md", b"notes\n"), True)
    )
    cases.append(
        Case(
            "temporary file of an interrupted write",
            write("checkpoints/.step-00000008.safetensors.abc123", b"partial"),
            True,
        )
    )
    cases.append(
        Case("temporary manifest", write(".manifest.json.tmp1234", b"{"), True)
    )
    return cases


FAMILIES = {
    "manifest bytes": lambda base, rng, paths: manifest_byte_cases(base, rng),
    "manifest fields": lambda base, rng, paths: manifest_field_cases(base, rng),
    "manifest structure": lambda base, rng, paths: manifest_structure_cases(base, rng),
    "checkpoint bytes": lambda base, rng, paths: checkpoint_byte_cases(base, rng),
    "checkpoint tensors": lambda base, rng, paths: checkpoint_tensor_cases(base, rng),
    "filesystem": lambda base, rng, paths: filesystem_cases(base, *paths),
}


@pytest.fixture(scope="module")
def base(tiny_trace_master, digits) -> Base:
    files = {
        str(path.relative_to(tiny_trace_master)): path.read_bytes()
        for path in sorted(tiny_trace_master.rglob("*"))
        if path.is_file()
    }
    trace = Trace(tiny_trace_master)
    with num_threads(1):
        report = verify_trace(trace, digits, tolerance=0.0)
    assert report.accepted and len(report.segments) == 4
    return Base(
        files, trace.manifest, load_contents(trace), replayed_fields(trace.manifest)
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz(family, base, digits, tmp_path, fuzz_counts, capsys):
    rng = np.random.default_rng(list(FAMILIES).index(family))
    marker = tmp_path / "unpickled"
    outside = tmp_path / "outside"
    cases = FAMILIES[family](base, rng, (outside, marker))
    root = tmp_path / "trace"
    counts = fuzz_counts.setdefault(family, Counter())
    failures: list[str] = []
    with num_threads(1):
        for number, case in enumerate(cases):
            # build the mutated copy
            if outside.exists():
                shutil.rmtree(outside)
            materialize(root, base.files)
            case.mutate(root)

            # verify it, then judge the outcome
            try:
                code, message = verify_in_process(root, digits)
                if code == 2:
                    assert message.startswith(f"{root}/") or message.startswith(
                        f"{root}:"
                    ), "message does not start with the file at fault"
                    assert "\n" not in message and "\r" not in message, "two lines"
                    assert len(message) < 400, "message too long"
                    assert not case.neutral, "a neutral mutation was rejected"
                    outcome = "rejected: unusable input (exit 2)"
                elif code == 1:
                    assert not case.neutral, "a neutral mutation was rejected"
                    outcome = "rejected: replay (exit 1)"
                else:
                    outcome = classify_acceptance(root, base, digits, case.neutral)
                assert not marker.exists(), "a pickle was loaded"
                if number % CLI_SAMPLE_EVERY == 0:
                    report_dir = tmp_path / "report"
                    cli_code = main(
                        [
                            "verify",
                            str(root),
                            "--tolerance",
                            "0",
                            "--out",
                            str(report_dir),
                        ]
                    )
                    out, err = capsys.readouterr()
                    assert cli_code == code, f"command line exit {cli_code}, not {code}"
                    assert "Traceback" not in err
                    if code == 2:
                        line = " ".join(message.split())
                        assert err.strip().splitlines() == [f"forgelab: error: {line}"]
                    else:
                        assert ("ACCEPTED" in out) == (code == 0)
            except AssertionError as error:
                failures.append(f"{case.name}: {error}")
                outcome = "FAILED"
            except Exception as error:  # noqa: BLE001 - a traceback is the failure
                lines = traceback.format_exception(error)
                failures.append(f"{case.name}: traceback {''.join(lines[-3:])}")
                outcome = "FAILED"
            counts[outcome] += 1
    assert len(cases) == sum(counts.values())
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(
        failures[:15]
    )


def test_the_independent_replay_can_tell(base, tiny_trace, digits):
    """The oracle's own replay reproduces the recording, and not a shifted weight."""
    from helpers import rewrite_checkpoint, shift_one_weight

    with num_threads(1):
        assert reproduces_independently(Trace(tiny_trace), digits)
        rewrite_checkpoint(tiny_trace, 4, shift_one_weight(1e-6))
        assert not reproduces_independently(Trace(tiny_trace), digits)
