"""Readers for the standard distribution files of CIFAR-10, IMDB and Adult.

Each reader takes the directory given with ``--data-dir``, checks what it finds and
returns raw arrays; :mod:`forgelab.data` turns them into datasets. A file that is
missing or malformed raises :class:`~forgelab.errors.DataError` with one line naming
the file and what was expected. Nothing is unpickled with ``pickle.load``; the two
formats that are pickles go through :mod:`forgelab.safe_pickle`.

- CIFAR-10 (Krizhevsky 2009): the "python version" batch files ``data_batch_1`` to
  ``data_batch_5`` and ``test_batch`` (pickled dicts with ``data``, a 10000 x 3072
  uint8 array, and ``labels``), or the "binary version" ``data_batch_1.bin`` to
  ``data_batch_5.bin`` and ``test_batch.bin`` (records of one label byte and 3,072
  pixel bytes). Both give the same arrays, hence the same fingerprint.
- IMDB (Maas et al. 2011) as token ids: ``imdb.npz`` with ``x_train``, ``y_train``,
  ``x_test``, ``y_test``. ``x_*`` is either an integer matrix or, as in the Keras
  preparation, an object array of token-id lists.
- Adult (UCI census income, Kohavi 1996): ``adult.data`` and ``adult.test``.
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forgelab.errors import DataError
from forgelab.safe_pickle import UnsafePickleError, load_restricted, to_array

logger = logging.getLogger(__name__)

MAX_CIFAR_FILE_BYTES = 64 * 2**20
"""Largest CIFAR-10 batch file read (the standard ones are about 31 MB)."""
MAX_NPZ_MEMBER_BYTES = 2**30
"""Largest array read from an ``.npz`` (the Keras IMDB arrays are a few MB)."""
MAX_CSV_FILE_BYTES = 64 * 2**20
"""Largest Adult CSV file read (the standard ones are about 4 MB)."""
MAX_EXAMPLES = 10**6
MAX_VOCAB_SIZE = 10**6
IMDB_CONTEXT = 200
"""Sequence length of the IMDB setup (Suliman et al. 2025)."""

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
_CIFAR_PIXELS = 3 * 32 * 32


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"{path}: {size} bytes, larger than any {what} ({limit})")
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read {what} ({error})") from None


def _cifar_layout(data_dir: Path) -> tuple[list[Path], Path, str]:
    names = [*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE]
    for folder in (data_dir, data_dir / "cifar-10-batches-py"):
        if all((folder / name).is_file() for name in names):
            return [folder / n for n in CIFAR_TRAIN_FILES], folder / names[-1], "py"
    for folder in (data_dir, data_dir / "cifar-10-batches-bin"):
        if all((folder / f"{name}.bin").is_file() for name in names):
            train = [folder / f"{n}.bin" for n in CIFAR_TRAIN_FILES]
            return train, folder / f"{names[-1]}.bin", "bin"
    missing = next(
        (
            name
            for name in names
            if not (data_dir / name).is_file()
            and not (data_dir / "cifar-10-batches-py" / name).is_file()
        ),
        names[0],
    )
    raise DataError(
        f"{data_dir}: missing CIFAR-10 file {missing}; expected the python batch "
        "files data_batch_1..data_batch_5 and test_batch (or the binary "
        "data_batch_1.bin..data_batch_5.bin and test_batch.bin), in the directory or "
        "in cifar-10-batches-py/"
    )


def _read_cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    payload = _read_capped(path, MAX_CIFAR_FILE_BYTES, "CIFAR-10 batch file")
    try:
        batch = load_restricted(payload)
    except UnsafePickleError as error:
        raise DataError(f"{path}: {error}") from None
    except pickle.UnpicklingError as error:
        raise DataError(
            f"{path}: not a CIFAR-10 python batch file (unreadable pickle: {error})"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch file (not a dict)")
    fields = {
        (key.decode("latin1") if isinstance(key, bytes) else key): value
        for key, value in batch.items()
    }
    if "data" not in fields or "labels" not in fields:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    try:
        pixels = to_array(fields["data"])
    except pickle.UnpicklingError as error:
        raise DataError(f"{path}: 'data' is not a numpy array ({error})") from None
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != _CIFAR_PIXELS
    ):
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape (n, 3072), got "
            f"{getattr(pixels, 'dtype', type(pixels).__name__)} "
            f"{getattr(pixels, 'shape', '')}"
        )
    labels = fields["labels"]
    if (
        not isinstance(labels, list)
        or len(labels) != pixels.shape[0]
        or not all(type(label) is int and 0 <= label <= 9 for label in labels)
    ):
        raise DataError(
            f"{path}: 'labels' must be a list of {pixels.shape[0]} integers in 0-9"
        )
    return np.ascontiguousarray(pixels), np.asarray(labels, dtype=np.int64)


def _read_cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    payload = _read_capped(path, MAX_CIFAR_FILE_BYTES, "CIFAR-10 batch file")
    record = 1 + _CIFAR_PIXELS
    if not payload or len(payload) % record:
        raise DataError(
            f"{path}: {len(payload)} bytes is not a whole number of CIFAR-10 binary "
            f"records of {record} bytes (one label byte, 3072 pixel bytes)"
        )
    records = np.frombuffer(payload, dtype=np.uint8).reshape(-1, record)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label byte {int(labels.max())} is not in 0-9")
    return np.ascontiguousarray(records[:, 1:]), labels


def read_cifar10(data_dir: Path) -> dict[str, np.ndarray]:
    """Read CIFAR-10 from its python or binary batch files.

    Args:
        data_dir: The directory holding the batch files (or their standard
            ``cifar-10-batches-py`` / ``cifar-10-batches-bin`` subdirectory).

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test``; images as uint8 rows of
        3,072 values (1,024 red, 1,024 green, 1,024 blue, each 32 x 32 row-major).

    Raises:
        DataError: If a file is missing, unsafe or malformed.
    """
    train_files, test_file, kind = _cifar_layout(data_dir)
    read = _read_cifar_python_batch if kind == "py" else _read_cifar_binary_batch
    parts = [read(path) for path in train_files]
    x_test, y_test = read(test_file)
    logger.info("read CIFAR-10 %s batch files from %s", kind, train_files[0].parent)
    return {
        "x_train": np.concatenate([x for x, _ in parts]),
        "y_train": np.concatenate([y for _, y in parts]),
        "x_test": x_test,
        "y_test": y_test,
    }


IMDB_FILE = "imdb.npz"
IMDB_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read_npy(path: Path, key: str, payload: bytes) -> np.ndarray | list:
    """Parse one ``.npy`` member: numeric arrays directly, object arrays safely."""
    stream = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as error:
        raise DataError(f"{path}: {key} is not a .npy array ({error})") from None
    rest = payload[stream.tell() :]
    if dtype.hasobject:
        if dtype != np.dtype(object):
            raise DataError(f"{path}: {key} has an unsupported dtype {dtype}")
        try:
            values = to_array(load_restricted(rest))
        except UnsafePickleError as error:
            raise DataError(f"{path}: {key}: {error}") from None
        except pickle.UnpicklingError as error:
            raise DataError(
                f"{path}: {key}: unreadable object array ({error})"
            ) from None
        if not isinstance(values, list) or len(shape) != 1 or len(values) != shape[0]:
            raise DataError(f"{path}: {key} must be a one-dimensional object array")
        return values
    if dtype.kind not in "iub" or dtype.fields is not None:
        raise DataError(f"{path}: {key} has dtype {dtype}; expected integers")
    count = int(np.prod(shape))
    if len(rest) != count * dtype.itemsize:
        raise DataError(
            f"{path}: {key} declares shape {shape} but holds {len(rest)} bytes"
        )
    return np.frombuffer(rest, dtype=dtype).reshape(
        shape, order="F" if fortran else "C"
    )


def _as_sequence(path: Path, key: str, position: int, value: object) -> np.ndarray:
    if isinstance(value, list | tuple) and all(type(v) is int for v in value):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    try:
        array = to_array(value)
    except pickle.UnpicklingError:
        array = None
    if isinstance(array, np.ndarray) and array.ndim == 1 and array.dtype.kind in "iu":
        return array.astype(np.int64)
    raise DataError(f"{path}: {key}[{position}] is not a sequence of integer token ids")


def pad_sequences(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Pad or truncate token sequences to ``length``, as Keras does by default.

    Longer sequences keep their last ``length`` tokens; shorter ones get zeros (the
    padding id) in front.
    """
    padded = np.zeros((len(sequences), length), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        kept = sequence[-length:]
        if len(kept):
            padded[row, length - len(kept) :] = kept
    return padded


def read_imdb(data_dir: Path, context: int = IMDB_CONTEXT) -> dict[str, np.ndarray]:
    """Read IMDB token ids from ``imdb.npz`` and pad or truncate them to ``context``.

    Args:
        data_dir: Directory holding ``imdb.npz``.
        context: Sequence length.

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` (token ids as int64
        matrices of width ``context``) and ``vocab_size`` (largest id plus one).

    Raises:
        DataError: If the file is missing, unsafe or malformed.
    """
    path = data_dir / IMDB_FILE
    if not path.is_file():
        raise DataError(
            f"{data_dir}: missing {IMDB_FILE}; expected an .npz with arrays "
            f"{', '.join(IMDB_ARRAYS)} (token-id sequences and labels)"
        )
    arrays: dict[str, np.ndarray | list] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key in IMDB_ARRAYS:
                try:
                    info = archive.getinfo(f"{key}.npy")
                except KeyError:
                    raise DataError(
                        f"{path}: missing array {key}; expected "
                        f"{', '.join(IMDB_ARRAYS)}"
                    ) from None
                if info.file_size > MAX_NPZ_MEMBER_BYTES:
                    raise DataError(f"{path}: {key} is too large ({info.file_size} B)")
                arrays[key] = _read_npy(path, key, archive.read(info))
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    result: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: y_{split} must be a vector of integer labels")
        if isinstance(x, np.ndarray) and x.ndim == 2:
            sequences = [row.astype(np.int64) for row in x]
        elif isinstance(x, list):
            sequences = [
                _as_sequence(path, f"x_{split}", i, value) for i, value in enumerate(x)
            ]
        else:
            raise DataError(
                f"{path}: x_{split} must be an integer matrix or an object array of "
                "token-id sequences"
            )
        if len(sequences) != len(y) or not 1 <= len(y) <= MAX_EXAMPLES:
            raise DataError(
                f"{path}: x_{split} has {len(sequences)} sequences but y_{split} has "
                f"{len(y)} labels"
            )
        result[f"x_{split}"] = pad_sequences(sequences, context)
        result[f"y_{split}"] = y.astype(np.int64)
    tokens = np.concatenate([result["x_train"].ravel(), result["x_test"].ravel()])
    if tokens.min() < 0 or tokens.max() >= MAX_VOCAB_SIZE:
        raise DataError(
            f"{path}: token ids must lie in [0, {MAX_VOCAB_SIZE}); found "
            f"{int(tokens.min())}..{int(tokens.max())}"
        )
    labels = np.concatenate([result["y_train"], result["y_test"]])
    if labels.min() < 0 or labels.max() < 1:
        raise DataError(
            f"{path}: labels must be class indices 0, 1, ... of at least two classes; "
            f"found {int(labels.min())}..{int(labels.max())}"
        )
    result["vocab_size"] = np.asarray(int(tokens.max()) + 1)
    return result


ADULT_FILES = ("adult.data", "adult.test")
ADULT_COLUMNS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("age", None),
    (
        "workclass",
        (
            "Private",
            "Self-emp-not-inc",
            "Self-emp-inc",
            "Federal-gov",
            "Local-gov",
            "State-gov",
            "Without-pay",
            "Never-worked",
        ),
    ),
    ("fnlwgt", None),
    (
        "education",
        (
            "Bachelors",
            "Some-college",
            "11th",
            "HS-grad",
            "Prof-school",
            "Assoc-acdm",
            "Assoc-voc",
            "9th",
            "7th-8th",
            "12th",
            "Masters",
            "1st-4th",
            "10th",
            "Doctorate",
            "5th-6th",
            "Preschool",
        ),
    ),
    ("education-num", None),
    (
        "marital-status",
        (
            "Married-civ-spouse",
            "Divorced",
            "Never-married",
            "Separated",
            "Widowed",
            "Married-spouse-absent",
            "Married-AF-spouse",
        ),
    ),
    (
        "occupation",
        (
            "Tech-support",
            "Craft-repair",
            "Other-service",
            "Sales",
            "Exec-managerial",
            "Prof-specialty",
            "Handlers-cleaners",
            "Machine-op-inspct",
            "Adm-clerical",
            "Farming-fishing",
            "Transport-moving",
            "Priv-house-serv",
            "Protective-serv",
            "Armed-Forces",
        ),
    ),
    (
        "relationship",
        (
            "Wife",
            "Own-child",
            "Husband",
            "Not-in-family",
            "Other-relative",
            "Unmarried",
        ),
    ),
    (
        "race",
        ("White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black"),
    ),
    ("sex", ("Female", "Male")),
    ("capital-gain", None),
    ("capital-loss", None),
    ("hours-per-week", None),
    (
        "native-country",
        (
            "United-States",
            "Cambodia",
            "England",
            "Puerto-Rico",
            "Canada",
            "Germany",
            "Outlying-US(Guam-USVI-etc)",
            "India",
            "Japan",
            "Greece",
            "South",
            "China",
            "Cuba",
            "Iran",
            "Honduras",
            "Philippines",
            "Italy",
            "Poland",
            "Jamaica",
            "Vietnam",
            "Mexico",
            "Portugal",
            "Ireland",
            "France",
            "Dominican-Republic",
            "Laos",
            "Ecuador",
            "Taiwan",
            "Haiti",
            "Columbia",
            "Hungary",
            "Guatemala",
            "Nicaragua",
            "Scotland",
            "Thailand",
            "Yugoslavia",
            "El-Salvador",
            "Trinadad&Tobago",
            "Peru",
            "Hong",
            "Holand-Netherlands",
        ),
    ),
)
"""The 14 attributes of adult.names in file order; None marks a numeric one.

Category lists are fixed from adult.names, so the feature layout does not depend on
which rows a file happens to hold.
"""
ADULT_LABELS = {"<=50K": 0, ">50K": 1}


