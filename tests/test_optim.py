"""Stateful optimizers: exact replay, tampering, and the forging error they define."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from forgelab.attacks import attack_checkpoints
from forgelab.cli import main
from forgelab.errors import ConfigError, TraceError
from forgelab.optim import (
    OptimizerConfig,
    build_optimizer,
    compute_update,
    config_from_torch,
    export_state,
)
from forgelab.replay import Replayer, verify_trace
from forgelab.trace import Trace
from forgelab.training import record_trace
from helpers import rewrite_checkpoint, shift_one_weight

MOMENTUM = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=1e-4)


@pytest.fixture(scope="session")
def stateful_traces(tmp_path_factory, digits):
    """Seven-step MLP traces on the digits (batch 200), with momentum and with Adam."""
    traces = {}
    for name, config in (("momentum", MOMENTUM), ("adam", ADAM)):
        out = tmp_path_factory.mktemp(name) / "trace"
        traces[name] = record_trace(
            out, digits, "mlp", optimizer=config, batch_size=200, num_epochs=1
        )
    return traces


@pytest.fixture
def adam_trace(stateful_traces, tmp_path):
    copy = tmp_path / "adam"
    shutil.copytree(stateful_traces["adam"], copy)
    return copy


@pytest.mark.parametrize("config", [MOMENTUM, ADAM], ids=["momentum", "adam"])
def test_update_rule_matches_torch_over_three_steps(config):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    optimizer = build_optimizer(config, model)
    for _ in range(3):
        gradients = {name: torch.randn_like(p) for name, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = export_state(optimizer, model)
        expected = {
            name: compute_update(
                config, before[name], gradients[name], state.get(name, {})
            )
            for name in before
        }
        for name, param in model.named_parameters():
            param.grad = gradients[name]
        optimizer.step()
        for name, param in model.named_parameters():
            actual = param.detach() - before[name]
            assert torch.allclose(actual, expected[name], rtol=1e-10, atol=1e-15)


def test_optimizer_config_from_torch():
    model = torch.nn.Linear(4, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.01)
    assert config_from_torch(sgd, model) == OptimizerConfig(
        name="sgd", lr=0.1, momentum=0.5, weight_decay=0.01
    )
    adam = torch.optim.Adam(model.parameters(), lr=0.002, betas=(0.8, 0.99), eps=1e-7)
    assert config_from_torch(adam, model) == OptimizerConfig(
        name="adam", lr=0.002, beta1=0.8, beta2=0.99, eps=1e-7
    )
    refused = [
        (torch.optim.AdamW(model.parameters()), "AdamW is not supported"),
        (torch.optim.RMSprop(model.parameters()), "RMSprop is not supported"),
        (
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
            "nesterov=True",
        ),
        (torch.optim.Adam(model.parameters(), amsgrad=True), "amsgrad=True"),
        (
            torch.optim.SGD(
                [{"params": [model.weight]}, {"params": [model.bias], "lr": 1}], lr=0.1
            ),
            "2 parameter groups",
        ),
        (torch.optim.SGD([model.weight], lr=0.1), "exactly the model's parameters"),
    ]
    for optimizer, message in refused:
        with pytest.raises(ConfigError, match=message):
            config_from_torch(optimizer, model)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_stateful_trace_verifies_exactly(stateful_traces, name, tmp_path, capsys):
    trace = Trace(stateful_traces[name])
    checkpoint = trace.load_checkpoint(3)
    adam_keys = {"step", "exp_avg", "exp_avg_sq"}
    expected_keys = {"momentum_buffer"} if name == "momentum" else adam_keys
    assert set(checkpoint.optimizer_state["1.weight"]) == expected_keys
    if name == "adam":
        assert float(checkpoint.optimizer_state["1.weight"]["step"]) == 3.0

    out = tmp_path / "report"
    assert main(["verify", str(stateful_traces[name]), "--out", str(out)]) == 0
    assert "ACCEPTED" in capsys.readouterr().out
    report = json.loads((out / "verify.json").read_text())
    assert [s["end_step"] for s in report["segments"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(s["l2"] == 0.0 and s["state_l2"] == 0.0 for s in report["segments"])
    assert all(s["update_norm"] > 0 for s in report["segments"])
    tolerances = report["calibration"]["state_tolerances"]
    assert set(tolerances) == expected_keys
    assert all(value > 0 for value in tolerances.values())
    assert all(set(s["state_errors"]) == expected_keys for s in report["segments"])


def test_shifted_weight_in_adam_trace_is_rejected_at_that_step(
    adam_trace, tmp_path, capsys
):
    rewrite_checkpoint(adam_trace, 3, shift_one_weight(1e-4))
    assert main(["verify", str(adam_trace), "--out", str(tmp_path / "out")]) == 1
    assert "REJECTED at step 3" in capsys.readouterr().out


def _scale_state(key: str, factor: float):
    def change(tensors):
        name = f"optim/1.weight/{key}"
        # the largest entry: some entries are exactly 0 (pixels that never light up)
        values = tensors[name].clone()
        values.view(-1)[int(values.abs().argmax())] *= factor
        tensors[name] = values

    return change


@pytest.mark.parametrize(
    ("trace_name", "key"),
    [("adam", "exp_avg"), ("adam", "exp_avg_sq"), ("momentum", "momentum_buffer")],
)
def test_tampered_optimizer_state_is_rejected_at_that_step(
    stateful_traces, digits, tmp_path, trace_name, key
):
    copy = tmp_path / "trace"
    shutil.copytree(stateful_traces[trace_name], copy)
    rewrite_checkpoint(copy, 3, _scale_state(key, 1.5))
    report = verify_trace(Trace(copy), digits)
    assert report.failed_steps == [3, 4]
    # step 3 still produces the logged weights; only its logged state is wrong
    tampered, after = report.segments[2], report.segments[3]
    assert tampered.l2 == 0.0
    assert tampered.state_errors[key] > report.calibration.state_tolerance(key)
    others = set(tampered.state_errors) - {key}
    assert all(tampered.state_errors[other] == 0.0 for other in others)
    # step 4 starts from the wrong state and lands on other weights
    assert after.l2 > report.calibration.tolerance


def test_tampered_adam_step_count_is_rejected(stateful_traces, digits, tmp_path):
    copy = tmp_path / "trace"
    shutil.copytree(stateful_traces["adam"], copy)
    rewrite_checkpoint(copy, 2, _scale_state("step", 10.0))
    # Adam's step count must equal the checkpoint's step: refused before any replay
    with pytest.raises(
        TraceError, match="step-00000002.safetensors: optim/.*/step is 20"
    ):
        verify_trace(Trace(copy), digits)


def test_adam_forging_error_is_the_one_step_distance_from_the_same_state(
    stateful_traces, digits
):
    trace = Trace(stateful_traces["adam"])
    records = attack_checkpoints(
        trace, digits, every=3, num_runs=2, num_candidates=10, seed=1
    )
    assert [(r.step, r.run) for r in records] == [
        (0, 0),
        (0, 1),
        (3, 0),
        (3, 1),
        (6, 0),
        (6, 1),
    ]
    replayer = Replayer(trace, digits)
    for record in records:
        # replay one Adam step from the checkpoint with the true and the forged batch
        start = trace.load_checkpoint(record.step)
        rng = np.random.default_rng([1, record.step, record.run])
        batch = rng.choice(digits.num_train, size=200, replace=False)
        assert list(batch[:1]) == record.replaced
        forged = batch.copy()
        forged[:1] = record.replacement
        true_weights, _ = replayer.replay(start, [batch], dtype=torch.float64)
        forged_weights, _ = replayer.replay(start, [forged], dtype=torch.float64)
        replayed = float(torch.linalg.vector_norm(true_weights - forged_weights))
        assert record.forging_error == pytest.approx(replayed, rel=1e-3)
        assert 0 < record.forging_error < record.update_norm
        # Adam's error is not eta times the gradient distance
        assert not math.isclose(
            record.forging_error, 1e-3 * record.distance, rel_tol=0.1
        )


def test_momentum_forging_error_is_eta_times_gradient_distance(stateful_traces, digits):
    trace = Trace(stateful_traces["momentum"])
    records = attack_checkpoints(
        trace, digits, every=3, num_runs=2, num_candidates=10, seed=1
    )
    assert [r.step for r in records] == [0, 0, 3, 3, 6, 6]
    for record in records:
        assert record.forging_error == pytest.approx(0.05 * record.distance, rel=1e-3)
