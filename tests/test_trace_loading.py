"""A trace is untrusted input: every way it can be broken gets exit 2 and one line.

Each test breaks a copy of the tiny digits trace the way a careless or dishonest
owner could and runs ``forgelab verify`` on it in-process.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from forgelab.cli import main
from forgelab.trace import MAX_PARAMETERS, Trace
from helpers import (
    checkpoint_path,
    read_manifest,
    rehash,
    rewrite_checkpoint,
    set_tensor,
    write_manifest,
)

WEIGHT = "param/1.weight"
BIAS = "param/1.bias"


def verify_cli(trace: Path, capsys) -> tuple[int, str, str]:
    code = main(["verify", str(trace), "--out", str(trace.parent / "report")])
    out, err = capsys.readouterr()
    return code, out, err


def assert_unusable(trace: Path, capsys, *needles: str) -> str:
    """Verify through the command line; expect exit 2 and one line naming the file."""
    code, out, err = verify_cli(trace, capsys)
    assert code == 2, (code, out, err)
    assert "ACCEPTED" not in out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"forgelab: error: {trace}"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def edit_manifest(trace: Path, change) -> None:
    manifest = read_manifest(trace)
    change(manifest)
    write_manifest(trace, manifest)


def test_honest_tiny_trace_is_accepted(tiny_trace, capsys):
    code, out, err = verify_cli(tiny_trace, capsys)
    assert code == 0, err
    assert "ACCEPTED" in out and err == ""
    assert "steps replayed" not in out  # the segments are 2+2+2+1 steps
    assert "4 segments replayed, 0 failed" in out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", [WEIGHT, "optim/1.bias/momentum_buffer"])
def test_non_finite_values_are_rejected(tiny_trace, capsys, bad, key):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = bad

    rewrite_checkpoint(tiny_trace, 4, change)
    assert_unusable(tiny_trace, capsys, "step-00000004.safetensors", key, "NaN or inf")


def test_checkpoint_hash_mismatch(tiny_trace, capsys):
    path = checkpoint_path(tiny_trace, 2)
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0x01
    path.write_bytes(bytes(payload))
    assert_unusable(
        tiny_trace, capsys, "step-00000002.safetensors", "sha256 does not match"
    )


def test_missing_checkpoint_entry(tiny_trace, capsys):
    edit_manifest(tiny_trace, lambda m: m["checkpoints"].pop(2))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        "checkpoint missing between steps 2 and 6",
    )


def test_missing_checkpoint_file(tiny_trace, capsys):
    checkpoint_path(tiny_trace, 6).unlink()
    assert_unusable(tiny_trace, capsys, "step-00000006.safetensors", "file missing")


def test_duplicate_checkpoint_entry(tiny_trace, capsys):
    edit_manifest(tiny_trace, lambda m: m["checkpoints"].insert(2, m["checkpoints"][1]))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        "duplicate checkpoint: step 2 listed after step 2",
    )


def test_reordered_checkpoint_entries(tiny_trace, capsys):
    def swap(manifest):
        entries = manifest["checkpoints"]
        entries[1], entries[2] = entries[2], entries[1]

    edit_manifest(tiny_trace, swap)
    assert_unusable(
        tiny_trace, capsys, "manifest.json", "out-of-order checkpoint: step 2"
    )


def test_swapped_checkpoint_files_are_caught_by_their_step(tiny_trace, capsys):
    """Swap two files and their hashes: every hash matches, the content does not."""
    two, four = checkpoint_path(tiny_trace, 2), checkpoint_path(tiny_trace, 4)
    payload_two, payload_four = two.read_bytes(), four.read_bytes()
    two.write_bytes(payload_four)
    four.write_bytes(payload_two)
    rehash(tiny_trace, 2)
    rehash(tiny_trace, 4)
    assert_unusable(
        tiny_trace,
        capsys,
        "step-00000002.safetensors",
        "holds step '4', but the manifest lists it as step 2",
    )


@pytest.mark.parametrize(
    ("position", "index", "needle"),
    [
        (0, 1437, "example index out of range [0, 1437) (min"),
        (399, -1, "example index out of range [0, 1437) (min -1"),
        (17, 10**12, "max 1000000000000"),
    ],
)
def test_example_index_out_of_range(tiny_trace, capsys, position, index, needle):
    def change(tensors):
        indices = tensors["batch_indices"].clone()
        indices[position] = index
        tensors["batch_indices"] = indices

    rewrite_checkpoint(tiny_trace, 6, change)
    assert_unusable(tiny_trace, capsys, "step-00000006.safetensors", needle)


def test_batch_of_the_wrong_length(tiny_trace, capsys):
    def change(tensors):
        tensors["batch_indices"] = tensors["batch_indices"][:-1].clone()
        tensors["batch_sizes"] = torch.tensor([200, 199])

    rewrite_checkpoint(tiny_trace, 2, change)
    assert_unusable(
        tiny_trace,
        capsys,
        "step-00000002.safetensors",
        "batch_indices has shape (399,), expected (400,)",
    )


def test_batch_sizes_that_disagree_with_the_manifest(tiny_trace, capsys):
    rewrite_checkpoint(
        tiny_trace, 2, set_tensor("batch_sizes", torch.tensor([199, 201]))
    )
    assert_unusable(
        tiny_trace,
        capsys,
        "step-00000002.safetensors",
        "batch_sizes holds a batch of 199 examples, expected 200",
    )


def test_dataset_fingerprint_differs(tiny_trace, capsys):
    edit_manifest(tiny_trace, lambda m: m["dataset"].update(fingerprint="ab" * 32))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        # whole digests: two that differ only at the end must not look the same
        f"dataset.fingerprint {'ab' * 32} differs from the verifier's copy",
    )


def test_trace_of_a_subset_does_not_verify_on_the_whole(tmp_path, digits, capsys):
    from forgelab.training import record_trace

    trace = record_trace(
        tmp_path / "subset", digits.subset(500), "logreg", batch_size=250, num_epochs=1
    )
    assert_unusable(trace, capsys, "dataset.fingerprint", "differs")


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("model", "name", "resnet50", "field model/name: 'resnet50' is not one of"),
        ("optimizer", "name", "rmsprop", "field optimizer/name: 'rmsprop' is not one"),
        ("model", "loss", "hinge", "field model/loss: 'hinge' is not one of"),
        ("model", "loss", "bce", "model 'logreg' trains with 'cross_entropy'"),
        ("dataset", "name", "imagenet", "field dataset/name: 'imagenet' is not one"),
    ],
)
def test_unknown_names(tiny_trace, capsys, section, key, value, needle):
    edit_manifest(tiny_trace, lambda m: m[section].update({key: value}))
    assert_unusable(tiny_trace, capsys, "manifest.json", needle)


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None])
def test_unsupported_format_version(tiny_trace, capsys, version):
    edit_manifest(tiny_trace, lambda m: m.update(format_version=version))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        f"unsupported format version {version!r} (this forgelab reads version 1)",
    )


@pytest.mark.parametrize("key", ["num_steps", "total_steps", "checkpoint_interval"])
def test_a_manifest_claiming_a_trillion_steps(tiny_trace, capsys, key):
    edit_manifest(tiny_trace, lambda m: m.update({key: 10**12}))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        f"field {key}: 1000000000000 is greater than the maximum of 100000000",
    )


def test_a_model_too_large_to_build_is_rejected_before_allocation(tiny_trace, capsys):
    """10^7 inputs into the 128-unit MLP: 1.3e9 weights, refused from the manifest."""

    def change(manifest):
        for section in ("model", "dataset"):
            manifest[section]["input_shape"] = [1, 1000, 10000]
        manifest["model"]["name"] = "mlp"

    edit_manifest(tiny_trace, change)
    line = assert_unusable(tiny_trace, capsys, "manifest.json", "model 'mlp'")
    assert f"more than {MAX_PARAMETERS}" in line


def test_model_input_shape_must_match_the_data(tiny_trace, capsys):
    def change(manifest):
        manifest["model"]["input_shape"] = [1, 8, 9]
        del manifest["dataset"]["input_shape"]

    edit_manifest(tiny_trace, change)
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        "model.input_shape [1, 8, 9] differs from the dataset's [1, 8, 8]",
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            set_tensor(WEIGHT, torch.zeros(10, 63)),
            "has shape (10, 63), expected (10, 64)",
        ),
        (set_tensor(BIAS, torch.zeros(10, dtype=torch.float64)), "has dtype F64"),
        (set_tensor(BIAS, torch.zeros(10, dtype=torch.float16)), "has dtype 'F16'"),
        (set_tensor("extra", torch.zeros(1)), "unexpected tensor 'extra'"),
        (lambda t: t.pop("optim/1.weight/momentum_buffer"), "missing tensor"),
        (
            set_tensor("batch_indices", torch.zeros(400, dtype=torch.int32)),
            "has dtype 'I32'",
        ),
    ],
)
def test_tensors_that_do_not_match_the_model(tiny_trace, capsys, change, needle):
    rewrite_checkpoint(tiny_trace, 2, change)
    assert_unusable(tiny_trace, capsys, "step-00000002.safetensors", needle)


def test_trace_dtype_must_match_the_tensors(tiny_trace, capsys):
    edit_manifest(tiny_trace, lambda m: m.update(dtype="float64"))
    assert_unusable(
        tiny_trace,
        capsys,
        "step-00000000.safetensors",
        f"{WEIGHT} has dtype F32, expected F64",
    )


@pytest.mark.parametrize(
    "name",
    ["../outside.safetensors", "/etc/passwd", "checkpoints/../manifest.json", "x/.."],
)
def test_file_names_must_stay_inside_the_trace(tiny_trace, capsys, name):
    edit_manifest(tiny_trace, lambda m: m["checkpoints"][1].update(file=name))
    assert_unusable(
        tiny_trace,
        capsys,
        "manifest.json",
        "checkpoint of step 2 is listed as",
        "expected 'checkpoints/step-00000002.safetensors'",
    )


def test_symlink_leading_out_of_the_trace(tiny_trace, tmp_path, capsys):
    path = checkpoint_path(tiny_trace, 2)
    outside = tmp_path / "outside.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)
    assert_unusable(tiny_trace, capsys, "step-00000002.safetensors", "leads outside")


def test_checkpoint_directory_symlinked_elsewhere(tiny_trace, tmp_path, capsys):
    directory = tiny_trace / "checkpoints"
    shutil.move(directory, tmp_path / "elsewhere")
    directory.symlink_to(tmp_path / "elsewhere")
    assert_unusable(tiny_trace, capsys, "checkpoints", "leads outside the trace")


def test_symlinked_manifest(tiny_trace, tmp_path, capsys):
    manifest = tiny_trace / "manifest.json"
    shutil.move(manifest, tmp_path / "manifest.json")
    manifest.symlink_to(tmp_path / "manifest.json")
    assert_unusable(tiny_trace, capsys, "manifest.json", "is a symbolic link")


@pytest.mark.parametrize("target", ["manifest", "checkpoint"])
def test_a_fifo_does_not_stall_the_reader(tiny_trace, capsys, target):
    path = (
        tiny_trace / "manifest.json"
        if target == "manifest"
        else checkpoint_path(tiny_trace, 4)
    )
    path.unlink()
    os.mkfifo(path)
    assert_unusable(tiny_trace, capsys, path.name, "not a regular file")


class _Marker:
    """A pickle payload that creates a file when (and only when) it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("update_hash", [True, False])
