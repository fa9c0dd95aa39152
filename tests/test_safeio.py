import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from forgelab.errors import TraceError
from forgelab.optim import OptimizerConfig
from forgelab.replay import verify_trace
from forgelab.safeio import (
    TensorInfo,
    parse_json,
    read_regular_file,
    read_safetensors_header,
)
from forgelab.trace import Trace, encode_checkpoint, write_atomic
from forgelab.training import record_trace
from helpers import rewrite_checkpoint


def test_read_regular_file_reads_within_the_limit(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(path, 100) == b"x" * 100
    with pytest.raises(TraceError, match=r"file: checkpoint has 100 bytes, more than"):
        read_regular_file(path, 99, "checkpoint")


def test_read_regular_file_refuses_links_fifos_and_directories(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"{}")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(TraceError, match="link: manifest is a symbolic link"):
        read_regular_file(tmp_path / "link", 10, "manifest")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TraceError, match="fifo: file is not a regular file"):
        read_regular_file(tmp_path / "fifo", 10)
    with pytest.raises(TraceError, match="not a regular file"):
        read_regular_file(tmp_path, 10)
    with pytest.raises(TraceError, match="missing: file file missing"):
        read_regular_file(tmp_path / "missing", 10)


def test_parse_json_is_strict(tmp_path):
    path = tmp_path / "doc.json"
    assert parse_json(b'{"a": [1, 2.5, "x"]}', path) == {"a": [1, 2.5, "x"]}
    for document, reason in [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"a": 1e400}', "number 1e400 overflows"),
        (b'{"a": ' + b"9" * 41 + b"}", "integer with 41 digits"),
        (b"[" * 50_000, "nested too deeply"),
        (b'{"a": "\xff"}', "not UTF-8 (byte 7)"),
    ]:
        with pytest.raises(TraceError) as caught:
            parse_json(document, path, "manifest")
        message = str(caught.value)
        assert message.startswith(f"{path}: manifest ") and reason in message
        assert "\n" not in message


def test_safetensors_header_of_a_checkpoint(tmp_path):
    params = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    payload = encode_checkpoint(params, {}, [], step=0)
    tensors, metadata = read_safetensors_header(tmp_path / "c", payload)
    assert metadata == {"format": "forgelab-checkpoint", "step": "0"}
    weights = tensors["param/w"]
    assert weights == TensorInfo("F32", (2, 3), weights.begin, weights.begin + 24)
    assert tensors["batch_indices"].shape == (0,)
    assert tensors["batch_sizes"].dtype == "I64"


def _with_header(payload: bytes, change) -> bytes:
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload[8 + length :]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h: h["a"].update(data_offsets=[0, 8]), "holds 8"),
        (lambda h: h["a"].update(shape=[2, -1]), "malformed shape"),
        (lambda h: h["a"].update(shape=[1] * 9), "malformed shape"),
        (lambda h: h["a"].update(dtype="F16"), "dtype 'F16'"),
        (lambda h: h["a"].update(extra=1), "entry 'a' is malformed"),
        (lambda h: h["b"].update(data_offsets=[0, 16]), "gap or overlap at byte 16"),
        (lambda h: h.update(__metadata__={"step": 1}), "map strings to strings"),
    ],
)
def test_safetensors_header_that_does_not_tile_the_data(tmp_path, change, reason):
    payload = save({"a": torch.zeros(4), "b": torch.zeros(4)})
    with pytest.raises(TraceError, match=reason):
        read_safetensors_header(tmp_path / "c", _with_header(payload, change))


def test_safetensors_trailing_bytes(tmp_path):
    payload = save({"a": torch.zeros(4)}) + b"\0" * 4
    with pytest.raises(TraceError, match="4 bytes after the last tensor"):
        read_safetensors_header(tmp_path / "c", payload)


def test_adam_traces_carry_a_checked_step_count(tmp_path, digits):
    trace_dir = record_trace(
        tmp_path / "adam",
        digits,
        "logreg",
        optimizer=OptimizerConfig(name="adam", lr=0.001),
        batch_size=500,
        num_epochs=1,
    )
    trace = Trace(trace_dir)
    assert verify_trace(trace, digits, tolerance=0.0).accepted
    state = trace.load_checkpoint(2).optimizer_state["1.bias"]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"]
    assert float(state["step"]) == 2.0

    def change(tensors):
        tensors["optim/1.bias/step"] = torch.tensor(5.0)

    rewrite_checkpoint(trace_dir, 2, change)
    with pytest.raises(TraceError, match=r"optim/1.bias/step is 5, expected 2"):
        Trace(trace_dir).load_checkpoint(2)


def test_header_length_starting_with_the_pickle_marker_is_still_safetensors():
    """A header of 640 bytes begins with 0x80 0x02, the opening of a pickle."""
    payload = save({"a": torch.zeros(3)}, metadata={"format": "x" * 549})
    assert payload[:2] == b"\x80\x02"
    tensors, metadata = read_safetensors_header(Path("x"), payload)
    assert tensors["a"].shape == (3,)
    assert metadata["format"] == "x" * 549
    pickled = pickle.dumps({"a": 1}, protocol=2)
    with pytest.raises(TraceError, match="is a Python pickle"):
        read_safetensors_header(Path("x"), pickled)


def test_atomic_writes_get_the_mode_of_an_ordinary_new_file(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.json", b"{}")
        ordinary = tmp_path / "ordinary"
        ordinary.write_bytes(b"{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert ordinary.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report.json").read_bytes() == b"{}"
