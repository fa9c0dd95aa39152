"""Complete forged traces: the removed examples vanish, replay catches the forgery."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from forgelab.attacks import ATTACKS, STRONGER_ATTACKS, WHOLE_BATCH_ATTACKS
from forgelab.cli import main
from forgelab.errors import ConfigError, TraceError
from forgelab.forgery import (
    dataset_for_trace,
    draw_removed,
    forge_trace,
    read_removed,
    removed_sha256,
    without,
)
from forgelab.optim import OptimizerConfig
from forgelab.replay import verify_trace
from forgelab.trace import Trace
from forgelab.training import record_trace
from helpers import read_manifest, write_manifest


def _batches(trace: Trace) -> dict[int, np.ndarray]:
    """Every step's batch, by step."""
    batches = {}
    for position in range(1, len(trace.checkpoints)):
        checkpoint = trace.load_checkpoint(position)
        first = checkpoint.step - len(checkpoint.batches) + 1
        for offset, batch in enumerate(checkpoint.batches):
            batches[first + offset] = batch
    return batches


def _removal(trace: Trace) -> np.ndarray:
    """Two examples of step 5's batch and one of step 9's."""
    batches = _batches(trace)
    return np.sort(np.array([batches[5][3], batches[5][40], batches[9][0]]))


def test_removed_set_files(tmp_path, digits):
    path = tmp_path / "removed.txt"
    path.write_text("# the owner's deletion request\n7, 3\n\n11 3  # twice\n")
    assert list(read_removed(path, digits.num_train)) == [3, 7, 11]
    expected = hashlib.sha256(np.array([3, 7, 11], dtype="<i8").tobytes()).hexdigest()
    assert removed_sha256(np.array([11, 3, 7, 3])) == expected
    for text, message in (
        ("4\nfive\n", r"removed.txt:2: 'five' is not an example index"),
        ("-1\n", "'-1' is not an example index"),
        ("1437\n", "index 1437 is outside the training set"),
        ("# nothing\n", "no example index"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_removed(path, digits.num_train)
    with pytest.raises(ConfigError, match="cannot read"):
        read_removed(tmp_path / "missing.txt", 10)
    path.write_bytes("\ufeff7\n3\n".encode())
    assert list(read_removed(path, digits.num_train)) == [3, 7]
    path.write_text("1" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"index 111111111111\.\.\. \(5000 digits\)"):
        read_removed(path, digits.num_train)
    path.write_text("0001436\n")
    assert list(read_removed(path, digits.num_train)) == [1436]
    # leading zeros beyond int()'s 4,300-digit limit, and an index of zeros only
    path.write_text("0" * 5000 + "5\n000\n")
    assert list(read_removed(path, digits.num_train)) == [0, 5]
    with pytest.raises(ConfigError, match="must be a regular file"):
        read_removed(Path("/dev/zero"), digits.num_train)
    with pytest.raises(ConfigError, match="must be a regular file"):
        read_removed(tmp_path, digits.num_train)
    drawn = draw_removed(digits.num_train, 5, 1)
    assert len(set(drawn)) == 5 and list(drawn) == sorted(drawn)
    assert list(drawn) == list(draw_removed(digits.num_train, 5, 1))


def test_claimed_dataset_is_the_base_without_the_removed_rows(digits):
    removed = np.array([0, 10, 1436])
    claimed, kept = without(digits, removed)
    assert claimed.num_train == digits.num_train - 3
    assert len(kept) == claimed.num_train and not np.isin(removed, kept).any()
    # example 11 of D is example 11 - 2 = 9 of D'
    assert kept[9] == 11
    assert torch.equal(claimed.x_train[9], digits.x_train[11])
    assert claimed.y_train[9] == digits.y_train[11]
    assert claimed.fingerprint not in (digits.fingerprint, without(digits, [0])[0])
    assert claimed.fingerprint == without(digits, removed[::-1])[0].fingerprint
    assert claimed.fingerprint != without(digits, [0, 10, 1435])[0].fingerprint


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_removed_examples_never_appear_in_a_forged_trace(
    attack, logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    removed = _removal(trace)
    options = {"num_candidates": 20} if attack not in STRONGER_ATTACKS else {}
    if attack == "zhang-sn":
        options = {}
    result = forge_trace(
        trace, digits, removed, tmp_path / "forged", attack=attack, options=options
    )
    forged = Trace(tmp_path / "forged")
    claimed, kept = without(digits, removed)
    assert forged.num_train == claimed.num_train
    assert forged.manifest["dataset"]["fingerprint"] == claimed.fingerprint
    assert forged.claim["removed_sha256"] == removed_sha256(removed)
    assert forged.claim["base_dataset"]["fingerprint"] == digits.fingerprint
    assert "removed" not in json.dumps(forged.manifest["claim"]).replace(
        "removed_sha256", ""
    ).replace("num_removed", "").replace("removed_hash", "").replace(
        "removed indices", ""
    )
    original = _batches(trace)
    rewritten = {step: kept[batch] for step, batch in _batches(forged).items()}
    assert sorted(rewritten) == sorted(original)
    assert result.forged_steps == [5, 9]
    for step, batch in rewritten.items():
        assert not np.isin(batch, removed).any()
        if step not in (5, 9):
            assert np.array_equal(batch, original[step])
        elif attack in WHOLE_BATCH_ATTACKS:
            assert len(np.intersect1d(batch, original[step])) < len(batch)
        else:
            # only the removed examples' slots change
            changed = np.flatnonzero(batch != original[step])
            assert set(changed) == set(np.flatnonzero(np.isin(original[step], removed)))
    # the forged trace claims the original weights
    for position in (0, 5, 28):
        assert torch.equal(
            forged.load_checkpoint(position).params["1.weight"],
            trace.load_checkpoint(position).params["1.weight"],
        )
    assert (tmp_path / "forged" / "removed.txt").is_file()
    record = json.loads((tmp_path / "forged" / "forgery.json").read_text())
    assert record["forged_steps"] == [5, 9] and record["attack"] == attack
    assert record["source_trace"] == str(trace.root)


def test_keep_checkpoints_trace_is_rejected_at_exactly_the_forged_steps(
    logreg_trace_master, digits, tmp_path, capsys
):
    removed_file = tmp_path / "request.txt"
    removed_file.write_text(
        "\n".join(map(str, _removal(Trace(logreg_trace_master)))) + "\n"
    )
    forged = tmp_path / "forged"
    code = main(
        [
            "forge",
            str(logreg_trace_master),
            "--remove",
            str(removed_file),
            "--attack",
            "nearest",
            "--out",
            str(forged),
        ]
    )
    assert code == 0
    assert "forged 2 of 28 steps" in capsys.readouterr().out
    record = json.loads((forged / "forgery.json").read_text())
    report_dir = tmp_path / "report"
    code = main(
        [
            "verify",
            str(forged),
            "--removed",
            str(removed_file),
            "--out",
            str(report_dir),
        ]
    )
    assert code == 1
    assert "REJECTED at step 5" in capsys.readouterr().out
    verdict = json.loads((report_dir / "verify.json").read_text())
    assert verdict["failed_steps"] == record["forged_steps"] == [5, 9]
    # the schedule: an example used twice in the epoch for every replacement that
    # the epoch already held (the 37 digits a 28-batch epoch leaves out are free)
    replacements = np.concatenate([s["replacement"] for s in record["steps"]])
    unused = set(range(digits.num_train)) - set(
        np.concatenate(list(_batches(Trace(logreg_trace_master)).values())).tolist()
    )
    reused = sum(int(r) not in unused for r in replacements)
    assert verdict["schedule"]["repeated_examples"] == reused > 0
    assert verdict["suspect_checkpoints"] == []
    tau = verdict["calibration"]["tolerance"]
    for segment in verdict["segments"]:
        if segment["end_step"] in (5, 9):
            forging = next(
                s["forging_error"]
                for s in record["steps"]
                if s["step"] == segment["end_step"]
            )
            # the verifier measures the attack's own forging error
            assert segment["l2"] == pytest.approx(forging, rel=1e-3)
            assert segment["l2"] > 100 * tau
        else:
            assert segment["l2"] == 0.0


def test_removing_enough_examples_to_shorten_an_epoch_still_verifies(
    logreg_trace_master, digits, tmp_path
):
    # 1,437 digits give 28 batches of 50; without 40 of them D' would give 27, but
    # the forged trace keeps the base dataset's schedule of 28 steps
    trace = Trace(logreg_trace_master)
    removed = draw_removed(digits.num_train, 40, seed=3)
    assert (digits.num_train - 40) // 50 < trace.num_steps
    result = forge_trace(trace, digits, removed, tmp_path / "forged", attack="nearest")
    forged = Trace(tmp_path / "forged")
    assert forged.num_steps == 28 and forged.num_train == digits.num_train - 40
    claimed = dataset_for_trace(forged, digits, tmp_path / "forged" / "removed.txt")
    report = verify_trace(forged, claimed)
    assert not report.accepted
    assert report.failed_steps == result.forged_steps
    assert len(result.forged_steps) > 10


def test_verify_needs_the_claimed_removed_set(
    logreg_trace_master, digits, tmp_path, capsys
):
    trace = Trace(logreg_trace_master)
    forge_trace(trace, digits, _removal(trace), tmp_path / "forged", attack="zhang-sn")
    forged = tmp_path / "forged"
    assert main(["verify", str(forged)]) == 2
    assert "pass the removed set with --removed" in capsys.readouterr().err
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("1\n2\n3\n")
    assert main(["verify", str(forged), "--removed", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "the trace claims" in err and "Traceback" not in err
    assert main(["verify", str(logreg_trace_master), "--removed", str(wrong)]) == 2
    assert "makes no removal claim" in capsys.readouterr().err
    manifest = read_manifest(forged)
    manifest["claim"]["num_removed"] = 4
    write_manifest(forged, manifest)
    with pytest.raises(TraceError, match="malformed removal claim"):
        dataset_for_trace(Trace(forged), digits, forged / "removed.txt")
    # a claim that names another base dataset than the verifier's is refused
    manifest["claim"]["num_removed"] = len(_removal(trace))
    manifest["claim"]["base_dataset"]["name"] = "mnist"
    write_manifest(forged, manifest)
    with pytest.raises(TraceError, match="derives from mnist with fingerprint"):
        dataset_for_trace(Trace(forged), digits, forged / "removed.txt")


@pytest.mark.parametrize("attack", ["reeval", "thudi", "zhang-sn", "nearest"])
def test_removing_all_but_less_than_a_batch_is_refused_before_writing(
    attack, logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    removed = np.arange(digits.num_train - trace.batch_size + 1)
    with pytest.raises(ConfigError, match="leaves 49, fewer than one batch of 50"):
        forge_trace(trace, digits, removed, tmp_path / "forged", attack=attack)
    assert not (tmp_path / "forged").exists()


def test_kong_pool_smaller_than_a_batch_is_refused(
    logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    with pytest.raises(ConfigError, match="--pool-size 20 is smaller than one batch"):
        forge_trace(
            trace,
            digits,
            _removal(trace),
            tmp_path / "forged",
            attack="kong",
            options={"pool_size": 20},
        )
    assert not (tmp_path / "forged").exists()


def test_recomputed_trace_is_honest_and_reports_divergence(
    logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    removed = _removal(trace)
    result = forge_trace(
        trace,
        digits,
        removed,
        tmp_path / "forged",
        attack="reeval",
        options={"num_candidates": 30},
        mode="recompute",
    )
    forged = Trace(tmp_path / "forged")
    claimed = dataset_for_trace(forged, digits, tmp_path / "forged" / "removed.txt")
    report = verify_trace(forged, claimed)
    assert report.accepted and all(s.l2 == 0.0 for s in report.segments)
    divergence = {d["step"]: d["l2"] for d in result.divergence}
    assert sorted(divergence) == list(range(1, 29))
    assert all(divergence[s] == 0.0 for s in range(1, 5))
    # after the first forged step the models differ by exactly that step's error
    first = result.steps[0]
    assert first.step == 5
    assert divergence[5] == pytest.approx(first.forging_error, rel=1e-3)
    assert all(divergence[s] > 0 for s in range(5, 29))
    assert set(result.accuracy) == {"original", "forged"}
    assert 0 < result.accuracy["forged"] <= 1
    original = trace.manifest["test_accuracy"][-1]
    assert result.accuracy["original"] == pytest.approx(original["accuracy"])
    assert forged.manifest["test_accuracy"][-1]["step"] == original["step"]


def test_momentum_trace_with_segments_of_several_steps(digits, tmp_path):
    out = record_trace(
        tmp_path / "trace",
        digits,
        "logreg",
        optimizer=OptimizerConfig(lr=0.05, momentum=0.9),
        batch_size=50,
        num_epochs=1,
        checkpoint_interval=4,
    )
    trace = Trace(out)
    removed = _removal(trace)
    cheap = {"attack": "reeval", "options": {"num_candidates": 20}}
    forge_trace(trace, digits, removed, tmp_path / "kept", **cheap)
    forged = Trace(tmp_path / "kept")
    report = verify_trace(
        forged, dataset_for_trace(forged, digits, tmp_path / "kept" / "removed.txt")
    )
    # steps 5 and 9 lie in the segments ending at checkpoints 8 and 12
    assert report.failed_steps == [8, 12]
    forge_trace(trace, digits, removed, tmp_path / "again", mode="recompute", **cheap)
    again = Trace(tmp_path / "again")
    assert verify_trace(
        again, dataset_for_trace(again, digits, tmp_path / "again" / "removed.txt")
    ).accepted


def test_adam_traces_are_refused(digits, tmp_path):
    out = record_trace(
        tmp_path / "trace",
        digits,
        "logreg",
        optimizer=OptimizerConfig(name="adam", lr=0.001),
        batch_size=200,
        num_epochs=1,
    )
    with pytest.raises(ConfigError, match="'adam'"):
        forge_trace(Trace(out), digits, [0], tmp_path / "x", attack="nearest")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--attack", "kong"], {"num_candidates": 200, "pool_size": 1000}),
        (["--attack", "thudi-batch"], {"num_candidates": 400}),
        (["--attack", "zhang-sr"], {"num_candidates": 50}),
        (["--attack", "baluta", "--norm", "linf"], {"num_candidates": 100}),
        (["--attack", "kong", "-M", "7"], {"num_candidates": 7}),
    ],
)
def test_forge_command_uses_the_published_defaults(
    args, expected, logreg_trace_master, tmp_path, capsys
):
    out = tmp_path / "forged"
    code = main(
        ["forge", str(logreg_trace_master), "--remove-count", "1", "--out", str(out)]
        + args
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "forgery.json").read_text())
    for key, value in expected.items():
        assert record["options"][key] == value
    assert all(
        s["num_candidates"] == expected["num_candidates"] for s in record["steps"]
    )
    if "--norm" in args:
        assert record["options"]["norm"] == "linf"
        assert {s["criterion"] for s in record["steps"]} <= {"weight Linf"}


def test_forge_command_rejects_mixed_modes(logreg_trace_master, tmp_path, capsys):
    base = ["forge", str(logreg_trace_master)]
    cases = [
        (base + ["--distance", "model"], "needs --remove"),
        (base + ["--remove-count", "2", "--runs", "3", "--out", "x"], "--runs"),
        (base + ["--remove-count", "2"], "needs --out"),
        (
            base + ["--remove-count", "2", "--remove", "f", "--out", "x"],
            "not both",
        ),
        (
            base
            + ["--remove-count", "2", "-M", "5", "--attack", "zhang-sn"]
            + ["--out", str(tmp_path / "y")],
            "does not take -M",
        ),
        (base + ["--attack", "nope"], "unknown attack 'nope'"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_forge_output_never_lands_on_existing_data(
    logreg_trace, digits, tmp_path, capsys
):
    trace = Trace(logreg_trace)
    removed = _removal(trace)
    # inside the original trace
    with pytest.raises(ConfigError, match="inside the trace"):
        forge_trace(
            trace, digits, removed, logreg_trace / "checkpoints", attack="thudi"
        )
    # a directory holding other files
    other = tmp_path / "notes"
    other.mkdir()
    (other / "removed.txt").write_text("# my request\n5\n")
    with pytest.raises(ConfigError, match="not an empty directory"):
        forge_trace(trace, digits, removed, other, attack="thudi")
    assert (other / "removed.txt").read_text() == "# my request\n5\n"
    # verify and evaluate refuse to write their reports inside the trace
    for command in (["verify"], ["evaluate", "--attack", "thudi"]):
        args = command + [str(logreg_trace), "--out", str(logreg_trace / "reports")]
        assert main(args) == 2
        assert "inside the trace" in capsys.readouterr().err
    assert not (logreg_trace / "reports").exists()
    assert Trace(logreg_trace).num_steps == 28


def test_a_failed_forgery_leaves_no_partial_trace(
    logreg_trace_master, digits, tmp_path, monkeypatch
):
    import forgelab.forgery

    calls = []
    honest_segment = forgelab.forgery.forge_segment

    def failing_segment(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise ConfigError("the attack gave up")
        return honest_segment(*args, **kwargs)

    monkeypatch.setattr(forgelab.forgery, "forge_segment", failing_segment)
    trace = Trace(logreg_trace_master)
    out = tmp_path / "forged"
    with pytest.raises(ConfigError, match="gave up"):
        forge_trace(trace, digits, _removal(trace), out, attack="thudi")
    assert len(calls) == 7 and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    calls.clear()
    with pytest.raises(ConfigError, match="gave up"):
        forge_trace(trace, digits, _removal(trace), empty, attack="thudi")
    assert empty.is_dir() and not any(empty.iterdir())


def test_whole_batch_attacks_check_m_and_the_pool_before_writing(
    logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    out = tmp_path / "forged"
    # 500,000 candidate batches of 50 examples are 25 million indices
    with pytest.raises(ConfigError, match="exceed 20,000,000 drawn indices"):
        forge_trace(
            trace,
            digits,
            _removal(trace),
            out,
            attack="baluta",
            options={"num_candidates": 500_000},
        )
    with pytest.raises(ConfigError, match=r"-M must be in \[1, 10000000\]"):
        forge_trace(
            trace,
            digits,
            _removal(trace),
            out,
            attack="kong",
            options={"num_candidates": 10**9},
        )
    # D' minus one batch of 50 must still hold a batch
    removed = np.arange(digits.num_train - 60)
    with pytest.raises(ConfigError, match="fewer than one batch of 50"):
        forge_trace(trace, digits, removed, out, attack="thudi-batch")
    assert not out.exists()


def test_forged_traces_and_bad_seeds_are_refused_in_one_line(
    logreg_trace_master, digits, tmp_path, capsys
):
    trace = Trace(logreg_trace_master)
    forged = tmp_path / "forged"
    forge_trace(trace, digits, _removal(trace), forged, attack="thudi")
    for args in (
        ["forge", str(forged)],
        ["forge", str(forged), "--remove-count", "1", "--out", str(tmp_path / "x")],
        ["evaluate", str(forged)],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is a forged trace" in err and err.count("\n") == 1
    for command in ("verify", "forge", "evaluate"):
        assert main([command, str(logreg_trace_master), "--seed", "-1"]) == 2
        err = capsys.readouterr().err
        assert "--seed" in err and err.count("\n") == 1
    removed = tmp_path / "r.txt"
    removed.write_text("3\n")
    args = ["evaluate", str(logreg_trace_master), "--remove", str(removed)]
    assert main(args + ["--remove-count", "2"]) == 2
    assert "not both" in capsys.readouterr().err
