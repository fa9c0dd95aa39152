"""The re-evaluation's setups end to end on tiny files in the real formats."""

import json

import pytest

from forgelab.cli import main
from formats import write_adult, write_cifar_python, write_imdb_keras


def _reproduce(out, *args):
    return main(["reproduce", "--out", str(out), "--epochs", "1", *args])


def test_vgg_mini_on_cifar10_python_files(tmp_path, capsys):
    write_cifar_python(tmp_path / "cifar", per_batch=4)
    args = ["--model", "vgg-mini", "--dataset", "cifar10"]
    args += ["--data-dir", str(tmp_path / "cifar"), "--batch-size", "10"]
    args += ["--every", "1", "--runs", "1", "-M", "3"]
    assert _reproduce(tmp_path / "out", *args) == 0
    assert "honest trace: 2 steps" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["dataset"]["name"] == "cifar10"
    assert results["dataset"]["input_shape"] == [3, 32, 32]
    assert results["settings"]["optimizer"] == "sgd"
    assert results["settings"]["lr"] == 0.01
    assert results["honest_trace_accepted"] is True
    assert [s["l2"] for s in results["verification"]["segments"]] == [0.0, 0.0]
    forgeries = results["forgeries"]
    assert [f["step"] for f in forgeries] == [0, 1]
    for forgery in forgeries:
        # plain SGD: eta times the gradient distance
        assert forgery["forging_error"] == pytest.approx(0.01 * forgery["distance"])
        assert 0 < forgery["forging_error"] < forgery["update_norm"]
    assert "SGD (eta 0.01)" in (tmp_path / "out" / "report.md").read_text()


def test_transformer_on_imdb_trains_with_adam(tmp_path, capsys):
    write_imdb_keras(tmp_path / "imdb", num_train=24, num_test=8, vocab_size=30)
    args = ["--model", "transformer", "--dataset", "imdb"]
    args += ["--data-dir", str(tmp_path / "imdb"), "--batch-size", "8"]
    args += ["--every", "1", "--runs", "2", "-M", "5"]
    assert _reproduce(tmp_path / "out", *args) == 0
    assert "honest trace: 3 steps" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["optimizer"] == "adam"
    assert results["settings"]["lr"] == 0.001
    verification = results["verification"]
    assert results["honest_trace_accepted"] is True
    assert all(s["l2"] == 0.0 for s in verification["segments"])
    assert all(
        set(s["state_errors"]) == {"exp_avg", "exp_avg_sq", "step"}
        and all(error == 0.0 for error in s["state_errors"].values())
        for s in verification["segments"]
    )
    forgeries = results["forgeries"]
    assert [(f["step"], f["run"]) for f in forgeries] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert all(0 < f["forging_error"] < f["update_norm"] for f in forgeries)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Adam (lr 0.001" in report
    assert "same logged checkpoint (weights and optimizer state)" in report
    trace = tmp_path / "out" / "trace"
    manifest = json.loads((trace / "manifest.json").read_text())
    assert manifest["model"]["vocab_size"] == 30
    assert manifest["optimizer"]["name"] == "adam"


def test_fcn1_on_adult_then_verify(tmp_path, capsys):
    write_adult(tmp_path / "adult", repeat=4)
    data = ["--dataset", "adult", "--data-dir", str(tmp_path / "adult")]
    trace = tmp_path / "trace"
    train = ["train", *data, "--model", "fcn1", "--out", str(trace), "--epochs", "2"]
    assert main([*train, "--batch-size", "10", "--momentum", "0.9"]) == 0
    out = tmp_path / "verify"
    verify = ["verify", str(trace), "--data-dir", str(tmp_path / "adult")]
    assert main([*verify, "--out", str(out)]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
    report = json.loads((out / "verify.json").read_text())
    assert len(report["segments"]) == 8
    assert all(s["l2"] == 0.0 and s["state_l2"] == 0.0 for s in report["segments"])
    manifest = json.loads((trace / "manifest.json").read_text())
    assert manifest["model"]["loss"] == "bce"
    assert manifest["dataset"]["input_shape"] == [105]
    # the verifier needs the same files: without --data-dir it says what it expects
    assert main(["verify", str(trace), "--out", str(out)]) == 2
    assert "adult.data and adult.test" in capsys.readouterr().err