def test_pickle_named_like_a_checkpoint_is_never_loaded(
    tiny_trace, tmp_path, capsys, writer, update_hash
):
    marker = tmp_path / "unpickled"
    path = checkpoint_path(tiny_trace, 2)
    payload = {WEIGHT: torch.zeros(10, 64), "hook": _Marker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    if update_hash:
        rehash(tiny_trace, 2)
    kind = "is a zip archive" if writer == "torch.save" else "is a Python pickle"
    assert_unusable(
        tiny_trace,
        capsys,
        "step-00000002.safetensors",
        kind if update_hash else "sha256 does not match",
    )
    assert not marker.exists()
    # the payload is live: loading it the unsafe way would have created the marker
    if writer == "pickle":
        pickle.loads(path.read_bytes())
    else:
        shutil.copy(path, tmp_path / "copy.pt")
        torch.load(tmp_path / "copy.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "name", ["checkpoints/step-00000002.pt", "checkpoints/model.pkl", "step-2.ckpt"]
)
def test_stray_pickle_files_reject_the_trace(tiny_trace, tmp_path, capsys, name):
    marker = tmp_path / "unpickled"
    (tiny_trace / name).write_bytes(pickle.dumps(_Marker(marker)))
    assert_unusable(tiny_trace, capsys, Path(name).name, "unexpected file")
    assert not marker.exists()


def test_unlisted_checkpoint_is_tolerated_only_after_an_interrupted_recording(
    tiny_trace, capsys
):
    def truncate(manifest):
        manifest["checkpoints"] = manifest["checkpoints"][:3]
        manifest["num_steps"] = 4
        manifest["status"] = "recording"

    edit_manifest(tiny_trace, truncate)
    # checkpoints 6 and 7 are on disk but not listed: a killed run's leftovers
    code, out, err = verify_cli(tiny_trace, capsys)
    assert code == 0, err
    assert "verified up to step 4" in out and "ACCEPTED" in out
    edit_manifest(tiny_trace, lambda m: m.update(status="complete", total_steps=4))
    assert_unusable(tiny_trace, capsys, "manifest.json", "total_steps 4 is not")
    edit_manifest(tiny_trace, lambda m: m.update(status="recording", total_steps=7))
    shutil.copy(
        checkpoint_path(tiny_trace, 2),
        tiny_trace / "checkpoints/step-00000003.safetensors",
    )
    assert_unusable(
        tiny_trace, capsys, "step-00000003.safetensors", "not listed in the manifest"
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"format": "forgelab-trace", "format": "x"}', "duplicate key 'format'"),
        ('{"format": "forgelab-trace", "lr": NaN}', "NaN is not a JSON number"),
        ('{"format": "forgelab-trace", "lr": 1e999}', "number 1e999 overflows"),
        ('{"format": "forgelab-trace", "n": 1' + "0" * 60 + "}", "61 digits"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("\ufeff{}", "not valid"),
        ("", "not valid"),
        ("[]", "not a forgelab trace manifest"),
    ],
)
def test_hostile_json_in_the_manifest(tiny_trace, capsys, text, needle):
    (tiny_trace / "manifest.json").write_text(text)
    assert_unusable(tiny_trace, capsys, "manifest.json", needle)


