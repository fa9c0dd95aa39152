"""Tiny files in the real distribution formats of CIFAR-10, IMDB and Adult.

The CIFAR-10 python batch files were written by Python 2's cPickle at protocol 2:
a dict whose ``data`` is a numpy uint8 array pickled through
``numpy.core.multiarray._reconstruct`` with its bytes as a Python 2 ``str``
(BINSTRING). :func:`cifar_python_batch` writes that opcode stream byte by byte, since
Python 3 cannot produce Python 2 strings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CIFAR_PIXELS = 3 * 32 * 32


def _short_string(value: bytes) -> bytes:
    return b"U" + bytes([len(value)]) + value


def _string(value: bytes) -> bytes:
    return b"T" + len(value).to_bytes(4, "little") + value


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + value.to_bytes(2, "little")
    return b"J" + value.to_bytes(4, "little", signed=True)


def cifar_python_batch(
    pixels: np.ndarray, labels: list[int], batch_label: bytes = b"training batch"
) -> bytes:
    """A CIFAR-10 python batch file as Python 2 cPickle wrote it (protocol 2)."""
    count = pixels.shape[0]
    out = bytearray(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
    # 'data': numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')
    out += _short_string(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    out += _int(0) + b"\x85" + _short_string(b"b") + b"\x87R"
    # BUILD with (1, (n, 3072), dtype('u1'), False, raw bytes)
    out += b"(" + _int(1) + _int(count) + _int(pixels.shape[1]) + b"\x86"
    out += b"cnumpy\ndtype\n" + _short_string(b"u1") + _int(0) + _int(1) + b"\x87R"
    out += b"(" + _int(3) + _short_string(b"|") + b"NNN"
    out += b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _int(0) + b"tb"
    out += b"\x89" + _string(np.ascontiguousarray(pixels).tobytes()) + b"tb"
    # 'labels': a list of ints; 'batch_label' and 'filenames' as in the real files
    out += _short_string(b"labels") + b"](" + b"".join(_int(v) for v in labels) + b"e"
    out += _short_string(b"batch_label") + _short_string(batch_label)
    names = b"".join(_short_string(f"img_{i}.png".encode()) for i in range(count))
    out += _short_string(b"filenames") + b"](" + names + b"e"
    out += b"u."  # SETITEMS, STOP
    return bytes(out)


def cifar_arrays(
    per_batch: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random pixels and labels for five training batches and one test batch."""
    rng = np.random.default_rng(seed)
    pixels = [
        rng.integers(0, 256, size=(per_batch, CIFAR_PIXELS), dtype=np.uint8)
        for _ in range(6)
    ]
    labels = [rng.integers(0, 10, size=per_batch) for _ in range(6)]
    return pixels, labels


def write_cifar_python(directory: Path, per_batch: int = 4, seed: int = 0) -> None:
    """Write data_batch_1..5 and test_batch (python version) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels, labels = cifar_arrays(per_batch, seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, x, y in zip(names, pixels, labels, strict=True):
        (directory / name).write_bytes(cifar_python_batch(x, [int(v) for v in y]))


def write_cifar_binary(directory: Path, per_batch: int = 4, seed: int = 0) -> None:
    """Write data_batch_1.bin..5.bin and test_batch.bin (binary version)."""
    directory.mkdir(parents=True, exist_ok=True)
    pixels, labels = cifar_arrays(per_batch, seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, x, y in zip(names, pixels, labels, strict=True):
        records = np.concatenate([y.astype(np.uint8)[:, None], x], axis=1)
        (directory / name).write_bytes(records.tobytes())


def imdb_sequences(
    count: int, vocab_size: int, seed: int
) -> tuple[list[list[int]], np.ndarray]:
    """Token-id lists of varying length (some longer than 200) and binary labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 260, size=count)
    sequences = [
        [1, *rng.integers(2, vocab_size, size=n - 1).tolist()] for n in lengths
    ]
    labels = np.arange(count) % 2
    return sequences, labels.astype(np.int64)


def write_imdb_keras(
    directory: Path, num_train: int = 24, num_test: int = 8, vocab_size: int = 30
) -> None:
    """imdb.npz as Keras ships it: object arrays of token-id lists."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, seed in (("train", num_train, 1), ("test", num_test, 2)):
        sequences, labels = imdb_sequences(count, vocab_size, seed)
        objects = np.empty(count, dtype=object)
        objects[:] = sequences
        arrays[f"x_{split}"], arrays[f"y_{split}"] = objects, labels
    # the largest id appears once, so the vocabulary is exactly vocab_size
    arrays["x_train"][0] = [*arrays["x_train"][0][:-1], vocab_size - 1]
    np.savez(directory / "imdb.npz", **arrays)


ADULT_ROWS = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, "
    "Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K",
    "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, "
    "Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, <=50K",
    "38, Private, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, "
    "White, Male, 0, 0, 40, United-States, <=50K",
    "53, Private, 234721, 11th, 7, Married-civ-spouse, Handlers-cleaners, Husband, "
    "Black, Male, 0, 0, 40, United-States, <=50K",
    "28, Private, 338409, Bachelors, 13, Married-civ-spouse, Prof-specialty, Wife, "
    "Black, Female, 0, 0, 40, Cuba, <=50K",
    "37, Private, 284582, Masters, 14, Married-civ-spouse, Exec-managerial, Wife, "
    "White, Female, 0, 0, 40, United-States, <=50K",
    "52, Self-emp-not-inc, 209642, HS-grad, 9, Married-civ-spouse, "
    "Exec-managerial, Husband, White, Male, 0, 0, 45, United-States, >50K",
    "31, Private, 45781, Masters, 14, Never-married, Prof-specialty, "
    "Not-in-family, White, Female, 14084, 0, 50, United-States, >50K",
    "42, Private, 159449, Bachelors, 13, Married-civ-spouse, Exec-managerial, "
    "Husband, White, Male, 5178, 0, 40, United-States, >50K",
    "54, ?, 180211, Some-college, 10, Married-civ-spouse, ?, Husband, "
    "Asian-Pac-Islander, Male, 0, 0, 60, South, >50K",
]
"""Ten rows in the layout of adult.data (the first ten of the real file, with one row
with unknown values in place of the tenth)."""


def write_adult(directory: Path, repeat: int = 4) -> None:
    """adult.data (the rows, repeated) and adult.test (its header line, '.' labels)."""
    directory.mkdir(parents=True, exist_ok=True)
    train = "\n".join(ADULT_ROWS * repeat) + "\n\n"
    (directory / "adult.data").write_text(train)
    test_rows = [row + "." for row in ADULT_ROWS[:6]]
    (directory / "adult.test").write_text(
        "|1x3 Cross validator\n" + "\n".join(test_rows) + "\n"
    )
