import numpy as np
import pytest
import torch

from forgelab.gradients import (
    batch_gradient,
    flatten_parameters,
    iter_per_sample_gradients,
    num_parameters,
    per_sample_gradients,
    per_sample_gradients_loop,
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