def test_duplicate_key_inside_the_manifest(tiny_trace, capsys):
    """A second parser might read the first of two keys; this one refuses both."""
    text = (tiny_trace / "manifest.json").read_text()
    text = text.replace('"batch_size": 200,', '"batch_size": 200, "batch_size": 100,')
    (tiny_trace / "manifest.json").write_text(text)
    assert_unusable(tiny_trace, capsys, "manifest.json", "duplicate key 'batch_size'")


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("batch_size", 200.0, "field batch_size: 200.0 is not of type 'integer'"),
        ("num_steps", True, "field num_steps: True is not of type 'integer'"),
        ("optimizer", [], "field optimizer: [] is not of type 'object'"),
        ("checkpoints", {}, "field checkpoints: {} is not of type 'array'"),
        ("dataset", "digits", "field dataset: 'digits' is not of type 'object'"),
        ("test_accuracy", [1], "field test_accuracy/0: 1 is not of type 'object'"),
    ],
)
def test_fields_of_the_wrong_type(tiny_trace, capsys, key, value, needle):
    edit_manifest(tiny_trace, lambda m: m.update({key: value}))
    assert_unusable(tiny_trace, capsys, "manifest.json", needle)


def test_adam_settings_outside_torch_range(tiny_trace, capsys):
    edit_manifest(tiny_trace, lambda m: m["optimizer"].update(beta1=1.5))
    assert_unusable(
        tiny_trace, capsys, "field optimizer/beta1: 1.5 is greater than or equal"
    )


