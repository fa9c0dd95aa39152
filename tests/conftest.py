"""Shared fixtures: small real datasets and short recorded traces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forgelab.data import load_dataset
from forgelab.training import record_trace


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
