import json

import pytest

from forgelab.attacks import ATTACKS
from forgelab.cli import main
from forgelab.errors import ConfigError
from forgelab.trace import Trace, check_own_trace, replacing_own_trace


def test_reproduce_writes_table_report_and_figures(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "reproduce",
            "--dataset",
            "digits",
            "--model",
            "logreg",
            "--epochs",
            "8",
            "--every",
            "40",
            "--runs",
            "3",
            "-M",
            "30",
            "--attack-runs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "reproduction error" in printed and "margin" in printed
    for name in (
        "results.json",
        "report.md",
        "reproduction_error.png",
        "forging_error.png",
    ):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_steps"] == 8 * 14
    assert results["honest_trace_accepted"] is True
    tau = results["tolerance"]
    forging = [f["forging_error"] for f in results["forgeries"]]
    assert len(forging) == 3 * 3  # checkpoints 0, 40, 80
    assert results["margin"] == pytest.approx(min(forging) / tau)
    assert results["num_undetected"] == sum(1 for f in forging if f <= tau)
    for checkpoint in results["checkpoints"]:
        assert checkpoint["tolerance"] == tau
        assert checkpoint["reproduction_error"] == 0.0
    report = (out / "report.md").read_text()
    assert f"{tau:.3e}" in report
    assert "margin" in report
    if min(forging) > tau:
        # honest replays are exact here, so no ratio to them is printed
        assert "every honest step replayed with reproduction error exactly 0" in report
        assert "times the largest honest" not in report
    # the compact attack table: every attack at the checkpoint 3/4 into training
    attacks = {row["attack"]: row for row in results["attacks"]}
    assert list(attacks) == list(ATTACKS)
    replaced = {"thudi-batch": 100, "kong": 100, "baluta": 100, "greedy": 2}
    replaced["swap"] = 2
    candidates = {"thudi-batch": 400, "thudi": 400, "reeval": 300, "kong": 200}
    candidates |= {"zhang-sr": 50, "baluta": 100, "nearest": 1337, "greedy": 1337}
    candidates["swap"] = 1337
    for name, row in attacks.items():
        assert row["step"] == 84 and len(row["forging_errors"]) == 1
        assert row["num_replaced"] == replaced.get(name, 1)
        if name in candidates:
            assert row["num_candidates"] == candidates[name]
        assert row["margin"] == pytest.approx(min(row["forging_errors"]) / tau)
        assert row["num_detected"] == sum(e > tau for e in row["forging_errors"])
    # searching the whole pool beats the best of 300 on the same batches
    assert attacks["nearest"]["minimum"] <= attacks["reeval"]["minimum"] * (1 + 1e-5)
    # the local search starts from greedy's choice and only lowers the error
    assert attacks["swap"]["minimum"] <= attacks["greedy"]["minimum"] * (1 + 1e-5)
    assert "## Every attack at step 84" in report
    assert "every attack at step 84" in printed
    # a second run replaces the trace it made before
    assert (
        main(
            [
                "reproduce",
                "--dataset",
                "digits",
                "--model",
                "logreg",
                "--epochs",
                "2",
                "--every",
                "20",
                "--runs",
                "1",
                "-M",
                "5",
                "--no-attack-table",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    again = json.loads((out / "results.json").read_text())
    assert again["num_steps"] == 28 and again["attacks"] == []


def test_reproduce_refuses_to_delete_foreign_directories(tmp_path, capsys):
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "precious.txt").write_text("keep me")
    code = main(
        [
            "reproduce",
            "--dataset",
            "digits",
            "--model",
            "logreg",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert (tmp_path / "trace" / "precious.txt").read_text() == "keep me"
    assert "not a forgelab trace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reproduce", "--dataset", "nope"], "unknown dataset"),
        (["reproduce", "--model", "nope", "--dataset", "digits"], "unknown model"),
        (["reproduce", "--model", "lenet", "--dataset", "digits"], "needs images"),
        (["reproduce", "--runs", "0"], "must be >= 1"),
        # checked before a trace is trained
        (["reproduce", "-f", "101"], "must be at most the batch size 100"),
        (["reproduce", "-M", "100000000000"], "number of candidates must be in"),
        (["reproduce", "--runs", "100000"], "must be at most 10,000"),
        (["reproduce", "--attack-runs", "100000"], "must be at most 10,000"),
        (
            ["train", "--out", "x", "--optimizer", "adam", "--momentum", "0.9"],
            "Adam takes no momentum",
        ),
        (
            [
                "train",
                "--out",
                "x",
                "--dataset",
                "breast-cancer",
                "--model",
                "fcn1",
                "--batch-size",
                "1000",
            ],
            "exceeds",
        ),
        (["verify", "/nonexistent/trace"], "not a trace directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    # refused before anything was trained or written
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["verify", "x", "--tolerance", "abc"], "neither 'auto' nor a number"),
        (["theory", "--tolerance", "inf"], "must be in (0, 1e-06]"),
        (["theory", "--tolerance", "1e-5"], "must be in (0, 1e-06]"),
        (["reproduce", "--seed", "abc"], "'abc' is not a valid integer"),
        (["train", "--out", ""], "must not be empty"),
        (["verify", "x", "--safety-factor", "inf"], "must be a number in (0, 1e+06]"),
        (["evaluate", "x", "--safety-factor", "1e300"], "in (0, 1e+06]"),
        (["verify", "x", "--tolerance", "1e308"], "must be a number in [0, 1e+06]"),
    ],
)
def test_usage_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("forgelab: error: ")


def test_only_a_directory_that_is_entirely_a_trace_is_replaced(logreg_trace, tmp_path):
    def refused(directory):
        with pytest.raises(ConfigError, match="not a forgelab trace; not touching"):
            check_own_trace(directory)
        assert directory.exists()

    # a user's folder that merely holds a file called manifest.json stays
    foreign = tmp_path / "foreign"
    (foreign / "src").mkdir(parents=True)
    (foreign / "manifest.json").write_text("not json at all")
    (foreign / "data.csv").write_text("a,b\n")
    refused(foreign)
    (foreign / "manifest.json").write_text('{"format": "something-else"}')
    refused(foreign)
    # a manifest that only says it is forgelab's is not a trace either
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text('{"format": "forgelab-trace"}')
    refused(bare)
    assert (bare / "manifest.json").read_text() == '{"format": "forgelab-trace"}'
    assert (foreign / "data.csv").read_text() == "a,b\n"
    # a real trace with the user's files beside it, or among the checkpoints
    (logreg_trace / "mynotes.txt").write_text("keep")
    refused(logreg_trace)
    (logreg_trace / "mynotes.txt").unlink()
    (logreg_trace / "checkpoints" / "thesis.tex").write_text("keep")
    refused(logreg_trace)
    (logreg_trace / "checkpoints" / "thesis.tex").unlink()
    # a symbolic link to a trace is not followed
    link = tmp_path / "link"
    link.symlink_to(logreg_trace, target_is_directory=True)
    refused(link)
    # an honest trace (with an unfinished atomic write) is replaced
    (logreg_trace / "checkpoints" / ".step-00000001.safetensors.abc123").write_bytes(
        b""
    )
    with replacing_own_trace(logreg_trace) as fresh:
        assert not fresh.exists()
    assert not logreg_trace.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "foreign", "link"]


def test_an_unfinished_replacement_puts_the_previous_trace_back(logreg_trace, tmp_path):
    before = sorted(p.name for p in (logreg_trace / "checkpoints").iterdir())
    with pytest.raises(KeyboardInterrupt), replacing_own_trace(logreg_trace) as fresh:
        assert not fresh.exists()
        (fresh / "checkpoints").mkdir(parents=True)
        raise KeyboardInterrupt
    assert sorted(p.name for p in (logreg_trace / "checkpoints").iterdir()) == before
    Trace(logreg_trace)
    assert [p.name for p in logreg_trace.parent.iterdir()] == [logreg_trace.name]
    # a new trace that fails leaves nothing, not even an empty directory
    new = tmp_path / "new" / "trace"
    new.parent.mkdir()
    with pytest.raises(RuntimeError), replacing_own_trace(new):
        new.mkdir()
        raise RuntimeError("recording failed")
    assert list(new.parent.iterdir()) == []
    # completed: the previous trace is gone, the new one stays
    with replacing_own_trace(logreg_trace):
        logreg_trace.mkdir()
        (logreg_trace / "new.txt").write_text("new")
    assert [p.name for p in logreg_trace.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "trace"]