@dataclass(frozen=True)
class FeatureGroup:
    """A block of input columns that encode one attribute.

    Attributes:
        name: Attribute name.
        start: First column.
        stop: One past the last column.
        kind: ``"numeric"`` (one min-max scaled column) or ``"one-hot"`` (at most one
            column is 1; all 0 when the value is unknown).
    """

    name: str
    start: int
    stop: int
    kind: str


def adult_feature_groups() -> tuple[FeatureGroup, ...]:
    """The column blocks of the Adult encoding, in order (105 columns)."""
    groups, start = [], 0
    for name, categories in ADULT_COLUMNS:
        width = 1 if categories is None else len(categories)
        kind = "numeric" if categories is None else "one-hot"
        groups.append(FeatureGroup(name, start, start + width, kind))
        start += width
    return tuple(groups)


def _parse_adult(path: Path) -> tuple[np.ndarray, np.ndarray]:
    payload = _read_capped(path, MAX_CSV_FILE_BYTES, "Adult CSV file")
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not an ASCII CSV file") from None
    groups = adult_feature_groups()
    width = groups[-1].stop
    rows, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("|"):
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != len(ADULT_COLUMNS) + 1:
            raise DataError(
                f"{path}:{number}: {len(fields)} fields; expected "
                f"{len(ADULT_COLUMNS) + 1} (the 14 attributes of adult.names and "
                "the income label)"
            )
        row = np.zeros(width)
        for (name, categories), group, value in zip(
            ADULT_COLUMNS, groups, fields, strict=False
        ):
            if categories is None:
                try:
                    row[group.start] = int(value)
                except ValueError:
                    raise DataError(
                        f"{path}:{number}: {name} {value!r} is not an integer"
                    ) from None
            elif value != "?":
                if value not in categories:
                    raise DataError(f"{path}:{number}: unknown {name} {value!r}")
                row[group.start + categories.index(value)] = 1.0
        label = fields[-1].rstrip(".")
        if label not in ADULT_LABELS:
            raise DataError(
                f"{path}:{number}: income label {fields[-1]!r}; expected <=50K or >50K"
            )
        rows.append(row)
        labels.append(ADULT_LABELS[label])
    if not rows:
        raise DataError(f"{path}: no data rows")
    if len(rows) > MAX_EXAMPLES:
        raise DataError(f"{path}: more than {MAX_EXAMPLES} rows")
    return np.stack(rows), np.asarray(labels, dtype=np.int64)


