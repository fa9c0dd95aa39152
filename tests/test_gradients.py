import numpy as np
import pytest
import torch
from torch import nn

from forgelab.errors import ConfigError
from forgelab.gradients import (
    batch_gradient,
    flatten_parameters,
    gradient_distances,
    iter_per_sample_gradients,
    layerwise_supported,
    nearest_rows,
    num_parameters,
    per_sample_gradients,
    per_sample_gradients_loop,
    select_engine,
    subset_distances,
)
from forgelab.models import ModelSpec, build_model


@pytest.mark.parametrize(
    ("name", "dataset", "num_classes"),
    [
        ("lenet", "mnist", 10),
        ("lenet5-tanh", "mnist", 10),
        ("mlp", "digits", 10),
        ("logreg", "digits", 10),
        ("fcn1", "breast-cancer", 2),
    ],
)
def test_engine_matches_loop_of_single_backward_passes(
    name, dataset, num_classes, request
):
    from forgelab.data import load_dataset

    data = load_dataset(dataset)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, data.domain.input_shape, num_classes))
    inputs, labels = data.x_train[:9], data.y_train[:9]
    fast = per_sample_gradients(model, model_loss(name), inputs, labels, chunk_size=4)
    slow = per_sample_gradients_loop(model, model_loss(name), inputs, labels)
    assert fast.shape == (9, num_parameters(model))
    scale = float(slow.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6 * scale)
    # the mean of the rows is the batch gradient
    mean = batch_gradient(model, model_loss(name), inputs, labels)
    torch.testing.assert_close(fast.mean(0), mean, rtol=1e-4, atol=1e-6 * scale)


def model_loss(name):
    return "bce" if name == "fcn1" else "cross_entropy"


def test_chunks_cover_every_example_once(digits):
    torch.manual_seed(0)
    model = build_model(ModelSpec("logreg", (1, 8, 8), 10))
    inputs, labels = digits.x_train[:10], digits.y_train[:10]
    starts, rows, losses = [], [], []
    for start, flat, values in iter_per_sample_gradients(
        model, "cross_entropy", inputs, labels, chunk_size=3, with_losses=True
    ):
        starts.append(start)
        rows.append(flat)
        losses.append(values)
    assert starts == [0, 3, 6, 9]
    whole = per_sample_gradients(model, "cross_entropy", inputs, labels)
    torch.testing.assert_close(torch.cat(rows), whole)
    expected = torch.nn.functional.cross_entropy(
        model(inputs), labels, reduction="none"
    )
    torch.testing.assert_close(torch.cat(losses), expected.detach())


def test_softmax_regression_gradient_in_closed_form():
    """Per-example gradient of softmax regression is (p - onehot(y)) x^T and p - y."""
    torch.manual_seed(3)
    model = build_model(ModelSpec("logreg", (4,), 3))
    x = torch.tensor([[0.0, 0.5, 1.0, 0.25], [1.0, 0.0, 0.0, 0.75]])
    y = torch.tensor([2, 0])
    grads = per_sample_gradients(model, "cross_entropy", x, y)
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    for i in range(2):
        p = torch.softmax(weight @ x[i] + bias, dim=0)
        residual = p - torch.nn.functional.one_hot(y[i], 3).float()
        expected = torch.cat([torch.outer(residual, x[i]).reshape(-1), residual])
        torch.testing.assert_close(grads[i], expected, rtol=1e-6, atol=1e-7)


def test_flatten_order_matches_gradients():
    torch.manual_seed(1)
    model = build_model(ModelSpec("mlp", (5,), 3))
    assert flatten_parameters(model).shape == (num_parameters(model),)
    first = next(model.parameters())
    with torch.no_grad():
        first.zero_()
    assert np.all(flatten_parameters(model)[: first.numel()].numpy() == 0)


# --- the layerwise engine against the loop reference, layer by layer ---------------


def _assert_matches_loop(model, inputs, labels, *, engine="auto", loss=None, **kw):
    loss = loss or "cross_entropy"
    fast = per_sample_gradients(model, loss, inputs, labels, engine=engine, **kw)
    slow = per_sample_gradients_loop(model, loss, inputs, labels)
    scale = float(slow.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6 * scale)
    return fast


@pytest.mark.parametrize("name", ["lenet", "lenet5-tanh", "mlp", "logreg"])
def test_registry_models_take_the_layerwise_engine(name):
    model = build_model(ModelSpec(name, (1, 28, 28), 10))
    assert layerwise_supported(model)
    assert select_engine(model) == "layerwise"
    assert select_engine(model, "vmap") == "vmap"


