import itertools
import json

import numpy as np
import pytest
import torch

from forgelab.data import Domain
from forgelab.errors import ConfigError
from forgelab.models import ModelSpec, build_model
from forgelab.theory.float_order import reorder_gradients
from forgelab.theory.linear import (
    KINDS,
    LinearModel,
    construct_batch_forgery,
    distinct_distance,
    domain_violation,
    equivalent_example,
    fit_linear_model,
    grid_rescalings,
    one_hot,
    relative_error,
    single_example_forgeries,
)
from forgelab.theory.networks import analyse_first_layers
from forgelab.theory.search import (
    build_search_space,
    downsample,
    exact_search,
    relaxed_search,
)

VARIANTS = [(kind, bias) for kind in KINDS for bias in (False, True)]


def random_model(rng, kind, bias, num_classes=3, num_features=5):
    weight = rng.normal(size=(num_classes, num_features))
    return LinearModel(kind, weight, rng.normal(size=num_classes) if bias else None)


def autograd_gradients(model, inputs, labels):
    """Per-example gradients of the same losses, by torch autograd in float64."""
    weight = torch.tensor(model.weight, requires_grad=True)
    params = [weight]
    bias = None
    if model.has_bias:
        bias = torch.tensor(model.bias, requires_grad=True)
        params.append(bias)
    rows = []
    for x, y in zip(torch.tensor(inputs), torch.tensor(labels), strict=True):
        out = weight @ x + (bias if bias is not None else 0)
        if model.kind == "regression":
            loss = 0.5 * ((out - y) ** 2).sum()
        else:
            loss = -(y * torch.log_softmax(out, dim=0)).sum()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


