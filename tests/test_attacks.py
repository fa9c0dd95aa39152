import math

import numpy as np
import pytest
import torch

from forgelab.attacks import AttackContext, attack_checkpoints, reeval, reeval_naive
from forgelab.errors import ConfigError
from forgelab.models import ModelSpec, build_model
from forgelab.trace import Trace


def _context(data, name="lenet", seed=0, lr=0.01):
    torch.manual_seed(seed)
    spec = ModelSpec(name, data.domain.input_shape, data.domain.num_classes)
    return AttackContext(build_model(spec), spec.loss, data.x_train, data.y_train, lr)


@pytest.mark.parametrize("num_replaced", [1, 3])
def test_fast_reeval_selects_what_the_published_algorithm_selects(
    mnist_small, num_replaced
):
    context = _context(mnist_small)
    rng = np.random.default_rng(7)
    batch = rng.choice(400, size=20, replace=False)
    pool = np.setdiff1d(np.arange(400), batch)
    slots = np.arange(num_replaced)
    fast = reeval(
        context, batch, slots, pool, np.random.default_rng(1), num_candidates=40
    )
    slow = reeval_naive(
        context, batch, slots, pool, np.random.default_rng(1), num_candidates=40
    )
    assert np.array_equal(fast.batch, slow.batch)
    assert np.array_equal(fast.replacement, slow.replacement)
    assert fast.distance == pytest.approx(slow.distance, rel=1e-3)
    assert fast.forging_error == pytest.approx(0.01 * fast.distance)
    assert fast.paper_error == pytest.approx(0.1 * fast.distance)
    assert not set(fast.replacement) & set(batch)
    assert np.array_equal(fast.batch[num_replaced:], batch[num_replaced:])


def test_reeval_distance_on_a_hand_computed_softmax_regression():
    """Exact numbers: a 2-feature, 2-class softmax regression with zero weights.

    At zero weights p = (1/2, 1/2), so an example's gradient is (p - onehot(y)) x^T
    for the weights and p - onehot(y) for the bias.
    """

    class Tiny:
        domain = type("D", (), {"input_shape": (2,), "num_classes": 2})()
        x_train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
        y_train = torch.tensor([0, 1, 0, 0])

    context = _context(Tiny, name="logreg", lr=0.1)
    with torch.no_grad():
        for p in context.model.parameters():
            p.zero_()
    batch = np.array([0, 1])
    # the only candidate is example 3: gradients differ by (x0 - x3) in the class rows
    forgery = reeval(
        context,
        batch,
        np.array([0]),
        np.array([3]),
        np.random.default_rng(0),
        num_candidates=5,
    )
    assert list(forgery.batch) == [3, 1]
    # g0 - g3 = [(-1/2, 0), (1/2, 0)] * ... : rows (p - e_0) = (-1/2, 1/2) times
    # x0 - x3 = (1/2, 0): entries -1/4 and 1/4, bias difference 0; norm sqrt(2)/4,
    # divided by the batch size 2
    assert forgery.distance == pytest.approx(math.sqrt(2) / 8, rel=1e-6)
    assert forgery.forging_error == pytest.approx(0.1 * math.sqrt(2) / 8, rel=1e-6)
    assert forgery.replaced_loss == pytest.approx(math.log(2), rel=1e-6)


def test_bad_attack_arguments_are_config_errors(mnist_small):
    context = _context(mnist_small)
    batch = np.arange(10)
    with pytest.raises(ConfigError, match="pool"):
        reeval(
            context,
            batch,
            np.array([0]),
            np.array([], dtype=int),
            np.random.default_rng(0),
        )
    with pytest.raises(ConfigError, match="cannot replace"):
        reeval(
            context, batch, np.arange(11), np.arange(10, 20), np.random.default_rng(0)
        )


def test_checkpoint_experiment(lenet_trace_master, mnist_small):
    trace = Trace(lenet_trace_master)
    records = attack_checkpoints(
        trace, mnist_small, every=5, num_runs=2, num_candidates=20, seed=3
    )
    assert [(r.step, r.run) for r in records] == [
        (0, 0),
        (0, 1),
        (5, 0),
        (5, 1),
        (10, 0),
        (10, 1),
    ]
    for record in records:
        assert record.forging_error == pytest.approx(0.01 * record.distance)
        assert record.paper_error == pytest.approx(0.1 * record.distance)
        assert record.replaced[0] not in record.replacement
        assert 0 < record.forging_error < record.update_norm
    again = attack_checkpoints(
        trace, mnist_small, every=5, num_runs=2, num_candidates=20, seed=3
    )
    assert [r.forging_error for r in again] == [r.forging_error for r in records]
