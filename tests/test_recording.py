"""Recording survives SIGKILL, resumes bit-identically, and is deterministic.

The killed runs are real ``forgelab train`` processes. Two are killed at a chosen point
of the atomic write protocol (a wrapper makes the process SIGKILL itself just before
the n-th rename), one at an arbitrary moment chosen by the test. Each is then resumed
with ``forgelab train --resume`` (in-process) and compared, file by file and tensor by
tensor, with an uninterrupted in-process recording. Everything runs with one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from forgelab.cli import main
from forgelab.optim import OptimizerConfig
from forgelab.replay import num_threads, verify_trace
from forgelab.trace import Trace, is_temporary_file
from forgelab.training import record_trace

SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--model",
    "logreg",
    "--batch-size",
    "100",
    "--momentum",
    "0.9",
]
KILL_BEFORE_RENAME = """
import os, signal, sys
kill_before = int(sys.argv[1])
renames = 0
real_replace = os.replace

def replace(source, target):
    global renames
    if renames == kill_before:
        os.kill(os.getpid(), signal.SIGKILL)
    renames += 1
    real_replace(source, target)

os.replace = replace
from forgelab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def environment() -> dict[str, str]:
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def resume(out: Path, capsys) -> str:
    """Run ``forgelab train --resume`` in-process, with one thread; return stdout."""
    with num_threads(1):
        code = main(["train", "--resume", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def reference(out: Path, digits, *, num_epochs: int, interval: int) -> Path:
    """The uninterrupted recording a resumed one must match bit for bit."""
    with num_threads(1):
        return record_trace(
            out,
            digits,
            "logreg",
            optimizer=OptimizerConfig(momentum=0.9),
            batch_size=100,
            num_epochs=num_epochs,
            checkpoint_interval=interval,
        )


def assert_verifies_up_to_last_checkpoint(trace_dir: Path, digits) -> Trace:
    trace = Trace(trace_dir)
    assert not trace.complete
    with num_threads(1):
        report = verify_trace(trace, digits, tolerance=0.0)
    assert report.accepted and not report.complete
    assert [s.end_step for s in report.segments] == [
        e.step for e in trace.checkpoints[1:]
    ]
    assert all(s.l2 == 0.0 for s in report.segments)
    return trace


def assert_same_checkpoints(resumed: Path, uninterrupted: Path) -> None:
    """Every checkpoint file, its hash and its tensors are identical."""
    ours = Trace(resumed, allow_incomplete=False)
    theirs = Trace(uninterrupted, allow_incomplete=False)
    assert ours.checkpoints == theirs.checkpoints
    for entry in theirs.checkpoints:
        payload = (resumed / entry.file).read_bytes()
        assert payload == (uninterrupted / entry.file).read_bytes(), entry.file
        ours_tensors, theirs_tensors = (
            load(payload),
            load((uninterrupted / entry.file).read_bytes()),
        )
        assert ours_tensors.keys() == theirs_tensors.keys()
        assert all(
            torch.equal(ours_tensors[k], theirs_tensors[k]) for k in theirs_tensors
        )
    assert ours.manifest["test_accuracy"] == theirs.manifest["test_accuracy"]
    leftovers = [p for p in resumed.rglob("*") if is_temporary_file(p.name)]
    assert leftovers == []


@pytest.fixture(scope="module")
def two_epoch_reference(tmp_path_factory, digits) -> Path:
    """28 steps, a checkpoint every 3: steps 0, 3, ..., 27 and 28."""
    out = tmp_path_factory.mktemp("reference") / "trace"
    return reference(out, digits, num_epochs=2, interval=3)


@pytest.mark.parametrize(
    ("kill_before", "last_listed", "leftover"),
    [
        # renames alternate: checkpoint 0, manifest, checkpoint 3, manifest, ...
        (8, 9, ".step-00000012.safetensors."),  # checkpoint 12 written, not renamed
        (11, 12, "step-00000015.safetensors"),  # checkpoint 15 renamed, not listed
    ],
)
def test_sigkill_leaves_a_verifiable_trace_that_resumes_bit_identically(
    tmp_path, digits, capsys, two_epoch_reference, kill_before, last_listed, leftover
):
    out = tmp_path / "trace"
    args = [*TRAIN, "--epochs", "2", "--checkpoint-every", "3", "--out", str(out)]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_RENAME, str(kill_before), *args],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # what the killed run left verifies up to its last listed checkpoint
    trace = assert_verifies_up_to_last_checkpoint(out, digits)
    assert trace.num_steps == last_listed
    names = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(name.startswith(leftover) for name in names), names

    # resuming finishes it exactly as the uninterrupted run did
    assert "28 steps, 11 checkpoints" in resume(out, capsys)
    assert_same_checkpoints(out, two_epoch_reference)
    assert json.loads((out / "manifest.json").read_text())["resumed"][0]["step"] == (
        last_listed
    )


def test_resume_of_a_run_killed_before_it_said_complete(
    tmp_path, digits, capsys, two_epoch_reference
):
    """All 28 steps listed but status still 'recording': resuming only finishes it."""
    out = tmp_path / "trace"
    shutil.copytree(two_epoch_reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "recording"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert_verifies_up_to_last_checkpoint(out, digits)
    assert "28 steps, 11 checkpoints" in resume(out, capsys)
    assert_same_checkpoints(out, two_epoch_reference)


def test_sigkill_at_an_arbitrary_moment(tmp_path, digits, capsys):
    out = tmp_path / "trace"
    args = [*TRAIN, "--epochs", "4", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "forgelab", *args],
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    manifest = out / "manifest.json"
    try:
        # wait until a few checkpoints are listed, then kill without warning
        while process.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text())["num_steps"] >= 5:
                break
            time.sleep(0.005)
        if process.poll() is not None:
            pytest.skip("the recording finished before it could be killed")
        process.send_signal(signal.SIGKILL)
    finally:
        _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err
    trace = assert_verifies_up_to_last_checkpoint(out, digits)
    assert 5 <= trace.num_steps < 56

    assert "56 steps, 57 checkpoints" in resume(out, capsys)
    expected = reference(tmp_path / "reference", digits, num_epochs=4, interval=1)
    assert_same_checkpoints(out, expected)


def test_resume_refuses_what_it_cannot_do(tiny_trace, capsys):
    assert main(["train", "--resume", "--out", str(tiny_trace)]) == 2
    assert "the recording is already complete" in capsys.readouterr().err

    assert main(["train", "--resume", "--lr", "0.1", "--out", str(tiny_trace)]) == 2
    assert "--lr cannot be combined with --resume" in capsys.readouterr().err

    code = main(["train", "--resume", "--dataset", "mnist", "--out", str(tiny_trace)])
    assert code == 2
    assert "--dataset mnist differs from the trace's dataset digits" in (
        capsys.readouterr().err
    )


def _files(trace: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(trace)): p.read_bytes()
        for p in sorted(trace.rglob("*"))
        if p.is_file()
    }


