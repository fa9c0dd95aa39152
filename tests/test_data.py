import gzip

import numpy as np
import pytest
import torch

from forgelab.data import fingerprint_arrays, load_dataset, read_idx
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
