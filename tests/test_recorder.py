"""Recording a trace from a hand-written training loop, and verifying it."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forgelab.cli import main
from forgelab.errors import ConfigError
from forgelab.recorder import TraceRecorder
from forgelab.replay import verify_trace
from forgelab.trace import Trace
from helpers import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def readme_example(name: str) -> str:
    """The fenced code block that follows ``<!-- example: name -->`` in README.md."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        rf"<!-- example: {re.escape(name)} -->\n```\w+\n(.*?)\n```", readme, re.S
    )
    assert match, f"README.md has no example block {name!r}"
    return match.group(1) + "\n"


def test_readme_example_records_and_verifies(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_loop.py").write_text(readme_example("my_loop.py"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    outputs = []
    for line in readme_example("commands").splitlines():
        command = shlex.split(line)
        assert command[0] == "python"
        done = subprocess.run(
            [sys.executable, *command[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "recorded 40 steps into my-trace" in outputs[0]
    assert "ACCEPTED" in outputs[1]
    report = json.loads(
        (tmp_path / "forgelab-out" / "verify-my-trace" / "verify.json").read_text()
    )
    assert [s["end_step"] for s in report["segments"]] == list(range(5, 41, 5))
    assert all(s["l2"] == 0.0 and s["state_l2"] == 0.0 for s in report["segments"])
    manifest = read_manifest(tmp_path / "my-trace")
    assert manifest["model"]["entry_point"] == "my_loop:make_model"
    assert manifest["optimizer"]["momentum"] == 0.9
    assert manifest["dataset"]["name"] == "digits" and manifest["batch_size"] == 32

    # without the opt-in the verifier imports nothing and says why
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_loop", raising=False)
    assert main(["verify", "my-trace"]) == 2
    err = capsys.readouterr().err
    assert "pass --allow-import my_loop:make_model" in err
    assert len(err.strip().splitlines()) == 1
    assert "my_loop" not in sys.modules

    # a trace that names other code is refused even with the flag
    manifest["model"]["entry_point"] = "os:system"
    write_manifest(tmp_path / "my-trace", manifest)
    assert main(["verify", "my-trace", "--allow-import", "my_loop:make_model"]) == 2
    err = capsys.readouterr().err
    assert "names model entry point 'os:system'" in err
    assert "allows only 'my_loop:make_model'" in err


ADAM_MODULE = """
from torch import nn


def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def make_wider_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
"""


@pytest.fixture
def own_models(tmp_path, monkeypatch):
    (tmp_path / "own_models.py").write_text(ADAM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "own_models", raising=False)
    import own_models

    return own_models


def _train(recorder, model, optimizer, data, num_steps, batch_size=25):
    for step in range(num_steps):
        batch = np.arange(step * batch_size, (step + 1) * batch_size) % data.num_train
        loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorder.record_step(torch.from_numpy(batch))


def test_adam_loop_with_checkpoints_every_three_steps(tmp_path, digits, own_models):
    torch.manual_seed(3)
    model = own_models.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    recorder = TraceRecorder(
        tmp_path / "trace",
        model,
        optimizer,
        digits,
        entry_point="own_models:make_model",
        checkpoint_every=3,
        seed=3,
    )
    _train(recorder, model, optimizer, digits, 10)
    recorder.finish()
    trace = Trace(tmp_path / "trace", allow_import="own_models:make_model")
    assert [c.step for c in trace.checkpoints] == [0, 3, 6, 9, 10]
    assert trace.optimizer.name == "adam" and trace.optimizer.lr == 0.01
    assert trace.manifest["seed"] == 3 and trace.complete
    last = trace.load_checkpoint(4)
    assert torch.equal(last.params["1.weight"], model[1].weight.detach())
    assert float(last.optimizer_state["3.bias"]["step"]) == 10.0
    report = verify_trace(trace, digits)
    assert report.accepted
    assert [s.end_step for s in report.segments] == [3, 6, 9, 10]
    assert all(s.l2 == 0.0 and s.state_l2 == 0.0 for s in report.segments)
    with pytest.raises(ConfigError, match="recording is finished"):
        recorder.record_step(np.arange(25))


def test_recorder_refuses_what_a_replay_could_not_reproduce(
    tmp_path, digits, own_models
):
    model = own_models.make_model()

    def recorder(out, optimizer, **options):
        options.setdefault("entry_point", "own_models:make_model")
        return TraceRecorder(tmp_path / out, model, optimizer, digits, **options)

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="AdamW is not supported"):
        recorder("a", torch.optim.AdamW(model.parameters()))
    with pytest.raises(ConfigError, match="parameter '1.bias' differs"):
        recorder("b", sgd, entry_point="own_models:make_wider_model")
    with pytest.raises(ConfigError, match="No module named 'not_there'"):
        recorder("c", sgd, entry_point="not_there:make_model")

    normed = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    with pytest.raises(ConfigError, match="buffers"):
        TraceRecorder(
            tmp_path / "d",
            normed,
            torch.optim.SGD(normed.parameters(), lr=0.1),
            digits,
            entry_point="own_models:make_model",
        )

    # a learning-rate schedule changes the hyperparameters between steps
    scheduled = recorder("e", sgd)
    _train(scheduled, model, sgd, digits, 2)
    sgd.param_groups[0]["lr"] = 0.05
    with pytest.raises(ConfigError, match=r"changed at step 3 \(lr 0.1 -> 0.05\)"):
        scheduled.record_step(np.arange(25))

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sized = recorder("f", sgd)
    _train(sized, model, sgd, digits, 1)
    with pytest.raises(ConfigError, match="step 2 has 7 examples, the first had 25"):
        sized.record_step(np.arange(7))
    with pytest.raises(ConfigError, match=r"out of range \[0, 1437\)"):
        sized.record_step(np.arange(1430, 1455))
    with pytest.raises(ConfigError, match="already holds a trace"):
        recorder("f", sgd)
