import numpy as np
import pytest
import torch

from forgelab.cli import main
from forgelab.errors import TraceError
from forgelab.replay import (
    calibrate_tolerance,
    epoch_repeats,
    replay_segment,
    verify_trace,
)
from forgelab.trace import Trace
from helpers import read_manifest, replace_index, rewrite_checkpoint, shift_one_weight


def test_honest_trace_is_accepted_with_zero_error(lenet_trace, mnist_small):
    report = verify_trace(Trace(lenet_trace), mnist_small)
    assert report.accepted
    assert len(report.segments) == 12
    assert [s.end_step for s in report.segments] == list(range(1, 13))
    # same machine, deterministic replay: exactly the logged weights
    assert all(s.l2 == 0.0 and s.linf == 0.0 for s in report.segments)
    assert all(s.update_norm > 0 for s in report.segments)
    tau = report.calibration.tolerance
    benign = report.calibration.benign
    assert set(benign) == {"permuted", "threads", "float64"}
    assert tau == pytest.approx(10 * max(benign.values()))
    # fp32 against fp64 is the largest benign source, far below a one-example swap
    assert 1e-9 < benign["float64"] < 1e-6
    assert 1e-8 < tau < 1e-5
    # one shuffled pass per epoch: no example twice in an epoch
    assert report.schedule["repeated_examples"] == 0
    assert (
        report.schedule["steps_per_epoch"]
        == Trace(lenet_trace).num_steps // (Trace(lenet_trace).manifest["num_epochs"])
    )


def test_epoch_repeats_counts_surplus_uses_per_epoch():
    batches = {
        1: np.array([0, 1]),
        2: np.array([2, 3]),
        3: np.array([0, 4]),
        4: np.array([4, 4]),
        5: np.array([1, 2]),
    }
    assert epoch_repeats(batches, 2) == {
        "steps_per_epoch": 2,
        "repeated_examples": 2,
        "epochs_with_repeats": [1],
    }
    # as one epoch of five steps: 0, 1, 2 and 4 each come back
    assert epoch_repeats(batches, 5)["repeated_examples"] == 5


def test_calibration_does_not_use_logged_weights(lenet_trace, mnist_small):
    """Tampering a checkpoint must not widen the tolerance the verifier calibrates."""
    before = calibrate_tolerance(Trace(lenet_trace), mnist_small, seed=5)
    rewrite_checkpoint(lenet_trace, before.sampled_steps[0], shift_one_weight(1e-3))
    after = calibrate_tolerance(Trace(lenet_trace), mnist_small, seed=5)
    assert after.sampled_steps == before.sampled_steps
    assert after.tolerance == pytest.approx(before.tolerance, rel=0.5)


@pytest.mark.parametrize("step", [1, 6, 12])
def test_shifted_weight_is_rejected_at_that_checkpoint(lenet_trace, mnist_small, step):
    rewrite_checkpoint(lenet_trace, step, shift_one_weight(1e-5))
    report = verify_trace(Trace(lenet_trace), mnist_small)
    assert not report.accepted
    # the shifted checkpoint is the end of step `step` and the start of the next one
    expected = [step] if step == 12 else [step, step + 1]
    assert report.failed_steps == expected
    assert report.suspect_checkpoints == ([] if step == 12 else [step])
    failed = report.segments[step - 1]
    assert failed.l2 == pytest.approx(1e-5, rel=1e-2)
    assert failed.linf == pytest.approx(1e-5, rel=1e-2)


def test_changed_batch_is_rejected_at_exactly_that_step(lenet_trace, mnist_small):
    trace = Trace(lenet_trace)
    logged = trace.load_checkpoint(7).batches[0]
    unused = int(np.setdiff1d(np.arange(400), logged)[0])
    rewrite_checkpoint(lenet_trace, 7, replace_index(3, unused))
    report = verify_trace(Trace(lenet_trace), mnist_small)
    assert report.failed_steps == [7]
    assert report.suspect_checkpoints == []
    assert report.segments[6].l2 > 10 * report.calibration.tolerance


def test_fixed_tolerance_is_used_as_given(lenet_trace, mnist_small):
    rewrite_checkpoint(lenet_trace, 4, shift_one_weight(1e-5))
    loose = verify_trace(Trace(lenet_trace), mnist_small, tolerance=1e-4)
    assert loose.accepted and loose.calibration.method == "fixed"
    strict = verify_trace(Trace(lenet_trace), mnist_small, tolerance=5e-6)
    assert strict.failed_steps == [4, 5]


def test_hash_mismatch_is_unusable_input(lenet_trace, mnist_small):
    rewrite_checkpoint(lenet_trace, 3, shift_one_weight(1e-5), update_hash=False)
    with pytest.raises(TraceError, match="sha256 does not match"):
        verify_trace(Trace(lenet_trace), mnist_small)


def test_dataset_fingerprint_must_match(lenet_trace, mnist):
    with pytest.raises(TraceError, match="fingerprint"):
        verify_trace(Trace(lenet_trace), mnist)


def test_cli_exit_codes(logreg_trace, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["verify", str(logreg_trace), "--out", str(out)]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
    assert (out / "verify.json").is_file() and (out / "verify.png").is_file()

    rewrite_checkpoint(logreg_trace, 5, shift_one_weight(1e-5))
    assert main(["verify", str(logreg_trace), "--out", str(out)]) == 1
    assert "REJECTED at step 5" in capsys.readouterr().out

    manifest = read_manifest(logreg_trace)
    (logreg_trace / manifest["checkpoints"][2]["file"]).write_bytes(b"garbage")
    assert main(["verify", str(logreg_trace), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sha256 does not match" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert main(["verify", str(logreg_trace), "--tolerance", "abc"]) == 2


def test_segments_replay_independently_and_agree_with_full_verification(
    lenet_trace, mnist_small
):
    rewrite_checkpoint(lenet_trace, 9, shift_one_weight(1e-5))
    trace = Trace(lenet_trace)
    full = verify_trace(trace, mnist_small, tolerance=1e-6)
    for position in (10, 3, 9):
        alone = replay_segment(trace, mnist_small, position)
        assert alone.end_step == position
        assert alone.l2 == full.segments[position - 1].l2
    with pytest.raises(ValueError, match="segment position"):
        replay_segment(trace, mnist_small, 0)


def test_a_trace_whose_replay_is_not_reproducible_is_undecidable(
    logreg_trace, digits, monkeypatch
):
    """Randomness in the model (like dropout) must never widen tau to accept all."""
    from forgelab import replay
    from forgelab.errors import UndecidableError

    real = replay.Replayer.replay

    def noisy(self, start, batches, **kwargs):
        weights, state = real(self, start, batches, **kwargs)
        return weights + 1e-2 * torch.randn_like(weights), state

    monkeypatch.setattr(replay.Replayer, "replay", noisy)
    with pytest.raises(UndecidableError, match="not reproducible"):
        verify_trace(Trace(logreg_trace), digits)
    assert UndecidableError.exit_code == 1
