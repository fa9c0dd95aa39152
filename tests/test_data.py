import gzip
import os
import re
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from forgelab.data import fingerprint_arrays, load_dataset, load_mnist_idx, read_idx
from forgelab.errors import DataError

# sha256 of the raw arrays (train and test inputs and labels) of each embedded dataset
FINGERPRINTS = {
    "mnist": "d27a005d8620e95328f6df3c561763459b0dd77105e9c50c5f97998139969945",
    "digits": "1553d9c74495d39d9719f7c94812febcc479679dbf1fed0d7e15f9741d8165ee",
    "breast-cancer": "719fa6f46c6b678f707fbb00ca057ef32165c1d81e913f4434cf2f0339113fd5",
}


@pytest.mark.parametrize(
    ("name", "shape", "num_train", "num_test", "num_classes", "levels"),
    [
        ("mnist", (1, 28, 28), 4000, 1000, 10, 256),
        ("digits", (1, 8, 8), 1437, 360, 10, 17),
        ("breast-cancer", (30,), 455, 114, 2, None),
    ],
)
def test_domains(name, shape, num_train, num_test, num_classes, levels):
    data = load_dataset(name)
    assert data.domain.input_shape == shape
    assert tuple(data.x_train.shape) == (num_train, *shape)
    assert tuple(data.x_test.shape) == (num_test, *shape)
    assert data.domain.num_classes == num_classes
    assert data.domain.num_levels == levels
    assert data.x_train.dtype == torch.float32
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert set(data.y_train.unique().tolist()) == set(range(num_classes))
    if levels is not None:
        # raw values lie on the integer grid, and scaling divides by the top value
        raw = data.raw_train
        assert np.array_equal(raw, np.round(raw))
        assert raw.min() == 0 and raw.max() == levels - 1
        scaled = data.x_train.reshape(num_train, -1).numpy()
        assert np.allclose(scaled * (levels - 1), raw, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_fingerprints_are_stable(name):
    assert load_dataset(name).fingerprint == FINGERPRINTS[name]


def test_fingerprint_covers_dtype_shape_and_values():
    base = fingerprint_arrays(np.arange(6, dtype=np.uint8))
    assert base != fingerprint_arrays(np.arange(6, dtype=np.int64))
    assert base != fingerprint_arrays(np.arange(6, dtype=np.uint8).reshape(2, 3))
    changed = np.arange(6, dtype=np.uint8)
    changed[3] = 9
    assert base != fingerprint_arrays(changed)


def test_subset_has_its_own_fingerprint(mnist):
    small = mnist.subset(100)
    assert small.num_train == 100
    assert small.fingerprint != mnist.fingerprint
    assert mnist.subset(100).fingerprint == small.fingerprint
    assert torch.equal(small.x_train, mnist.x_train[:100])


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:4], 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:4], 0x08)
    data = load_dataset("mnist", tmp_path)
    assert data.num_train == 12
    assert data.source == str(tmp_path)
    assert torch.equal(data.y_train, torch.from_numpy(labels.astype(np.int64)))
    assert np.allclose(data.x_train[3, 0].numpy() * 255, images[3], atol=1e-4)