@pytest.mark.parametrize(("kind", "bias"), VARIANTS)
def test_closed_form_gradients_match_autograd(kind, bias):
    rng = np.random.default_rng(7)
    model = random_model(rng, kind, bias)
    inputs = rng.uniform(size=(6, 5))
    labels = rng.normal(size=(6, 3))  # arbitrary real label vectors
    expected = autograd_gradients(model, inputs, labels)
    np.testing.assert_allclose(
        model.example_gradients(inputs, labels), expected, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        model.batch_gradient(inputs, labels), expected.mean(0), rtol=1e-12, atol=1e-14
    )
    # rank one: the weight part of each example's gradient is an outer product
    weight_part = expected[:, :15].reshape(6, 3, 5)
    singular = np.linalg.svd(weight_part, compute_uv=False)
    assert np.all(singular[:, 1] <= 1e-12 * singular[:, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_rescaled_example_without_bias_has_the_same_gradient(kind):
    rng = np.random.default_rng(11)
    model = random_model(rng, kind, bias=False)
    for _ in range(5):
        x = rng.uniform(size=5)
        y = one_hot([rng.integers(3)], 3)[0]
        scale = float(rng.choice([-1, 1]) * rng.uniform(0.2, 5))
        mass = 1.0 if kind == "regression" else float(rng.uniform(0.5, 3))
        new_x, new_y = equivalent_example(model, x, y, scale=scale, label_mass=mass)
        np.testing.assert_allclose(new_x, scale * x)
        assert new_y.sum() == pytest.approx(mass if kind == "softmax" else new_y.sum())
        error = relative_error(
            autograd_gradients(model, new_x[None], new_y[None])[0],
            autograd_gradients(model, x[None], y[None])[0],
        )
        assert error < 1e-12
        assert np.linalg.norm(new_x - x) > 0


def test_with_bias_the_input_is_pinned_and_only_the_label_mass_moves():
    rng = np.random.default_rng(3)
    model = random_model(rng, "softmax", bias=True)
    x, y = rng.uniform(size=5), one_hot([1], 3)[0]
    with pytest.raises(ConfigError, match="pinned"):
        equivalent_example(model, x, y, scale=2.0)
    new_x, new_y = equivalent_example(model, x, y, label_mass=2.5)
    probabilities = np.exp(model.logits(x[None])[0])
    probabilities /= probabilities.sum()
    np.testing.assert_allclose(new_x, x)
    np.testing.assert_allclose(new_y, y + 1.5 * probabilities, rtol=1e-12)
    error = relative_error(
        model.example_gradients(new_x[None], new_y[None])[0],
        model.example_gradients(x[None], y[None])[0],
    )
    assert error < 1e-12


def test_grid_rescalings_exact():
    # levels 2, 4, 0, 6 on 0..16: gcd 2, largest 6, so s = m/2 for m = 1..5, m != 2
    np.testing.assert_allclose(
        grid_rescalings(np.array([2, 4, 0, 6]), 17), [0.5, 1.5, 2.0, 2.5]
    )
    assert grid_rescalings(np.array([1, 16, 3]), 17).size == 0
    assert grid_rescalings(np.zeros(4, dtype=int), 17).size == 0


def test_single_example_forgeries_on_hand_built_data():
    domain = Domain((3,), 0.0, 16.0, 1.0, "one-hot", 2)
    raw = np.array([[0, 0, 0], [2, 4, 6], [1, 16, 3]], dtype=float)
    labels = np.array([0, 1, 0])
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(2, 3))
    no_bias = single_example_forgeries(
        LinearModel("softmax", weight), raw, labels, domain, np.full(3, 16.0)
    )
    # the zero image is forged by the zero image with the other label; the second
    # image has in-range rescalings s in {0.5, 1.5, 2, 2.5} but none of them gets a
    # one-hot label; the third has none
    assert no_bias.num_zero_inputs == 1
    assert no_bias.num_zero_residuals == 0
    assert no_bias.num_with_rescaling == 1
    assert no_bias.num_candidates == 4
    assert no_bias.num_forgeable == 1
    assert 0 < no_bias.label_gaps[1] < np.inf
    assert no_bias.label_gaps[2] == np.inf
    with_bias = single_example_forgeries(
        LinearModel("softmax", weight, np.zeros(2)),
        raw,
        labels,
        domain,
        np.full(3, 16.0),
    )
    assert with_bias.num_forgeable == 0
    assert with_bias.num_candidates == 0


@pytest.mark.parametrize(("kind", "bias"), VARIANTS)
@pytest.mark.parametrize("batch_size", [2, 5])
def test_batch_construction_matches_to_1e12_and_is_distinct(kind, bias, batch_size):
    rng = np.random.default_rng(batch_size)
    model = random_model(rng, kind, bias, num_features=8)
    inputs = rng.integers(0, 17, size=(batch_size, 8)) / 16.0
    labels = one_hot(rng.integers(0, 3, size=batch_size), 3)
    forged, forged_labels = construct_batch_forgery(model, inputs, labels)
    expected = autograd_gradients(model, inputs, labels).mean(0)
    got = autograd_gradients(model, forged, forged_labels).mean(0)
    assert relative_error(got, expected) < 1e-12
    assert distinct_distance(forged, forged_labels, inputs, labels) > 1e-3
    violation = domain_violation(
        forged,
        forged_labels,
        Domain((8,), 0.0, 16.0, 1.0, "one-hot", 3),
        np.zeros(8),
        np.full(8, 16.0),
    )
    # convex combinations stay in range; the labels leave the one-hot set
    assert violation.fraction_out_of_range == 0.0
    assert violation.fraction_labels_not_one_hot > 0


def test_batch_construction_needs_two_examples():
    model = LinearModel("softmax", np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="b >= 2"):
        construct_batch_forgery(model, np.zeros((1, 4)), one_hot([0], 3))


def test_domain_violation_exact_fractions():
    domain = Domain((2,), 0.0, 16.0, 1.0, "one-hot", 2)
    inputs = np.array([[0.5 / 16, 17 / 16], [1.0, 0.0]])
    labels = np.array([[0.5, 0.5], [0.0, 1.0]])
    violation = domain_violation(inputs, labels, domain, np.zeros(2), np.full(2, 16.0))
    assert violation.fraction_out_of_range == 0.25
    assert violation.fraction_off_grid == 0.25
    assert violation.fraction_labels_not_one_hot == 0.5
    assert violation.max_label_gap == pytest.approx(np.sqrt(0.5))


def test_downsample_exact():
    domain = Domain((1, 4, 4), 0.0, 16.0, 1.0, "one-hot", 10)
    image = np.array(
        [[0, 2, 16, 16], [2, 2, 16, 15], [1, 1, 3, 3], [1, 2, 3, 4]], dtype=float
    )
    small = downsample(image.reshape(1, -1), (4, 4), (2, 2), domain)
    # block means 1.5, 15.75, 1.25, 3.25 rounded to the grid
    np.testing.assert_array_equal(small, [[2, 16, 1, 3]])


def test_exact_search_finds_the_known_pair_forgery():
    # at zero weights the softmax-regression gradient of a batch depends only on
    # each class's summed inputs: {(1,0),(0,1)} and {(1,1),(0,0)} of one class tie
    domain = Domain((1, 1, 2), 0.0, 2.0, 1.0, "one-hot", 2)
    model = LinearModel("softmax", np.zeros((2, 2)), np.zeros(2))
    space = build_search_space(model, domain, 2.0)
    result = exact_search(
        model,
        space,
        np.array([[1, 0], [0, 1]]),
        np.array([0, 0]),
        tolerance=1e-9,
        lr=0.01,
    )
    assert result.num_examples == 18
    assert result.num_batches == 18 * 19 // 2 - 1
    assert result.found
    assert result.num_forgeries == 1
    assert sorted(result.forgery["levels"]) == [[0, 0], [1, 1]]
    assert result.forgery["labels"] == [0, 0]
    assert result.forgery["forging_error"] == 0.0
    assert "forgery" in result.certificate()


def test_exact_search_single_zero_image_without_bias():
    domain = Domain((1, 1, 2), 0.0, 3.0, 1.0, "one-hot", 3)
    rng = np.random.default_rng(0)
    model = LinearModel("softmax", rng.normal(size=(3, 2)))
    space = build_search_space(model, domain, 3.0)
    result = exact_search(
        model, space, np.array([[0, 0]]), np.array([2]), tolerance=1e-9, lr=0.01
    )
    # the zero image's gradient is zero for every label: two other labels tie
    assert result.found
    assert result.num_forgeries == 2
    assert result.forgery["levels"] == [[0, 0]]
    assert result.forgery["labels"][0] in (0, 1)


def test_pair_search_agrees_with_brute_force():
    """The k-d tree pair search finds exactly the pairs a full enumeration finds."""
    domain = Domain((1, 1, 2), 0.0, 3.0, 1.0, "one-hot", 3)
    rng = np.random.default_rng(4)
    model = LinearModel("softmax", rng.normal(size=(3, 2)), rng.normal(size=3))
    space = build_search_space(model, domain, 3.0)
    original = (np.array([[1, 2], [3, 0]]), np.array([0, 2]))
    lr = 0.01
    target = 2 * model.batch_gradient(
        space.inputs(original[0]), one_hot(original[1], 3)
    )
    skip = sorted(space.index_of(lv, lab) for lv, lab in zip(*original, strict=True))
    errors = {}
    for first, second in itertools.combinations_with_replacement(
        range(space.num_examples), 2
    ):
        if [first, second] == skip:
            continue
        gap = target - space.gradients[first] - space.gradients[second]
        errors[(first, second)] = lr * np.linalg.norm(gap) / 2
    # a tolerance halfway between the 10th and 11th closest pair: 10 forgeries
    ranked = sorted(errors.values())
    tolerance = (ranked[9] + ranked[10]) / 2
    result = exact_search(
        model, space, *original, tolerance=tolerance, lr=lr, radius_factors=(1, 3)
    )
    assert result.found
    assert result.num_forgeries == 10
    assert result.within["1"] == 10
    assert result.within["3"] == sum(1 for e in ranked if e <= 3 * tolerance)
    assert result.forgery["forging_error"] == pytest.approx(ranked[0])
    assert result.num_batches == len(errors)


def test_exact_search_on_a_small_real_instance(digits):
    raw = downsample(digits.raw_train, (8, 8), (1, 2), digits.domain)
    labels = digits.y_train.numpy()
    domain = Domain((1, 1, 2), 0.0, 16.0, 1.0, "one-hot", 10)
    model = fit_linear_model("softmax", raw / 16, labels, 10, bias=True)
    space = build_search_space(model, domain, 16.0)
    result = exact_search(
        model, space, raw[:2].astype(int), labels[:2], tolerance=1e-7, lr=0.01
    )
    assert result.num_examples == 17**2 * 10
    assert result.num_batches == 2890 * 2891 // 2 - 1
    assert not result.found
    assert result.forgery is None
    assert "exhausted" in result.certificate()
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["certificate"] == result.certificate()


def test_exact_search_rejects_large_batches():
    domain = Domain((1, 1, 2), 0.0, 1.0, 1.0, "one-hot", 2)
    model = LinearModel("softmax", np.zeros((2, 2)), np.zeros(2))
    space = build_search_space(model, domain, 1.0)
    with pytest.raises(ConfigError, match="b = 3"):
        exact_search(
            model, space, np.zeros((3, 2)), np.zeros(3), tolerance=1e-7, lr=0.01
        )


def test_relaxed_search_lowers_the_error_and_projects_onto_the_grid():
    torch.manual_seed(0)
    net = build_model(ModelSpec("logreg", (4,), 3)).double()
    domain = Domain((4,), 0.0, 4.0, 1.0, "one-hot", 3)
    rng = np.random.default_rng(0)
    raw = torch.tensor(rng.integers(0, 5, size=(4, 4)), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    result = relaxed_search(
        net,
        raw[:2] / 4,
        labels[:2],
        raw[2:] / 4,
        labels[2:],
        domain=domain,
        offset=np.zeros(4),
        scale=np.full(4, 4.0),
        tolerance=1e-7,
        lr=0.01,
        num_steps=60,
    )
    assert result.relaxed_error < result.initial_error
    assert result.projected_error > 0
    assert len(result.history) == 7
    assert 0 <= result.projected_violation["fraction_off_grid"] <= 1


def test_first_layer_gradient_is_rank_one_and_recovers_the_input(digits, mnist):
    torch.manual_seed(0)
    mlp = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    (summary,) = analyse_first_layers(
        mlp, "mlp", digits.x_train[:4], digits.y_train[:4]
    )
    assert summary.kind == "linear"
    assert summary.num_rank_one == 4
    assert summary.num_recovered == 4
    assert summary.max_recovery_error < 1e-12
    assert summary.num_labels_recovered == 4
    torch.manual_seed(0)
    lenet = build_model(ModelSpec("lenet", (1, 28, 28), 10))
    conv, dense = analyse_first_layers(
        lenet, "lenet", mnist.x_train[:2], mnist.y_train[:2]
    )
    assert conv.kind == "conv" and conv.num_rank_one == 0
    assert conv.median_numerical_rank > 1
    assert dense.layer == "7.weight" and dense.num_recovered == 2


def test_reordering_exact_sums_give_one_gradient():
    # zero weights and inputs in {0, 1} in float64: every partial sum is exact
    model = build_model(ModelSpec("logreg", (3,), 2)).double()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    inputs = torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    summary = reorder_gradients(
        model, "cross_entropy", inputs, torch.tensor([0, 1, 0]), lr=0.01
    )
    assert summary.exhaustive and summary.num_orders == 6
    assert summary.num_distinct == 1
    assert summary.max_distance == 0.0


def test_reordering_a_float32_batch(digits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    summary = reorder_gradients(
        model,
        "cross_entropy",
        digits.x_train[:40],
        digits.y_train[:40],
        lr=0.01,
        num_orders=6,
        seed=1,
    )
    assert not summary.exhaustive and summary.num_orders == 6
    assert 1 <= summary.num_distinct <= 6
    assert 0 <= summary.max_distance < 1e-7
    assert len(summary.distances) == 6 and summary.distances[0] == 0.0


def test_run_theory_writes_report_tables_and_figures(digits, tmp_path):
    from forgelab.theory.run import TheorySettings, run_theory

    settings = TheorySettings(
        batch_sizes=(2,),
        relaxed_batch_sizes=(2,),
        relaxed_steps=5,
        num_network_examples=3,
        num_reorder_batches=1,
        num_orders=3,
        calibration_steps=1,
        search_shape=(1, 1),
    )
    result = run_theory(digits.subset(300), tmp_path, settings)
    for name in (
        "report.md",
        "theory.json",
        "single_example_family.png",
        "batch_domain.png",
        "relaxed_search.png",
        "first_layer_spectrum.png",
        "float_order.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    payload = json.loads((tmp_path / "theory.json").read_text())
    assert [row["num_examples"] for row in payload["single"]] == [300] * 4
    assert all(row["relative_error"] < 1e-12 for row in payload["constructions"])
    assert [row["batch_size"] for row in payload["exact"]] == [1, 2, 1]
    assert payload["exact"][0]["num_examples"] == 17 * 10
    assert payload["calibration"]["tolerance"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "## 4. Float order" in report
    assert result.exact[1]["certificate"] in report


def test_theory_rejects_other_datasets(tmp_path):
    from forgelab.cli import main
    from forgelab.data import load_dataset
    from forgelab.theory.run import run_theory

    with pytest.raises(ConfigError, match="breast-cancer"):
        run_theory(load_dataset("breast-cancer"), tmp_path)
    assert main(["theory", "--dataset", "cifar", "--out", str(tmp_path)]) == 2
    assert main(["theory", "--tolerance", "-1", "--out", str(tmp_path)]) == 2
