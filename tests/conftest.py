"""Shared fixtures: small real datasets and short recorded traces."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from forgelab.data import load_dataset
from forgelab.optim import OptimizerConfig
from forgelab.replay import num_threads
from forgelab.training import record_trace

FUZZ_COUNTS = pytest.StashKey[dict[str, Counter]]()


def pytest_configure(config):
    config.stash[FUZZ_COUNTS] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print how many fuzz cases ran, and how they ended, even under -q."""
    counts = config.stash.get(FUZZ_COUNTS, {})
    if not counts:
        return
    total = Counter()
    for outcomes in counts.values():
        total.update(outcomes)
    terminalreporter.write_line(
        f"fuzz: {sum(total.values())} cases ran "
        f"({', '.join(f'{n} {k}' for k, n in sorted(total.items()))})"
    )
    for family, outcomes in sorted(counts.items()):
        terminalreporter.write_line(
            f"fuzz:   {family}: {sum(outcomes.values())} "
            f"({', '.join(f'{n} {k}' for k, n in sorted(outcomes.items()))})"
        )


@pytest.fixture
def fuzz_counts(request) -> dict[str, Counter]:
    """Outcome counts per fuzz family, printed in the terminal summary."""
    return request.config.stash[FUZZ_COUNTS]


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="session")
def mnist_small(mnist):
    return mnist.subset(400)


@pytest.fixture(scope="session")
def lenet_trace_master(tmp_path_factory, mnist_small) -> Path:
    """A 12-step LeNet trace on 400 real MNIST digits (batch 32)."""
    out = tmp_path_factory.mktemp("lenet") / "trace"
    return record_trace(out, mnist_small, "lenet", batch_size=32, num_epochs=1)


@pytest.fixture
def lenet_trace(lenet_trace_master, tmp_path) -> Path:
    """A private copy of the LeNet trace that a test may tamper with."""
    copy = tmp_path / "trace"
    shutil.copytree(lenet_trace_master, copy)
    return copy


@pytest.fixture(scope="session")
def logreg_trace_master(tmp_path_factory, digits) -> Path:
    """A 28-step softmax-regression trace on scikit-learn's digits (batch 50)."""
    out = tmp_path_factory.mktemp("logreg") / "trace"
    return record_trace(out, digits, "logreg", batch_size=50, num_epochs=1)


@pytest.fixture
def logreg_trace(logreg_trace_master, tmp_path) -> Path:
    copy = tmp_path / "trace"
    shutil.copytree(logreg_trace_master, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_trace_master(tmp_path_factory, digits) -> Path:
    """A 7-step softmax-regression trace on all of scikit-learn's digits.

    SGD with momentum 0.9 (so checkpoints carry optimizer state), batch 200, a
    checkpoint every 2 steps (0, 2, 4, 6 and the final 7). Recorded with one thread,
    so a one-thread replay reproduces it exactly. The command line can verify it,
    since it loads the same embedded digits.
    """
    out = tmp_path_factory.mktemp("tiny") / "trace"
    with num_threads(1):
        return record_trace(
            out,
            digits,
            "logreg",
            optimizer=OptimizerConfig(momentum=0.9),
            batch_size=200,
            num_epochs=1,
            checkpoint_interval=2,
        )


@pytest.fixture
def tiny_trace(tiny_trace_master, tmp_path) -> Path:
    """A private copy of the tiny trace that a test may tamper with."""
    copy = tmp_path / "trace"
    shutil.copytree(tiny_trace_master, copy)
    return copy