def test_malformed_idx_files_are_rejected(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    truncated = tmp_path / "short"
    _write_idx(truncated, np.zeros((5, 28, 28), dtype=np.uint8), 0x08)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(DataError, match="declares shape"):
        read_idx(truncated)
    with pytest.raises(DataError, match="missing MNIST file"):
        load_dataset("mnist", tmp_path)


def _write_mnist(folder, num_train=12, num_test=4):
    """Write the four IDX files of a tiny MNIST; return their paths by key."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / name
        _write_idx(paths[name], array.astype(np.uint8), 0x08)
    return paths


def _one_line_error(path, call):
    """Run ``call``, which must raise DataError; return its message, checked."""
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message


def test_tiny_mnist_helper_loads(tmp_path):
    _write_mnist(tmp_path)
    data = load_mnist_idx(tmp_path)
    assert data.num_train == 12 and tuple(data.x_test.shape) == (4, 1, 28, 28)


def _cut_in_half(payload):
    return payload[: len(payload) // 2]


def _bad_block_type(payload):
    # gzip.compress writes a 10-byte header; deflate block type 0b11 is reserved
    return payload[:10] + b"\x07" + payload[11:]


def _flip_crc(payload):
    return payload[:-8] + bytes([payload[-8] ^ 0xFF]) + payload[-7:]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_cut_in_half, "truncated gzip stream: "),
        (lambda payload: payload[:-4], "truncated gzip stream: "),
        (_bad_block_type, "corrupt gzip stream: "),
        (_flip_crc, "not a valid gzip file: CRC check failed"),
        (lambda payload: b"plain text, not gzip", "not a valid gzip file: "),
    ],
)
def test_damaged_gzip_is_a_data_error(tmp_path, damage, reason):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    _write_idx(path, images, 0x08)
    path.write_bytes(damage(path.read_bytes()))
    message = _one_line_error(path, lambda: read_idx(path))
    assert message.startswith(f"{path}: cannot read IDX file ({reason}")


@pytest.mark.parametrize(
    "name",
    [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte",
    ],
)
def test_idx_files_without_examples_are_refused(tmp_path, name):
    paths = _write_mnist(tmp_path)
    stem = name.removesuffix(".gz")
    paths[stem].unlink()
    shape = (0, 28, 28) if "images" in name else (0,)
    _write_idx(tmp_path / name, np.zeros(shape, dtype=np.uint8), 0x08)
    message = _one_line_error(tmp_path / name, lambda: load_dataset("mnist", tmp_path))
    assert message == f"{tmp_path / name}: holds no examples"


@pytest.mark.parametrize(
    ("code", "dtype", "type_name"),
    [
        (0x09, ">i1", "signed byte"),
        (0x0B, ">i2", "int16"),
        (0x0C, ">i4", "int32"),
        (0x0D, ">f4", "float32"),
        (0x0E, ">f8", "float64"),
    ],
)
def test_idx_type_codes_other_than_unsigned_byte_are_refused(
    tmp_path, code, dtype, type_name
):
    paths = _write_mnist(tmp_path)
    path = paths["train-images-idx3-ubyte"]
    values = np.random.default_rng(0).random((12, 28, 28)) * 2 - 1  # in [-1, 1)
    _write_idx(path, values.astype(dtype), code)
    expected = (
        f"{path}: IDX type code 0x{code:02x} ({type_name}); "
        "MNIST files hold unsigned bytes (0x08)"
    )
    assert _one_line_error(path, lambda: read_idx(path)) == expected
    assert _one_line_error(path, lambda: load_dataset("mnist", tmp_path)) == expected


@pytest.mark.parametrize("magic", [b"\0\0\x42\x03", b"\0\x01\x08\x03", b"\0\0"])
def test_idx_garbage_magic_is_refused(tmp_path, magic):
    path = tmp_path / "garbage"
    path.write_bytes(magic + bytes(3 * 4 + 28 * 28))
    message = _one_line_error(path, lambda: read_idx(path))
    assert message == f"{path}: not an IDX file (bad magic number)"


def _idx_header(shape):
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(
        n.to_bytes(4, "big") for n in shape
    )


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb.gz"
    # declares 2 images (1,568 bytes) but inflates to 64 MiB
    path.write_bytes(gzip.compress(_idx_header((2, 28, 28)) + bytes(64 * 2**20)))
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        message = _one_line_error(path, lambda: read_idx(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == (
        f"{path}: IDX header declares shape (2, 28, 28) (1568 bytes) but the file "
        "holds more than 1568 bytes of data"
    )
    assert peak < 8 * 2**20


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_declared_size_is_capped_before_reading(tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    payload = _idx_header((2**11, 2**10, 2**10)) + bytes(100)
    path.write_bytes(gzip.compress(payload) if suffix else payload)
    message = _one_line_error(path, lambda: read_idx(path))
    assert message == (
        f"{path}: IDX header declares shape (2048, 1024, 1024) (2147483648 bytes), "
        "larger than any MNIST file"
    )
    # 255 dimensions of 2**32 - 1 must not overflow into a small size
    wide = tmp_path / "wide"
    wide.write_bytes(bytes([0, 0, 0x08, 255]) + b"\xff" * (4 * 255))
    assert "larger than any MNIST file" in _one_line_error(wide, lambda: read_idx(wide))


@pytest.mark.parametrize(
    ("suffix", "extra", "held"),
    [
        ("", b"\1\2\3", "3923"),
        ("", -10, "3910"),
        (".gz", b"\1", "more than 3920"),
        (".gz", -10, "3910"),
    ],
)
def test_idx_data_must_match_the_declared_size(tmp_path, suffix, extra, held):
    path = tmp_path / f"images{suffix}"
    payload = _idx_header((5, 28, 28)) + bytes(range(256)) * 15 + bytes(80)
    payload = payload + extra if isinstance(extra, bytes) else payload[:extra]
    path.write_bytes(gzip.compress(payload) if suffix else payload)
    message = _one_line_error(path, lambda: read_idx(path))
    assert message == (
        f"{path}: IDX header declares shape (5, 28, 28) (3920 bytes) but the file "
        f"holds {held} bytes of data"
    )


def test_idx_exact_size_reads_the_values(tmp_path):
    values = np.arange(5 * 28 * 28, dtype=np.uint64).reshape(5, 28, 28) % 251
    for name in ("images", "images.gz"):
        _write_idx(tmp_path / name, values.astype(np.uint8), 0x08)
        array = read_idx(tmp_path / name)
        assert array.dtype == np.uint8 and array.shape == (5, 28, 28)
        assert np.array_equal(array, values)


@pytest.mark.parametrize(
    ("present", "extra"),
    [
        ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"),
        ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
    ],
)
def test_two_copies_of_an_idx_file_are_refused(tmp_path, present, extra):
    paths = _write_mnist(tmp_path)
    changed = read_idx(paths[present]).copy()
    changed.flat[0] ^= 1
    _write_idx(tmp_path / extra, changed, 0x08)
    message = _one_line_error(
        tmp_path / present, lambda: load_dataset("mnist", tmp_path)
    )
    assert message == (
        f"{tmp_path / present}: {extra} in the same directory also hold {present}, "
        "maybe with different data; keep only one of them"
    )


def _load_within(data_dir, seconds=20):
    """Load MNIST from ``data_dir`` in a thread, failing if it blocks."""
    outcome = {}

    def load():
        try:
            load_dataset("mnist", data_dir)
        except DataError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "loading blocked (was a FIFO opened?)"
    return outcome.get("error")


@pytest.mark.parametrize("kind", ["fifo", "directory", "broken-link"])
def test_idx_entry_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    paths = _write_mnist(tmp_path)
    path = paths["t10k-images-idx3-ubyte"]
    path.unlink()
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere")
    error = _load_within(tmp_path)
    if kind == "broken-link":
        assert error is not None
        assert re.fullmatch(
            rf"{re.escape(str(path))}: cannot read IDX file \(.+\)", error
        )
    else:
        assert error == f"{path}: not a regular file"
        if kind == "fifo":
            assert _one_line_error(path, lambda: read_idx(path)) == error


def test_idx_symbolic_link_to_a_regular_file_is_read(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    paths = _write_mnist(store)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, path in paths.items():
        (data_dir / name).symlink_to(path)
    assert _load_within(data_dir) is None
    data = load_mnist_idx(data_dir)
    assert np.array_equal(
        data.y_test.numpy(), read_idx(paths["t10k-labels-idx1-ubyte"])
    )