@pytest.mark.parametrize("engine", ["layerwise", "vmap"])
@pytest.mark.parametrize(
    ("name", "dataset", "num_classes"),
    [
        ("lenet", "mnist", 10),
        ("lenet5-tanh", "mnist", 10),
        ("mlp", "digits", 10),
        ("logreg", "digits", 10),
        ("fcn1", "breast-cancer", 2),
    ],
)
def test_both_engines_match_the_loop(name, dataset, num_classes, engine):
    from forgelab.data import load_dataset

    data = load_dataset(dataset)
    torch.manual_seed(1)
    model = build_model(ModelSpec(name, data.domain.input_shape, num_classes))
    _assert_matches_loop(
        model,
        data.x_train[:7],
        data.y_train[:7],
        engine=engine,
        loss=model_loss(name),
        chunk_size=3,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 9, 10, None])
def test_chunk_boundaries_do_not_change_the_rows(mnist, chunk_size):
    torch.manual_seed(2)
    model = build_model(ModelSpec("lenet", (1, 28, 28), 10))
    inputs, labels = mnist.x_train[:9], mnist.y_train[:9]
    whole = per_sample_gradients(model, "cross_entropy", inputs, labels)
    chunked = per_sample_gradients(
        model, "cross_entropy", inputs, labels, chunk_size=chunk_size
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    starts = [
        start
        for start, _, _ in iter_per_sample_gradients(
            model, "cross_entropy", inputs, labels, chunk_size=chunk_size
        )
    ]
    assert starts == list(range(0, 9, chunk_size or 9))


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(2, 4, 3, stride=2, padding=(1, 2)),
        nn.Conv2d(2, 4, 3, dilation=2, bias=False),
        nn.Conv2d(2, 4, (3, 2), groups=2, padding=1),
        nn.Conv2d(2, 6, 3, stride=(2, 1), groups=2, dilation=(1, 2)),
    ],
    ids=["stride-padding", "dilation-no-bias", "groups", "mixed"],
)
def test_convolution_variants_match_the_loop(layer):
    torch.manual_seed(3)
    model = nn.Sequential(
        layer, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.LazyLinear(5)
    )
    inputs = torch.randn(6, 2, 9, 8)
    model(inputs)  # materialise the lazy layer
    model = nn.Sequential(*model)  # the lazy layer is now an ordinary Linear
    assert select_engine(model) == "layerwise"
    _assert_matches_loop(model, inputs, torch.arange(6) % 5, engine="layerwise")


def test_conv1d_and_sequence_linear_match_the_loop():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5, 3),
    )
    _assert_matches_loop(
        model, torch.randn(5, 3, 10), torch.tensor([0, 1, 2, 0, 1]), engine="layerwise"
    )
    # a Linear applied at every position of a sequence sums outer products
    sequence = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    labels = torch.tensor([2, 1, 0, 0, 1])
    _assert_matches_loop(sequence, torch.randn(5, 3, 4), labels, engine="layerwise")


def test_float64_models_match_tightly():
    torch.manual_seed(5)
    model = build_model(ModelSpec("lenet", (1, 28, 28), 10)).double()
    inputs = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([3, 1, 4, 1])
    fast = per_sample_gradients(model, "cross_entropy", inputs, labels)
    slow = per_sample_gradients_loop(model, "cross_entropy", inputs.double(), labels)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + torch.relu(self.inner(x)))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(6, 4), nn.Softmax(dim=0), nn.Linear(4, 3)),
        _Residual(),
    ],
    ids=["layer-norm", "batch-norm", "softmax", "custom-module"],
)
def test_unsupported_layers_fall_back_to_vmap(model):
    torch.manual_seed(6)
    model.eval()
    assert not layerwise_supported(model)
    assert select_engine(model) == "vmap"
    with pytest.raises(ConfigError, match="layerwise"):
        select_engine(model, "layerwise")
    _assert_matches_loop(model, torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0]))


def test_embedding_models_fall_back_to_vmap():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 2))
    assert select_engine(model) == "vmap"
    tokens, labels = torch.randint(0, 11, (5, 3)), torch.arange(5) % 2
    fast = per_sample_gradients(model, "cross_entropy", tokens, labels)
    slow = per_sample_gradients_loop(model, "cross_entropy", tokens, labels)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)


