"""Every attack against a slow reference, on tiny seeded cases."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import forgelab
import reference_attacks as ref
from forgelab.attacks import (
    ATTACKS,
    WHOLE_BATCH_ATTACKS,
    AttackContext,
    _improve_by_swaps,
    attack_defaults,
    baluta,
    forge_batch,
    greedy,
    kong,
    nearest,
    shuffled_batches,
    swap,
    thudi,
    thudi_batch,
    zhang_sn,
    zhang_sr,
)
from forgelab.errors import ConfigError
from forgelab.models import ModelSpec, build_model

PUBLISHED = {
    "thudi-batch": {"num_candidates": 400},
    "thudi": {"num_candidates": 400},
    "reeval": {"num_candidates": 300},
    "kong": {"num_candidates": 200, "pool_size": 1000, "distance": "paper"},
    "zhang-sr": {"num_candidates": 50},
    "zhang-sn": {},
    "baluta": {"num_candidates": 100, "norm": "l2"},
    "nearest": {"max_bytes": 64 * 2**20},
    "greedy": {"max_bytes": 64 * 2**20},
    "swap": {"max_passes": 20, "max_bytes": 64 * 2**20},
}


def _context(data, name="logreg", seed=0, lr=0.05):
    torch.manual_seed(seed)
    spec = ModelSpec(name, data.domain.input_shape, data.domain.num_classes)
    return AttackContext(build_model(spec), spec.loss, data.x_train, data.y_train, lr)


def _case(size=10, pool_size=60, seed=3):
    rng = np.random.default_rng(seed)
    chosen = rng.choice(400, size=size + pool_size, replace=False)
    return chosen[:size], np.sort(chosen[size:])


def test_published_defaults_are_the_attacks_defaults():
    assert list(ATTACKS) == list(PUBLISHED)
    for name, expected in PUBLISHED.items():
        assert attack_defaults(name) == expected, name
    assert {"thudi-batch", "kong", "baluta"} == WHOLE_BATCH_ATTACKS


def test_thudi_batch_picks_the_fixed_batch_with_the_closest_real_sgd_step(digits):
    context = _context(digits)
    batch, pool = _case()
    fast = thudi_batch(
        context, batch, np.arange(2), pool, np.random.default_rng(5), num_candidates=15
    )
    best, score, distance = ref.thudi_batch_slow(
        context, batch, pool, np.random.default_rng(5), 15
    )
    assert np.array_equal(fast.batch, best)
    assert np.array_equal(fast.slots, np.arange(10))
    # the fixed batches are consecutive runs of the pool
    start = int(np.flatnonzero(pool == fast.batch[0])[0])
    assert start % 10 == 0 and np.array_equal(fast.batch, pool[start : start + 10])
    assert fast.score == pytest.approx(score, rel=1e-5)
    assert fast.distance == pytest.approx(distance, rel=1e-6)
    # for SGD the weight distance is eta times the gradient distance
    assert fast.score == pytest.approx(fast.forging_error, rel=1e-3)


def test_thudi_replaces_each_example_by_its_closest_candidate(digits):
    context = _context(digits)
    batch, pool = _case()
    slots = np.array([0, 4])
    fast = thudi(
        context, batch, slots, pool, np.random.default_rng(2), num_candidates=20
    )
    slow = ref.thudi_slow(context, batch, slots, pool, np.random.default_rng(2), 20)
    assert np.array_equal(fast.replacement, slow)
    assert np.array_equal(fast.batch[slots], slow)
    kept = np.setdiff1d(np.arange(10), slots)
    assert np.array_equal(fast.batch[kept], batch[kept])
    exact = float(
        torch.linalg.vector_norm(
            ref.gradient(context, fast.batch) - ref.gradient(context, batch)
        )
    )
    assert fast.distance == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("distance", ["paper", "model"])
def test_kong_draws_a_fresh_pool_then_picks_the_closest_mini_batch(digits, distance):
    context = _context(digits)
    batch, pool = _case()
    fast = kong(
        context,
        batch,
        np.arange(1),
        pool,
        np.random.default_rng(9),
        num_candidates=12,
        pool_size=30,
        distance=distance,
    )
    best, score, exact = ref.kong_slow(
        context, batch, pool, np.random.default_rng(9), 12, 30, distance
    )
    assert np.array_equal(fast.batch, best)
    assert fast.score == pytest.approx(score, rel=1e-5)
    assert fast.distance == pytest.approx(exact, rel=1e-6)
    assert len(set(fast.batch)) == 10 and set(fast.batch) <= set(pool)
    if distance == "paper":
        assert fast.score == pytest.approx(fast.distance**2, rel=1e-9)


def test_zhang_sr_ranks_by_the_sum_of_per_layer_norms(digits):
    context = _context(digits, name="mlp")
    assert len(context.layer_slices()) == 3
    batch, pool = _case()
    slots = np.array([2, 7])
    fast = zhang_sr(
        context, batch, slots, pool, np.random.default_rng(4), num_candidates=15
    )
    best, score = ref.zhang_sr_slow(
        context, batch, slots, pool, np.random.default_rng(4), 15
    )
    assert np.array_equal(fast.replacement, best)
    assert fast.score == pytest.approx(score, rel=1e-4)
    # three layers with non-zero differences: the sum of norms exceeds the norm
    assert fast.score > 1.05 * fast.distance
    assert len(set(fast.replacement)) == 2


def test_zhang_sn_takes_the_most_similar_raw_input_of_the_same_class(mnist_small):
    context = _context(mnist_small, name="lenet")
    batch, pool = _case(size=8, pool_size=150)
    slots = np.array([1, 5, 6])
    fast = zhang_sn(context, batch, slots, pool)
    slow = ref.zhang_sn_slow(mnist_small, batch, slots, pool)
    assert np.array_equal(fast.replacement, slow)
    labels = mnist_small.y_train.numpy()
    assert np.array_equal(labels[fast.replacement], labels[batch[slots]])
    assert 0.5 < fast.score <= 1.0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_baluta_takes_batches_of_a_second_shuffled_loader(digits, norm):
    context = _context(digits)
    batch, pool = _case(pool_size=45)
    # 45 examples make 4 batches per pass, so 9 candidates need three passes
    fast = baluta(
        context,
        batch,
        np.arange(1),
        pool,
        np.random.default_rng(6),
        num_candidates=9,
        norm=norm,
    )
    best, score, distance = ref.baluta_slow(
        context, batch, pool, np.random.default_rng(6), 9, norm
    )
    assert np.array_equal(fast.batch, best)
    assert fast.score == pytest.approx(score, rel=1e-5)
    assert fast.distance == pytest.approx(distance, rel=1e-6)


def test_shuffled_batches_are_consecutive_passes_over_the_pool():
    pool = np.arange(100, 145)
    draws = shuffled_batches(pool, 9, 10, np.random.default_rng(0))
    assert draws.shape == (9, 10)
    for first in (0, 4):
        one_pass = draws[first : first + 4].reshape(-1)
        assert len(set(one_pass)) == 40 and set(one_pass) <= set(pool)
    assert not np.array_equal(draws[:4], draws[4:8])


@pytest.mark.parametrize(
    ("model", "slots", "pool_size", "max_bytes"),
    [
        ("lenet", [3], 16, 2**22),
        ("logreg", [0, 6], 40, 2**19),
        ("logreg", [0, 6], 40, 2**30),
    ],
)
def test_nearest_equals_brute_force(mnist_small, model, slots, pool_size, max_bytes):
    context = _context(mnist_small, name=model)
    batch, pool = _case(size=10, pool_size=pool_size)
    if max_bytes < 2**30:
        assert context.rows_per_chunk(max_bytes) < len(pool)  # several chunks
    slots = np.array(slots)
    fast = nearest(context, batch, slots, pool, max_bytes=max_bytes)
    assert np.array_equal(
        fast.replacement, ref.nearest_slow(context, batch, slots, pool)
    )
    assert fast.num_candidates == pool_size
    exact = float(
        torch.linalg.vector_norm(
            ref.gradient(context, fast.batch) - ref.gradient(context, batch)
        )
    )
    assert fast.distance == pytest.approx(exact, rel=1e-4)


def test_nearest_is_at_least_as_close_as_any_sampled_attack(digits):
    context = _context(digits)
    batch, pool = _case()
    best = nearest(context, batch, np.array([0]), pool)
    for name in ("reeval", "thudi", "zhang-sr"):
        sampled = forge_batch(
            name, context, batch, [0], pool, np.random.default_rng(1), num_candidates=30
        )
        assert best.distance <= sampled.distance * (1 + 1e-6)


def test_greedy_follows_the_residual_rule(digits):
    context = _context(digits)
    batch, pool = _case(pool_size=40)
    slots = np.array([1, 2, 8])
    fast = greedy(context, batch, slots, pool, max_bytes=2**14)
    assert np.array_equal(
        fast.replacement, ref.greedy_slow(context, batch, slots, pool)
    )
    assert len(set(fast.replacement)) == 3
    assert fast.score == pytest.approx(fast.distance, rel=1e-4)
    one = greedy(context, batch, slots[:1], pool)
    assert np.array_equal(
        one.replacement, nearest(context, batch, slots[:1], pool).replacement
    )


def test_greedy_is_never_better_than_the_exhaustive_optimum(digits):
    context = _context(digits)
    batch, pool = _case(pool_size=14)
    slots = np.array([0, 1])
    found = greedy(context, batch, slots, pool)
    optimum = ref.exhaustive_best(context, batch, slots, pool)
    assert optimum <= found.distance * (1 + 1e-5)
    assert found.distance <= nearest(context, batch, slots, pool).distance * 1.5


class Tiny:
    """Two features, two classes; softmax regression at zero weights.

    An example (x, y=0) has gradient v (x, 1) with v = (-1/2, 1/2) over the two class
    rows, so same-class gradients are as far apart as the inputs, times 1/sqrt(2).
    """

    domain = type("D", (), {"input_shape": (2,), "num_classes": 2})()
    x_train = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.9, 0.1], [0.5, 0.5]]
    )
    y_train = torch.tensor([0, 0, 0, 0, 0, 0])


def test_greedy_finds_an_exact_forgery_where_nearest_does_not():
    context = _context(Tiny, lr=0.1)
    with torch.no_grad():
        for p in context.model.parameters():
            p.zero_()
    batch, slots, pool = np.array([0, 1]), np.array([0, 1]), np.array([2, 3, 4, 5])
    # (1,0) + (0,1) = (1,1) + (0,0): the summed gradients agree exactly
    found = greedy(context, batch, slots, pool)
    assert list(found.replacement) == [2, 3]
    assert found.distance == 0.0 and found.forging_error == 0.0
    # each slot alone: (1,0) -> (0.9,0.1), (0,1) -> (0.5,0.5); residual (-0.4, 0.4, 0)
    # times |v| = 1/sqrt(2): norm 0.4, over b = 2
    alone = nearest(context, batch, slots, pool)
    assert list(alone.replacement) == [4, 5]
    assert alone.distance == pytest.approx(0.2, rel=1e-6)
    assert alone.forging_error == pytest.approx(0.02, rel=1e-6)
    assert alone.paper_error == pytest.approx(math.sqrt(0.1) * 0.2, rel=1e-6)


def test_swap_is_a_local_optimum_no_worse_than_greedy_or_nearest(digits):
    context = _context(digits)
    batch, pool = _case(pool_size=40)
    slots = np.array([1, 2, 8])
    found = swap(context, batch, slots, pool)
    assert len(set(found.replacement)) == 3
    assert not np.isin(found.replacement, batch).any()
    assert found.score == pytest.approx(found.distance, rel=1e-4)
    for start in (greedy, nearest):
        assert found.distance <= start(context, batch, slots, pool).distance
    # no single swap, checked with every example's own backward pass, does better
    assert ref.best_single_swap(context, batch, slots, pool, found.replacement) >= (
        found.distance * (1 - 1e-6)
    )
    # streamed in small chunks instead of cached, the same forgery
    streamed = swap(context, batch, slots, pool, max_bytes=2**14)
    assert np.array_equal(streamed.replacement, found.replacement)
    # no swaps at all: the better of the two starting points
    start = swap(context, batch, slots, pool, max_passes=0)
    assert start.distance == pytest.approx(
        min(
            greedy(context, batch, slots, pool).distance,
            nearest(context, batch, slots, pool).distance,
        ),
        rel=1e-6,
    )
    one = swap(context, batch, slots[:1], pool)
    assert np.array_equal(
        one.replacement, nearest(context, batch, slots[:1], pool).replacement
    )
    with pytest.raises(ConfigError, match="max_passes must be >= 0"):
        swap(context, batch, slots, pool, max_passes=-1)


def test_swap_is_never_better_than_the_exhaustive_optimum(digits):
    context = _context(digits)
    for seed in (3, 4, 5):
        batch, pool = _case(pool_size=14, seed=seed)
        slots = np.array([0, 1])
        found = swap(context, batch, slots, pool)
        optimum = ref.exhaustive_best(context, batch, slots, pool)
        assert optimum <= found.distance * (1 + 1e-5)
        assert found.distance <= greedy(context, batch, slots, pool).distance


def test_swap_repairs_a_greedy_first_choice():
    context = _context(Tiny, lr=0.1)
    with torch.no_grad():
        for p in context.model.parameters():
            p.zero_()
    # the removed inputs (1,0) and (0,1) sum to (1,1); the pool holds (1,1) itself,
    # which greedy takes first, leaving (0,0) to be matched by (0.9,0): a residual
    # of (-0.9, 0) in input space
    inputs = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.9, 0.0], [0.1, 1.0], [3.0, 3.0]]
    )
    context = AttackContext(
        context.model, context.loss, inputs, torch.zeros(6, dtype=torch.int64), 0.1
    )
    batch, slots, pool = np.array([0, 1]), np.array([0, 1]), np.array([2, 3, 4, 5])
    first = greedy(context, batch, slots, pool)
    assert list(first.replacement) == [2, 3]
    # |v| = 1/sqrt(2), over b = 2
    assert first.distance == pytest.approx(0.9 / math.sqrt(2) / 2, rel=1e-6)
    # (0.9,0) + (0.1,1) = (1,0) + (0,1): swapping (1,1) for (0.1,1) is exact
    found = swap(context, batch, slots, pool, max_passes=0)
    assert sorted(found.replacement) == [3, 4]
    assert found.distance == pytest.approx(0.0, abs=1e-7)
    # from greedy's start alone, one swap gets there too
    grads = context.per_sample(pool)[0].double()
    target = context.per_sample(batch)[0].double().sum(0)
    taken, residual, swaps = _improve_by_swaps(
        context,
        pool,
        [0, 1],
        target - grads[[0, 1]].sum(0),
        max_passes=20,
        max_bytes=2**20,
        cached=None,
    )
    assert sorted(pool[taken]) == [3, 4] and swaps == 1
    assert float(torch.linalg.vector_norm(residual)) == pytest.approx(0.0, abs=1e-7)


def test_attack_options_are_checked(digits):
    context = _context(digits)
    batch, pool = _case()
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="unknown attack 'nope'"):
        forge_batch("nope", context, batch, [0], pool, rng)
    with pytest.raises(ConfigError, match="does not take -M"):
        forge_batch("zhang-sn", context, batch, [0], pool, rng, num_candidates=5)
    with pytest.raises(ConfigError, match="unknown kong distance 'cosine'"):
        forge_batch("kong", context, batch, [0], pool, rng, distance="cosine")
    with pytest.raises(ConfigError, match="unknown baluta norm 'l1'"):
        forge_batch("baluta", context, batch, [0], pool, rng, norm="l1")
    with pytest.raises(ConfigError, match="fewer than one batch"):
        forge_batch("thudi-batch", context, batch, [0], pool[:5], rng)
    with pytest.raises(ConfigError, match="no example of class"):
        labels = digits.y_train.numpy()
        other = pool[labels[pool] != labels[batch[0]]]
        forge_batch("zhang-sn", context, batch, [0], other, rng)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, torch
    from forgelab.attacks import AttackContext, nearest
    from forgelab.models import ModelSpec, build_model

    torch.manual_seed(0)
    inputs = torch.rand(60_100, 1, 28, 28)
    labels = torch.randint(0, 10, (60_100,))
    spec = ModelSpec("logreg", (1, 28, 28), 10)
    context = AttackContext(build_model(spec), spec.loss, inputs, labels, 0.01)
    batch, pool = np.arange(100), np.arange(100, 60_100)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forgery = nearest(context, batch, np.array([0]), pool, max_bytes=64 * 2**20)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(forgery.num_candidates, int(forgery.replacement[0]), (after - before) // 1024)
    """
)


def test_nearest_scans_a_60000_example_pool_in_bounded_memory(tmp_path):
    """All 60,000 gradients would take 1.9 GB (7,850 weights each, float32)."""
    script = tmp_path / "scan.py"
    script.write_text(MEMORY_SCRIPT)
    source = str(Path(forgelab.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHONPATH": source},
    )
    num_candidates, choice, growth_mb = map(int, result.stdout.split())
    assert num_candidates == 60_000
    assert 100 <= choice < 60_100
    assert growth_mb < 600, f"peak RSS grew by {growth_mb} MB"