def test_same_seed_and_determinism_give_bit_identical_recordings(
    tmp_path, mnist_small, lenet_trace_master
):
    """A second LeNet recording equals the session's first in every byte."""
    again = record_trace(
        tmp_path / "again", mnist_small, "lenet", batch_size=32, num_epochs=1
    )
    first, second = _files(lenet_trace_master), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) == 14  # the manifest and 13 checkpoints
    assert all(first[name] == second[name] for name in first)


def test_a_different_seed_gives_a_different_recording(tmp_path, digits):
    def record(seed: int, name: str) -> dict[str, bytes]:
        trace = record_trace(
            tmp_path / name, digits, "logreg", batch_size=500, num_epochs=1, seed=seed
        )
        return _files(trace)

    first, same, other = record(7, "a"), record(7, "b"), record(8, "c")
    assert first == same
    assert sorted(first) == sorted(other)
    differing = [name for name in first if first[name] != other[name]]
    assert "checkpoints/step-00000000.safetensors" in differing
    assert "manifest.json" in differing


def test_recording_never_lands_on_existing_data(logreg_trace, digits, tmp_path):
    """A trace is recorded into a new or empty directory outside any other trace."""
    from forgelab.errors import ConfigError

    before = sorted(p.name for p in (logreg_trace / "checkpoints").iterdir())
    for inside in (logreg_trace / "checkpoints", logreg_trace / "sub"):
        with pytest.raises(ConfigError, match="inside the trace|not an empty"):
            record_trace(inside, digits, "logreg", batch_size=50, num_epochs=1)
    assert sorted(p.name for p in (logreg_trace / "checkpoints").iterdir()) == before
    assert not (logreg_trace / "sub").exists()
    Trace(logreg_trace)  # still readable
    occupied = tmp_path / "occupied" / "checkpoints"
    occupied.mkdir(parents=True)
    (occupied / "step-00000003.safetensors").write_text("precious")
    with pytest.raises(ConfigError, match="not an empty directory"):
        record_trace(occupied.parent, digits, "logreg", batch_size=50, num_epochs=1)
    assert (occupied / "step-00000003.safetensors").read_text() == "precious"
    # limits of the trace reader are checked before training
    for options in ({"num_epochs": 10**8}, {"checkpoint_interval": 2 * 10**8}):
        with pytest.raises(ConfigError, match="at most 100,000,000 steps"):
            record_trace(tmp_path / "big", digits, "logreg", batch_size=50, **options)
        assert not (tmp_path / "big").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    record_trace(empty, digits, "logreg", batch_size=50, num_epochs=1)
    assert Trace(empty).num_steps == 28