def _shared_layer():
    # one Linear applied twice: its gradient sums two uses
    shared = nn.Linear(5, 5)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Flatten(), nn.Linear(5, 3))


def _tied_layers():
    # two Linears holding one weight, as in tied input and output embeddings
    first, last = nn.Linear(5, 5), nn.Linear(5, 5)
    last.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), last, nn.Linear(5, 3))


@pytest.mark.parametrize("build", [_shared_layer, _tied_layers])
def test_shared_parameters_go_through_vmap_and_stay_parameters(build):
    torch.manual_seed(8)
    model = build()
    weight = model[0].weight
    assert select_engine(model) == "vmap"
    inputs, labels = torch.randn(4, 5), torch.tensor([0, 2, 1, 0])
    _assert_matches_loop(model, inputs, labels)
    # the model is intact afterwards: same, still shared, parameter objects
    assert model[0].weight is weight and model[2].weight is weight
    assert isinstance(model[2].weight, nn.Parameter)


def test_in_place_activation_falls_back_to_vmap_at_run_time():
    torch.manual_seed(8)
    # the ReLU overwrites the Linear's output, which the engine needs
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    assert select_engine(model) == "layerwise"
    inputs, labels = torch.randn(4, 5), torch.tensor([0, 2, 1, 0])
    _assert_matches_loop(model, inputs, labels)
    with pytest.raises(ConfigError, match="cannot run"):
        per_sample_gradients(model, "cross_entropy", inputs, labels, engine="layerwise")


def test_flattening_the_batch_is_not_layerwise():
    model = nn.Sequential(nn.Flatten(0), nn.Linear(8, 2))
    assert not layerwise_supported(model)


def test_engine_leaves_grad_fields_alone(digits):
    torch.manual_seed(9)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    per_sample_gradients(model, "cross_entropy", digits.x_train[:5], digits.y_train[:5])
    assert all(p.grad is None for p in model.parameters())


def test_out_losses_and_reused_buffer(digits):
    torch.manual_seed(10)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    inputs, labels = digits.x_train[:10], digits.y_train[:10]
    out = torch.full((10, num_parameters(model)), float("nan"))
    losses = torch.empty(10)
    result = per_sample_gradients(
        model, "cross_entropy", inputs, labels, out=out, losses=losses, chunk_size=4
    )
    assert result is out
    _assert_matches_loop(model, inputs, labels, out=torch.empty_like(out))
    expected = nn.functional.cross_entropy(model(inputs), labels, reduction="none")
    torch.testing.assert_close(losses, expected.detach())
    # a reused buffer: every chunk lands in the same memory, with the right rows
    pointers, rows = set(), []
    for _, flat, _ in iter_per_sample_gradients(
        model, "cross_entropy", inputs, labels, chunk_size=4, reuse_buffer=True
    ):
        pointers.add(flat.data_ptr())
        rows.append(flat.clone())
    assert len(pointers) == 1
    torch.testing.assert_close(torch.cat(rows), out)


def test_bad_engine_arguments_are_config_errors(digits):
    model = build_model(ModelSpec("logreg", (1, 8, 8), 10))
    inputs, labels = digits.x_train[:4], digits.y_train[:4]
    with pytest.raises(ConfigError, match="unknown gradient engine"):
        per_sample_gradients(model, "cross_entropy", inputs, labels, engine="fast")
    with pytest.raises(ConfigError, match="chunk size"):
        per_sample_gradients(model, "cross_entropy", inputs, labels, chunk_size=0)
    with pytest.raises(ConfigError, match="labels"):
        per_sample_gradients(model, "cross_entropy", inputs, labels[:3])
    with pytest.raises(ConfigError, match="out has shape"):
        per_sample_gradients(
            model, "cross_entropy", inputs, labels, out=torch.empty(3, 650)
        )
    with pytest.raises(ConfigError, match="target gradient"):
        nearest_rows(torch.zeros(5), model, "cross_entropy", inputs, labels)
    with pytest.raises(ConfigError, match="k must be"):
        nearest_rows(torch.zeros(650), model, "cross_entropy", inputs, labels, k=0)


# --- distances and the nearest-gradient search -------------------------------------


