"""Detection of forged steps: ROC/AUC, and evaluate against the verifier itself."""

import dataclasses
import itertools
import json

import numpy as np
import pytest

from forgelab.cli import main
from forgelab.data import fingerprint_arrays
from forgelab.evaluation import evaluate_attacks, roc_auc, roc_curve
from forgelab.forgery import dataset_for_trace, forge_trace
from forgelab.replay import verify_trace
from forgelab.trace import Trace
from forgelab.training import batch_at, record_trace
from test_forgery import _removal


def test_roc_on_a_hand_counted_example():
    honest, forged = [0.0, 0.0, 1.0], [1.0, 2.0]
    fpr, tpr, thresholds = roc_curve(honest, forged)
    assert list(thresholds) == [2.0, 1.0, 0.0, -np.inf]
    assert list(fpr) == [0.0, 0.0, 1 / 3, 1.0]
    assert list(tpr) == [0.0, 0.5, 1.0, 1.0]
    # pairs (forged > honest): 1 beats two zeros and ties with 1, 2 beats all three
    assert roc_auc(honest, forged) == pytest.approx(5.5 / 6)


def test_auc_is_the_pairwise_win_rate():
    rng = np.random.default_rng(0)
    honest = rng.integers(0, 6, size=17).astype(float)
    forged = rng.integers(2, 9, size=11).astype(float)
    wins = sum(
        1.0 if f > h else 0.5 if f == h else 0.0
        for f, h in itertools.product(forged, honest)
    )
    assert roc_auc(honest, forged) == pytest.approx(wins / (17 * 11))
    assert roc_auc([0.0], [0.0]) == 0.5
    assert roc_auc([1.0, 2.0], [0.5]) == 0.0


def test_evaluation_matches_the_verifier_on_the_written_forged_trace(
    logreg_trace_master, digits, tmp_path
):
    trace = Trace(logreg_trace_master)
    removed = _removal(trace)
    evaluation = evaluate_attacks(
        trace,
        digits,
        removed,
        attacks=["reeval", "greedy"],
        num_candidates=25,
        num_benign=4,
        seed=11,
    )
    assert evaluation.touched_steps == [5, 9]
    assert len(evaluation.honest_errors) == 26
    assert len(evaluation.benign_errors) == 4
    assert all(e == 0.0 for e in evaluation.honest_errors)
    assert all(0 < e < evaluation.tolerance for e in evaluation.benign_errors)
    reeval, greedy = evaluation.attacks
    assert reeval.options["num_candidates"] == 25
    assert greedy.num_replaced == [2, 1]
    for result in evaluation.attacks:
        assert result.steps == [5, 9]
        assert result.detection_rate == 1.0 and result.false_rejection_rate == 0.0
        assert result.auc == 1.0 and result.benign_auc == 1.0
        assert result.margin == pytest.approx(
            min(result.replay_errors) / evaluation.tolerance
        )
        # the same forgeries, written as a trace and verified, fail by the same errors
        out = tmp_path / result.attack
        forge_trace(
            trace,
            digits,
            removed,
            out,
            attack=result.attack,
            options={"num_candidates": 25} if result.attack == "reeval" else {},
            seed=11,
        )
        forged = Trace(out)
        report = verify_trace(
            forged, dataset_for_trace(forged, digits, out / "removed.txt")
        )
        assert report.failed_steps == [5, 9]
        replayed = [s.l2 for s in report.segments if s.end_step in (5, 9)]
        assert replayed == result.replay_errors
        assert result.replay_errors == pytest.approx(result.forging_errors, rel=1e-3)


def test_an_undetectable_forgery_shows_in_the_auc(digits, tmp_path):
    """Swapping an example for an exact copy of itself leaves no error at all."""
    first, copy = (
        int(batch_at(2024, 2, 1437, 50)[0]),
        int(batch_at(2024, 9, 1437, 50)[0]),
    )
    raw = digits.raw_train.copy()
    raw[copy] = raw[first]
    x_train, y_train = digits.x_train.clone(), digits.y_train.clone()
    x_train[copy], y_train[copy] = x_train[first], y_train[first]
    twin = dataclasses.replace(
        digits,
        x_train=x_train,
        y_train=y_train,
        raw_train=raw,
        fingerprint=fingerprint_arrays(raw, y_train.numpy()),
    )
    trace = Trace(
        record_trace(tmp_path / "trace", twin, "logreg", batch_size=50, num_epochs=1)
    )
    evaluation = evaluate_attacks(
        trace, twin, np.array([first]), attacks=["nearest", "reeval"], num_benign=3
    )
    assert evaluation.touched_steps == [3]
    nearest, reeval = evaluation.attacks
    assert nearest.records[0].replacement == [copy]
    assert nearest.replay_errors == [0.0] and nearest.forging_errors == [0.0]
    assert nearest.detection_rate == 0.0 and nearest.margin == 0.0
    assert nearest.auc == 0.5  # a tie with every honest step (all exactly 0)
    assert nearest.benign_auc == 0.0  # below every reordered honest step
    assert reeval.detection_rate == 1.0


def test_evaluate_command(logreg_trace_master, tmp_path, capsys):
    out = tmp_path / "evaluate"
    code = main(
        [
            "evaluate",
            str(logreg_trace_master),
            "--attack",
            "zhang-sn",
            "--attack",
            "kong",
            "--remove-count",
            "4",
            "--max-steps",
            "2",
            "--benign-steps",
            "3",
            "-M",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "margin" in printed and "zhang-sn" in printed and "kong" in printed
    results = json.loads((out / "evaluate.json").read_text())
    assert [a["attack"] for a in results["attacks"]] == ["zhang-sn", "kong"]
    kong = results["attacks"][1]
    assert kong["options"]["num_candidates"] == 10
    assert kong["options"]["pool_size"] == 1000
    assert kong["num_steps"] == 2 and kong["num_replaced_median"] == 50
    assert "num_candidates" not in results["attacks"][0]["options"]
    for name in ("zhang-sn", "kong"):
        assert (out / f"evaluate-{name}.png").stat().st_size > 0
    assert main(["evaluate", str(logreg_trace_master), "--attack", "nope"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