@pytest.mark.parametrize(
    ("header_length", "needle"),
    [(2**62, "header length 4611686018427387904 does not fit"), (0, "header length 0")],
)
def test_safetensors_header_length_is_checked(
    tiny_trace, capsys, header_length, needle
):
    path = checkpoint_path(tiny_trace, 2)
    payload = path.read_bytes()
    path.write_bytes(header_length.to_bytes(8, "little") + payload[8:])
    rehash(tiny_trace, 2)
    assert_unusable(tiny_trace, capsys, "step-00000002.safetensors", needle)


def test_safetensors_offsets_beyond_the_file(tiny_trace, capsys):
    path = checkpoint_path(tiny_trace, 2)
    payload = path.read_bytes()
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    header[BIAS]["data_offsets"] = [0, 10**12]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + payload[8 + length :])
    rehash(tiny_trace, 2)
    assert_unusable(
        tiny_trace, capsys, "step-00000002.safetensors", "byte range [0, 1000000000000]"
    )


def test_an_oversized_checkpoint_is_not_read(tiny_trace, capsys):
    path = checkpoint_path(tiny_trace, 2)
    with path.open("ab") as stream:
        stream.truncate(50 * 2**20)
    assert_unusable(tiny_trace, capsys, "step-00000002.safetensors", "52428800 bytes")


def test_trace_reader_accepts_the_recorded_layout(tiny_trace_master):
    trace = Trace(tiny_trace_master)
    assert [e.step for e in trace.checkpoints] == [0, 2, 4, 6, 7]
    first, second = trace.load_checkpoint(0), trace.load_checkpoint(1)
    assert first.optimizer_state == {} and first.batches == []
    assert sorted(second.optimizer_state) == ["1.bias", "1.weight"]
    assert [len(b) for b in second.batches] == [200, 200]
    assert [len(b) for b in trace.load_checkpoint(4).batches] == [200]


@pytest.mark.parametrize("tolerance", ["auto", "1e-6"])
def test_a_run_killed_after_its_first_checkpoint_has_nothing_to_verify(
    tiny_trace, capsys, tolerance
):
    def truncate(manifest):
        manifest["checkpoints"] = manifest["checkpoints"][:1]
        manifest["num_steps"] = 0
        manifest["status"] = "recording"

    edit_manifest(tiny_trace, truncate)
    for path in (tiny_trace / "checkpoints").glob("step-0000000[1-9]*"):
        path.unlink()
    code = main(["verify", str(tiny_trace), "--tolerance", tolerance])
    out, err = capsys.readouterr()
    assert code == 2 and "ACCEPTED" not in out
    assert err.strip() == (
        f"forgelab: error: {tiny_trace / 'manifest.json'}: lists only checkpoint 0; "
        "there is no step to verify"
    )