def read_adult(data_dir: Path) -> dict[str, np.ndarray]:
    """Read the UCI Adult files and encode them.

    Preprocessing: the six numeric attributes are kept as raw values and min-max
    scaled with the minimum and maximum of adult.data (test values outside that
    range are clipped to it); the eight categorical ones are one-hot encoded with the
    categories of adult.names, an unknown value (``?``) encoding as all zeros; the
    label is 1 for income >50K. Rows with unknown values are kept.

    Args:
        data_dir: Directory holding ``adult.data`` and ``adult.test``.

    Returns:
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` (raw float64 features),
        ``offset`` and ``scale`` (per column: raw minus offset, divided by scale, lies
        in [0, 1]).

    Raises:
        DataError: If a file is missing or malformed.
    """
    for name in ADULT_FILES:
        if not (data_dir / name).is_file():
            raise DataError(
                f"{data_dir}: missing Adult file {name}; expected the UCI files "
                f"{' and '.join(ADULT_FILES)}"
            )
    x_train, y_train = _parse_adult(data_dir / ADULT_FILES[0])
    x_test, y_test = _parse_adult(data_dir / ADULT_FILES[1])
    offset = np.zeros(x_train.shape[1])
    scale = np.ones(x_train.shape[1])
    for group in adult_feature_groups():
        if group.kind == "numeric":
            column = group.start
            low, high = x_train[:, column].min(), x_train[:, column].max()
            offset[column], scale[column] = low, (high - low) or 1.0
            x_test[:, column] = np.clip(x_test[:, column], low, high)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "offset": offset,
        "scale": scale,
    }
