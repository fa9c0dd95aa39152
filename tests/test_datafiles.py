"""CIFAR-10, IMDB and Adult from tiny files in their real distribution formats."""

import io
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch

from forgelab.cli import main
from forgelab.data import load_dataset
from forgelab.datafiles import pad_sequences
from forgelab.errors import DataError
from forgelab.safe_pickle import UnsafePickleError, load_restricted, to_array
from formats import (
    ADULT_ROWS,
    cifar_arrays,
    cifar_python_batch,
    write_adult,
    write_cifar_binary,
    write_cifar_python,
    write_imdb_keras,
)


class _RunsCommand:
    """Pickles into a call of os.system: what a malicious data file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_test_file_is_what_python_reads_from_a_cifar_batch():
    """The hand-written Python 2 pickle decodes, with the real unpickler, as intended.

    This uses pickle.loads on bytes the test itself wrote, to check the test file.
    """
    pixels, labels = cifar_arrays(3)
    payload = cifar_python_batch(pixels[0], [int(v) for v in labels[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        batch = pickle.loads(payload, encoding="bytes")
    assert set(batch) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (3, 3072)
    assert np.array_equal(batch[b"data"], pixels[0])
    assert batch[b"labels"] == labels[0].tolist()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_restricted_unpickler_reads_numpy_arrays_of_every_protocol(protocol):
    numeric = np.arange(12, dtype=">i4").reshape(3, 4)
    objects = np.empty(2, dtype=object)
    objects[:] = [[1, 2, 3], [4]]
    payload = pickle.dumps({"a": numeric, "b": objects, "c": b"xy"}, protocol=protocol)
    loaded = load_restricted(payload)
    assert np.array_equal(to_array(loaded["a"]), numeric)
    assert to_array(loaded["a"]).dtype == np.dtype(">i4")
    assert to_array(loaded["b"]) == [[1, 2, 3], [4]]
    assert loaded["c"] == b"xy"


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)"):
        load_restricted(payload)
    assert not marker.exists()
    # numpy's own constructor through an allowed name is refused too
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_restricted(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")


def test_cifar10_python_and_binary_files_give_the_same_dataset(tmp_path):
    write_cifar_python(tmp_path / "py" / "cifar-10-batches-py", per_batch=4)
    write_cifar_binary(tmp_path / "bin", per_batch=4)
    from_python = load_dataset("cifar10", tmp_path / "py")
    from_binary = load_dataset("cifar10", tmp_path / "bin")
    assert from_python.fingerprint == from_binary.fingerprint
    assert from_python.num_train == 20
    assert tuple(from_python.x_train.shape) == (20, 3, 32, 32)
    assert tuple(from_python.x_test.shape) == (4, 3, 32, 32)
    assert from_python.domain.num_levels == 256
    assert from_python.domain.input_kind == "scaled"
    pixels, labels = cifar_arrays(4)
    # example 5 is the second batch's first image; channel 1 row 0 is bytes 1024-1055
    assert np.allclose(
        from_python.x_train[4, 1, 0].numpy() * 255, pixels[1][0, 1024:1056], atol=1e-4
    )
    assert from_python.y_train.tolist() == np.concatenate(labels[:5]).tolist()
    assert from_python.y_test.tolist() == labels[5].tolist()


def test_malicious_cifar_batch_is_refused_and_not_run(tmp_path, capsys):
    write_cifar_python(tmp_path)
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)
    (tmp_path / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_3: refusing to load global"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    args = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path)]
    assert main([*args, "--model", "vgg-mini", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load global" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_malformed_cifar_files_are_clear_errors(tmp_path):
    write_cifar_python(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 file data_batch_4; expected"):
        load_dataset("cifar10", tmp_path)
    write_cifar_python(tmp_path)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:-100])
    with pytest.raises(DataError, match="test_batch: not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path)
    wrong = np.zeros((2, 100), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(cifar_python_batch(wrong, [0, 1]))
    with pytest.raises(DataError, match=r"uint8 array of shape \(n, 3072\)"):
        load_dataset("cifar10", tmp_path)
    pixels = np.zeros((2, 3072), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(cifar_python_batch(pixels, [0, 12]))
    with pytest.raises(DataError, match="2 integers in 0-9"):
        load_dataset("cifar10", tmp_path)
    write_cifar_binary(tmp_path / "bin")
    (tmp_path / "bin" / "data_batch_2.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match="not a whole number of CIFAR-10 binary"):
        load_dataset("cifar10", tmp_path / "bin")


@pytest.mark.parametrize("name", ["cifar10", "imdb", "adult"])
def test_file_datasets_need_a_data_dir(name):
    with pytest.raises(DataError, match="no embedded copy and nothing is downloaded"):
        load_dataset(name)


def test_pad_sequences_keeps_the_last_tokens_and_pads_in_front():
    padded = pad_sequences([np.array([5, 6, 7]), np.arange(10), np.array([])], 4)
    assert padded.tolist() == [[0, 5, 6, 7], [6, 7, 8, 9], [0, 0, 0, 0]]


def test_imdb_from_keras_npz(tmp_path):
    write_imdb_keras(tmp_path, num_train=24, num_test=8, vocab_size=30)
    data = load_dataset("imdb", tmp_path)
    raw = np.load(tmp_path / "imdb.npz", allow_pickle=True)  # the test's own file
    assert data.x_train.dtype == torch.int64
    assert tuple(data.x_train.shape) == (24, 200) and tuple(data.x_test.shape) == (
        8,
        200,
    )
    assert data.domain.input_kind == "token-ids"
    assert data.domain.vocab_size == 30
    assert data.domain.value_min == 0 and data.domain.value_max == 29
    for row, sequence in enumerate(raw["x_train"]):
        expected = sequence[-200:]
        assert data.x_train[row, 200 - len(expected) :].tolist() == list(expected)
        assert data.x_train[row, : 200 - len(expected)].eq(0).all()
    assert data.y_train.tolist() == raw["y_train"].tolist()
    # the same ids already padded to an integer matrix give the same dataset
    padded = tmp_path / "padded"
    padded.mkdir()
    np.savez(
        padded / "imdb.npz",
        x_train=data.x_train.numpy().astype(np.int32),
        y_train=raw["y_train"],
        x_test=data.x_test.numpy(),
        y_test=raw["y_test"],
    )
    assert load_dataset("imdb", padded).fingerprint == data.fingerprint


def _replace_member(path, member, payload):
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members[member] = payload
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def test_malicious_or_malformed_imdb_files_are_refused(tmp_path):
    write_imdb_keras(tmp_path)
    path = tmp_path / "imdb.npz"
    marker = tmp_path / "ran"
    # an object array whose pickled payload runs a command
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|O", "fortran_order": False, "shape": (1,)}
    )
    evil = header.getvalue() + pickle.dumps(_RunsCommand(f"touch {marker}"))
    _replace_member(path, "x_test.npy", evil)
    with pytest.raises(DataError, match="x_test: refusing to load global"):
        load_dataset("imdb", tmp_path)
    assert not marker.exists()

    write_imdb_keras(tmp_path)
    with zipfile.ZipFile(path) as archive:
        kept = {n: archive.read(n) for n in archive.namelist() if n != "y_test.npy"}
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in kept.items():
            archive.writestr(name, content)
    with pytest.raises(DataError, match="missing array y_test; expected x_train"):
        load_dataset("imdb", tmp_path)

    np.savez(
        path,
        x_train=np.zeros((3, 5), np.int64),
        y_train=np.zeros(2, np.int64),
        x_test=np.zeros((1, 5), np.int64),
        y_test=np.zeros(1, np.int64),
    )
    with pytest.raises(DataError, match="x_train has 3 sequences but y_train has 2"):
        load_dataset("imdb", tmp_path)
    np.savez(
        path,
        x_train=np.full((2, 5), -1),
        y_train=np.array([0, 1]),
        x_test=np.zeros((1, 5), np.int64),
        y_test=np.array([1]),
    )
    with pytest.raises(DataError, match=r"token ids must lie in \[0, "):
        load_dataset("imdb", tmp_path)
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="imdb.npz: not a readable .npz"):
        load_dataset("imdb", tmp_path)
    path.unlink()
    with pytest.raises(DataError, match="missing imdb.npz; expected an .npz"):
        load_dataset("imdb", tmp_path)


def test_adult_from_uci_csv_files(tmp_path):
    write_adult(tmp_path, repeat=4)
    data = load_dataset("adult", tmp_path)
    assert tuple(data.x_train.shape) == (40, 105) and tuple(data.x_test.shape) == (
        6,
        105,
    )
    assert data.domain.num_classes == 2 and data.domain.input_shape == (105,)
    # the last four of the ten rows earn >50K
    assert data.y_train.tolist() == ([0] * 6 + [1] * 4) * 4
    assert data.y_test.tolist() == [0] * 6
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    groups = {g.name: g for g in data.domain.feature_groups}
    assert len(groups) == 14 and groups["native-country"].stop == 105
    # age 39 of the first row, min-max scaled over ages 28..54
    assert float(data.x_train[0, groups["age"].start]) == pytest.approx(11 / 26)
    workclass = groups["workclass"]
    assert data.x_train[0, workclass.start : workclass.stop].tolist() == [
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        0,  # State-gov is the sixth workclass of adult.names
    ]
    # one 1 per one-hot block, except the unknown values ('?') of the tenth row
    for group in data.domain.feature_groups:
        if group.kind == "one-hot":
            counts = data.x_train[:10, group.start : group.stop].sum(1).tolist()
            unknown = group.name in ("workclass", "occupation")
            assert counts == [1.0] * 9 + [0.0 if unknown else 1.0]


def test_malformed_adult_files_are_clear_errors(tmp_path):
    write_adult(tmp_path)
    (tmp_path / "adult.test").unlink()
    with pytest.raises(DataError, match="missing Adult file adult.test; expected"):
        load_dataset("adult", tmp_path)
    write_adult(tmp_path)
    bad = ADULT_ROWS[0].replace("State-gov", "Space-agency")
    (tmp_path / "adult.data").write_text(ADULT_ROWS[1] + "\n" + bad + "\n")
    with pytest.raises(
        DataError, match="adult.data:2: unknown workclass 'Space-agency'"
    ):
        load_dataset("adult", tmp_path)
    (tmp_path / "adult.data").write_text("39, State-gov, 77516\n")
    with pytest.raises(DataError, match="adult.data:1: 3 fields; expected 15"):
        load_dataset("adult", tmp_path)
    (tmp_path / "adult.data").write_text(ADULT_ROWS[0].replace("<=50K", "rich"))
    with pytest.raises(DataError, match="income label 'rich'"):
        load_dataset("adult", tmp_path)
