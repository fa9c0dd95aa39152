"""The benchmark's bookkeeping; no test here asserts how fast anything is."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgelab.bench import (
    DIGIT_MODELS,
    BenchSettings,
    Timing,
    _await_child,
    _model,
    measure_engine,
    measure_nearest,
    measure_reeval,
    measure_verify,
    run_benchmark,
    summarise,
    time_interleaved,
)
from forgelab.cli import main
from forgelab.errors import ConfigError, DataError, ForgelabError
from forgelab.models import MODELS


def test_ratio_is_the_median_of_per_round_ratios():
    timing = Timing(seconds={"slow": [2.0, 4.0, 9.0], "fast": [1.0, 1.0, 3.0]})
    # rounds give 2, 4 and 3
    assert timing.ratio("slow", "fast") == 3.0
    assert timing.median("slow") == 4.0


def test_sides_alternate_their_order_between_rounds():
    calls = []
    timing = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        3,
        warmup=False,
    )
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in timing.seconds.values()] == [3, 3]
    assert all(s >= 0 for v in timing.seconds.values() for s in v)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"only": ("floor", "speed")}, "unknown measurement 'speed'"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"batch_size": 4000}, "batch size must be <= 1000"),
        ({"num_replaced": 101}, "f must be between"),
        ({"large_pool": 1}, "large pool must hold 2 to 200,000"),
        ({"large_pool": 10**9}, "large pool must hold 2 to 200,000"),
        ({"trace_steps": 0}, r"trace steps must be in \[1, 10,000\]"),
        ({"trace_steps": 10**9}, "trace steps"),
        ({"num_candidates": 10**9}, "number of candidates must be in"),
        ({"num_candidates": 10**6, "num_replaced": 100}, "drawn indices"),
        ({"seed": -1}, "seed must be in"),
        ({"seed": 2**64}, "seed must be in"),
        ({"only": ()}, "no measurement chosen"),
        ({"models": (), "only": ("loop",)}, "no model chosen"),
        ({"repeats": 1001}, "repeats must be <= 1000"),
        ({"threads": 10**6}, "threads must be at most the"),
        # 10,000 steps of batch 1 are 2.5 epochs of 4,000 digits: 12,000 recorded
        (
            {"trace_steps": 10_000, "batch_size": 1, "only": ("verify",)},
            "10000 trace steps become 12,000 in whole epochs of batch size 1",
        ),
    ],
)
def test_bad_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        BenchSettings(**changes)


def test_settings_of_measurements_not_run_are_not_checked():
    settings = BenchSettings(only=("reeval",), trace_steps=0, large_pool=1, models=())
    assert settings.trace_steps == 0


def test_digit_models_are_exactly_the_models_that_take_mnist():
    takes_digits = set()
    for name in MODELS:
        try:
            _model(name, 0)
        except ConfigError:
            continue
        takes_digits.add(name)
    assert takes_digits == set(DIGIT_MODELS)


def test_models_are_checked_before_anything_is_measured():
    with pytest.raises(ConfigError, match="'fcn1' cannot be benchmarked on MNIST"):
        run_benchmark(BenchSettings(models=("logreg", "fcn1"), only=("floor",)))


def test_a_failing_child_is_one_error_not_a_hang(tmp_path):
    # an empty directory holds no MNIST files: the child fails, the parent says why
    settings = BenchSettings(data_dir=tmp_path, only=("nearest",))
    with pytest.raises(DataError, match="nearest search over 10 examples failed"):
        measure_nearest(settings, "large", 10)
    # a child that dies without reporting is noticed within a poll
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=sys.exit, args=(3,))
    child.start()
    with pytest.raises(ForgelabError, match="exit code 3"):
        _await_child(child, context.Queue())
    child.join()


def test_summary_has_rows_only_for_what_ran_and_targets_only_at_defaults():
    results = {
        "engine": [
            {
                "model": "mlp",
                "floor_ratio": 0.7,
                "floor_ratio_new_matrix": 0.5,
                "loop_ratio": 9.0,
                "loop_over_batched": 9.0,
                "vmap_over_engine": 3.0,
            }
        ],
        "reeval": {
            "ratio": 4.0,
            "identical_selection": True,
            "num_replaced": 1,
            "num_candidates": 1,
            "batch_size": 100,
        },
    }
    rows = summarise(results, BenchSettings(only=("floor", "reeval"), num_candidates=1))
    assert [(row["measurement"], row["met"]) for row in rows] == [
        ("floor", True),
        ("reeval", None),
    ]
    assert rows[1]["target"] == "(>= 30 at defaults)"
    # the embedded pool is always 5,000 digits; a small large pool shows nothing
    nearest = {
        "nearest": [
            {"pool_size": 5000, "peak_rss_gb": 0.5, "seconds": 1.0, "pool": "embedded"},
            {"pool_size": 10, "peak_rss_gb": 0.3, "seconds": 0.1, "pool": "random"},
        ]
    }
    rows = summarise(nearest, BenchSettings(only=("nearest",), large_pool=10))
    assert [row["met"] for row in rows] == [True, None]


def test_summary_compares_each_headline_with_its_target():
    results = {
        "engine": [
            {
                "model": "lenet",
                "floor_ratio": 0.7,
                "floor_ratio_new_matrix": 0.5,
                "loop_ratio": 7.9,
                "loop_over_batched": 9.0,
                "vmap_over_engine": 3.0,
            }
        ],
        "reeval": {
            "ratio": 31.0,
            "identical_selection": True,
            "num_replaced": 1,
            "num_candidates": 300,
            "batch_size": 100,
        },
        "nearest": [
            {"pool_size": 60000, "peak_rss_gb": 2.5, "seconds": 1.0, "pool": "random"}
        ],
        "verify": {"num_steps": 200, "ratio": 1.3, "ratio_without_calibration": 0.6},
    }
    rows = {row["label"]: row for row in summarise(results)}
    met = {label: row["met"] for label, row in rows.items()}
    assert met == {
        "per-sample / batched throughput, lenet": True,
        "per-sample engine vs loop, lenet": False,
        "reeval fast vs published (f=1, M=300, b=100, lenet)": True,
        "nearest over 60,000: peak RSS (GB)": False,
        "verify / record, 200 steps": True,
    }
    assert rows["verify / record, 200 steps"]["target"] == "<= 1.3"


def test_engine_measurement_checks_the_engine_against_the_loop():
    entry = measure_engine(BenchSettings(batch_size=6, repeats=1), "logreg")
    assert entry["engine"] == "layerwise"
    assert entry["num_parameters"] == 784 * 10 + 10
    assert entry["gradient_bytes_per_example"] == 4 * (784 * 10 + 10)
    assert entry["max_abs_difference_vs_loop"] <= 1e-5 * entry["max_abs_gradient"]
    assert entry["floor_ratio"] > 0 and entry["loop_ratio"] > 0


def test_reeval_measurement_compares_identical_selections():
    settings = BenchSettings(batch_size=10, num_candidates=6, repeats=2)
    entry = measure_reeval(settings)
    assert entry["identical_selection"] is True
    assert entry["num_attacks_compared"] == 2
    assert entry["max_relative_distance_difference"] < 1e-3


def test_nearest_runs_in_a_child_and_finds_the_target_example():
    entry = measure_nearest(BenchSettings(batch_size=10), "large", 40)
    assert entry["pool_size"] == 40
    assert entry["pool"] == "random MNIST-shaped pixels"
    assert entry["found_itself"] is True
    assert entry["self_distance"] < 1e-3 * entry["nearest_other_distance"]
    assert 0 < entry["rss_before_search_gb"] <= entry["peak_rss_gb"] < 2
    assert entry["peak_source"] == "VmHWM"
    assert entry["peak_rss_during_search_gb"] <= entry["peak_rss_gb"]


def test_verify_measurement_records_and_accepts_a_trace():
    settings = BenchSettings(batch_size=50, trace_steps=3, repeats=1)
    entry = measure_verify(settings, num_train=100)
    assert entry["num_steps"] == 4  # whole epochs of 2 steps
    assert entry["all_accepted"] is True
    assert entry["seconds_verify"] > entry["seconds_calibration"] > 0


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--only",
            "reeval",
            "-M",
            "5",
            "--batch-size",
            "10",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "reeval fast vs published (f=1, M=5, b=10, lenet)" in printed
    results = json.loads((out / "bench.json").read_text())
    assert [row["measurement"] for row in results["summary"]] == ["reeval"]
    assert results["reeval"]["identical_selection"] is True
    assert results["settings"]["only"] == ["reeval"]


def test_cli_refuses_a_bad_out_before_measuring(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("keep me")
    for out, message in (
        (existing, "cannot create output directory"),
        (Path("/proc"), "cannot write into output directory /proc"),
    ):
        code = main(["bench", "--only", "nearest", "--out", str(out)])
        assert code == 2
        captured = capsys.readouterr()
        assert "measuring" not in captured.out
        assert captured.err.count("\n") == 1
        assert message in captured.err
    assert existing.read_text() == "keep me"
    assert main(["bench", "--data-dir", "", "--out", str(tmp_path)]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_cli_rejects_unknown_measurements_in_one_line(tmp_path, capsys):
    code = main(["bench", "--only", "speed", "--out", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unknown measurement 'speed'" in error


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary_trace(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    environment = dict(os.environ, TMPDIR=str(scratch))
    command = [sys.executable, "-m", "forgelab", "bench", "--only", "verify"]
    command += ["--trace-steps", "10000", "--out", str(tmp_path / "out")]
    child = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # wait until the recording has started writing its trace
    deadline = time.monotonic() + 120
    while not list(scratch.glob("forgelab-bench-*/trace-0/checkpoints/*")):
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "forgelab: interrupted"
    assert list(scratch.glob("forgelab-bench-*")) == []
    assert not (tmp_path / "out" / "bench.json").exists()


def test_recorded_steps_round_up_to_whole_epochs():
    assert BenchSettings().recorded_steps() == 400
    assert BenchSettings(trace_steps=401).recorded_steps() == 440
    assert BenchSettings(trace_steps=10_000, batch_size=2).recorded_steps() == 10_000
    assert BenchSettings(trace_steps=1, batch_size=1000).recorded_steps() == 4
