"""Reading files that come from an untrusted party, without trusting them.

Three building blocks for the trace reader:

- :func:`read_regular_file` opens a file without following a symbolic link, refuses
  anything that is not a regular file (a FIFO would stall the reader, a device would
  never end) and reads at most a given number of bytes.
- :func:`parse_json` parses JSON strictly: duplicate keys, ``NaN``/``Infinity``,
  numbers that overflow to infinity and integers longer than
  :data:`MAX_INTEGER_DIGITS` digits are rejected, and so is nesting deep enough to
  exhaust the interpreter's recursion limit.
- :func:`read_safetensors_header` checks the header of a safetensors file (its length,
  the dtype, shape and byte range of every tensor, and that the byte ranges tile the
  data exactly) before any tensor is built, so a header that claims more data than the
  file holds or an unexpected shape is rejected before anything is allocated.

Every problem is raised as :class:`~forgelab.errors.TraceError` with a one-line
message that starts with the file's path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from forgelab.errors import TraceError

MAX_INTEGER_DIGITS = 40
"""Longest integer literal accepted in JSON; every count in a trace is far shorter."""

MAX_HEADER_BYTES = 2**20
"""Largest safetensors header accepted; a checkpoint's header is a few kilobytes."""

MAX_DIMENSIONS = 8
"""Most dimensions a tensor in a checkpoint may have."""