def test_gradient_distances_and_nearest_rows_match_brute_force(mnist):
    torch.manual_seed(11)
    model = build_model(ModelSpec("lenet", (1, 28, 28), 10))
    inputs, labels = mnist.x_train[:23], mnist.y_train[:23]
    grads = per_sample_gradients(model, "cross_entropy", inputs, labels)
    target = grads[5] * 0.5 + grads[17] * 0.5
    expected = torch.linalg.vector_norm(grads.double() - target.double(), dim=1)
    distances = gradient_distances(
        target, model, "cross_entropy", inputs, labels, chunk_size=6
    )
    assert distances.dtype == torch.float64
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-9)
    indices, best = nearest_rows(
        target, model, "cross_entropy", inputs, labels, k=4, chunk_size=6
    )
    assert indices.tolist() == torch.argsort(expected)[:4].tolist()
    torch.testing.assert_close(best, expected[indices], rtol=1e-5, atol=1e-9)
    # an example's own gradient is nearest to itself
    own, gap = nearest_rows(grads[9], model, "cross_entropy", inputs, labels, k=1)
    assert own.tolist() == [9]
    assert float(gap[0]) < 1e-5 * float(grads[9].norm())


def test_nearest_rows_breaks_ties_towards_the_lower_index(digits):
    torch.manual_seed(12)
    model = build_model(ModelSpec("logreg", (1, 8, 8), 10))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    # examples 1 and 4 are the same digit with the same label; at zero weights the
    # logits are exactly 0 in any chunk, so their gradients are exactly equal
    inputs = digits.x_train[:6].clone()
    labels = digits.y_train[:6].clone()
    inputs[4], labels[4] = inputs[1], labels[1]
    target = per_sample_gradients(model, "cross_entropy", inputs[1:2], labels[1:2])[0]
    indices, distances = nearest_rows(
        target, model, "cross_entropy", inputs, labels, k=10, chunk_size=4
    )
    assert indices.tolist()[:2] == [1, 4]
    assert float(distances[0]) == float(distances[1])
    assert len(indices) == 6
    assert torch.all(distances[1:] >= distances[:-1])


def test_subset_distances_sum_the_rows_of_each_subset():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    subsets = torch.tensor([[0, 1], [2, 2], [1, 0], [0, 0]])
    target = torch.tensor([1.0, 1.0])
    distances = subset_distances(rows, subsets, target, block_size=3)
    # sums (1, 2), (6, 6), (1, 2), (2, 0) minus (1, 1)
    expected = torch.tensor([1.0, 50**0.5, 1.0, 2**0.5], dtype=torch.float64)
    torch.testing.assert_close(distances, expected)
    with pytest.raises(ConfigError, match="cannot rank"):
        subset_distances(rows, subsets[:, 0], target)


def test_several_targets_and_per_layer_distances(mnist):
    torch.manual_seed(13)
    model = build_model(ModelSpec("lenet", (1, 28, 28), 10))
    inputs, labels = mnist.x_train[:11], mnist.y_train[:11]
    grads = per_sample_gradients(model, "cross_entropy", inputs, labels).double()
    targets = torch.stack([grads[2], grads[7] - grads[3]]).float()
    difference = grads.unsqueeze(0) - targets.double().unsqueeze(1)
    expected = torch.linalg.vector_norm(difference, dim=2)
    distances = gradient_distances(
        targets, model, "cross_entropy", inputs, labels, chunk_size=4
    )
    assert distances.shape == (2, 11)
    torch.testing.assert_close(distances, expected, rtol=1e-5, atol=1e-6)
    indices, best = nearest_rows(
        targets, model, "cross_entropy", inputs, labels, k=3, chunk_size=4
    )
    assert indices.shape == best.shape == (2, 3)
    assert indices[0, 0] == 2
    for row in range(2):
        assert indices[row].tolist() == torch.argsort(expected[row])[:3].tolist()
    # per-layer distance: sum of the L2 norms of each layer's block
    slices = [slice(0, 156), slice(156, 2572), slice(2572, grads.shape[1])]
    per_layer = gradient_distances(
        targets[0], model, "cross_entropy", inputs, labels, slices=slices
    )
    manual = sum(torch.linalg.vector_norm(difference[0][:, s], dim=1) for s in slices)
    torch.testing.assert_close(per_layer, manual, rtol=1e-5, atol=1e-6)
    sums = subset_distances(
        grads.float(), torch.tensor([[2], [5]]), targets[0], slices=slices
    )
    torch.testing.assert_close(sums, manual[[2, 5]], rtol=1e-5, atol=1e-6)