SAFETENSORS_DTYPES = {"F32": 4, "F64": 8, "I64": 8}
"""The safetensors dtypes a checkpoint may use, with their item sizes in bytes."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header.

    Attributes:
        dtype: The safetensors dtype name, e.g. ``"F32"``.
        shape: The tensor's shape.
        begin: Offset of its first byte in the data section.
        end: Offset one past its last byte.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _one_line(text: str, limit: int = 160) -> str:
    """Collapse whitespace so that a message stays on one line, and shorten it."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_regular_file(path: Path, limit: int, what: str = "file") -> bytes:
    """Read a whole regular file of at most ``limit`` bytes.

    The last path component must not be a symbolic link (the caller checks the
    directories above it). The size is checked on the open file, before reading, and
    again while reading, so a file that grows meanwhile is still cut off.

    Args:
        path: The file.
        limit: Largest accepted size in bytes.
        what: What the file is, for messages (``"manifest"``, ``"checkpoint"``).

    Returns:
        The file's bytes.

    Raises:
        TraceError: If the file is missing, a symbolic link, not a regular file,
            larger than ``limit`` or unreadable.
    """
    if path.is_symlink():
        raise TraceError(f"{path}: {what} is a symbolic link; traces hold plain files")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        handle = os.open(path, flags)
    except FileNotFoundError:
        raise TraceError(f"{path}: {what} file missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise TraceError(f"{path}: {what} is a symbolic link") from None
        raise TraceError(f"{path}: cannot open {what} ({error.strerror})") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise TraceError(f"{path}: {what} is not a regular file")
        if info.st_size > limit:
            raise TraceError(
                f"{path}: {what} has {info.st_size} bytes, more than the {limit} "
                "this trace can need"
            )
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(handle, min(remaining, 2**24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as error:
        raise TraceError(f"{path}: cannot read {what} ({error.strerror})") from None
    finally:
        os.close(handle)
    payload = b"".join(chunks)
    if len(payload) > limit:
        raise TraceError(f"{path}: {what} grew beyond {limit} bytes while being read")
    return payload


class _StrictJSONError(ValueError):
    """A JSON document that is well-formed but not acceptable in a trace."""


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _StrictJSONError(f"duplicate key {_one_line(repr(key), 60)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> float:
    raise _StrictJSONError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _StrictJSONError(f"number {_one_line(text, 40)} overflows")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _StrictJSONError(
            f"integer with {len(text.lstrip('-'))} digits (at most "
            f"{MAX_INTEGER_DIGITS})"
        )
    return int(text)


def parse_json(payload: bytes, path: Path, what: str = "JSON") -> object:
    """Parse a JSON document strictly.

    Args:
        payload: The raw bytes, UTF-8 encoded.
        path: The file they came from, for messages.
        what: What the document is, for messages.

    Returns:
        The parsed document.

    Raises:
        TraceError: If the bytes are not UTF-8, not JSON, hold duplicate keys,
            non-finite or oversized numbers, or are nested too deeply.
    """
    try:
        text = payload.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except UnicodeDecodeError as error:
        raise TraceError(f"{path}: {what} is not UTF-8 (byte {error.start})") from None
    except RecursionError:
        raise TraceError(f"{path}: {what} is nested too deeply") from None
    except ValueError as error:
        raise TraceError(f"{path}: {what} is not valid ({_one_line(error)})") from None


def _looks_like_pickle(payload: bytes) -> str | None:
    """Name the serialisation format of a pickle-based file, from its first bytes."""
    if payload[:4] == b"PK\x03\x04":
        return "a zip archive (the torch.save format, which holds a pickle)"
    if len(payload) >= 2 and payload[0] == 0x80 and 2 <= payload[1] <= 5:
        return "a Python pickle"
    return None


def _check_tensor_entry(
    path: Path, key: str, entry: object, data_length: int
) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise TraceError(f"{path}: safetensors entry {key!r} is malformed")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise TraceError(
            f"{path}: tensor {key!r} has dtype {_one_line(repr(dtype), 40)}; "
            f"checkpoints use only {', '.join(SAFETENSORS_DTYPES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise TraceError(f"{path}: tensor {key!r} has a malformed shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_length
    ):
        raise TraceError(
            f"{path}: tensor {key!r} has byte range {_one_line(repr(offsets), 60)} "
            f"outside the {data_length} data bytes"
        )
    size = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != size:
        raise TraceError(
            f"{path}: tensor {key!r} of shape {tuple(shape)} needs {size} bytes, "
            f"its byte range holds {offsets[1] - offsets[0]}"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_safetensors_header(
    path: Path, payload: bytes
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of a safetensors file held in memory.

    Args:
        path: The file, for messages.
        payload: The whole file.

    Returns:
        The tensors by name, and the header's string metadata.

    Raises:
        TraceError: If the file is a pickle or zip archive, or its header is
            truncated, oversized, not strict JSON, or describes tensors that do not
            tile the data section exactly.
    """
    length = int.from_bytes(payload[:8], "little") if len(payload) >= 8 else 0
    fits = 2 <= length <= min(MAX_HEADER_BYTES, len(payload) - 8)
    # a pickle's first bytes can also read as a plausible header length, and a
    # header length can start with the pickle marker byte: only a file whose header
    # is not a JSON object is named as a pickle
    kind = _looks_like_pickle(payload)
    if kind is not None and not (fits and payload[8:9] == b"{"):
        raise TraceError(
            f"{path}: is {kind}, not safetensors; forgelab never unpickles a trace"
        )
    if len(payload) < 8:
        raise TraceError(f"{path}: truncated safetensors file ({len(payload)} bytes)")
    if not fits:
        raise TraceError(
            f"{path}: safetensors header length {length} does not fit the "
            f"{len(payload)}-byte file"
        )
    header = parse_json(payload[8 : 8 + length], path, "safetensors header")
    if not isinstance(header, dict):
        raise TraceError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(v, str) for v in metadata.values()
    ):
        raise TraceError(f"{path}: safetensors metadata must map strings to strings")
    data_length = len(payload) - 8 - length
    tensors = {
        key: _check_tensor_entry(path, key, entry, data_length)
        for key, entry in header.items()
    }
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise TraceError(
                f"{path}: safetensors data has a gap or overlap at byte {position}"
            )
        position = info.end
    if position != data_length:
        raise TraceError(
            f"{path}: {data_length - position} bytes after the last tensor's data"
        )
    return tensors, metadata
