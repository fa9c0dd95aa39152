"""The models of the four setups, and models built from entry points."""

import sys

import pytest
import torch
from torch import nn

from forgelab.errors import ConfigError
from forgelab.gradients import (
    batch_gradient,
    per_sample_gradients,
    per_sample_gradients_loop,
)
from forgelab.models import (
    ENTRY_POINT_MODEL,
    ModelSpec,
    TransformerClassifier,
    build_model,
    compute_loss,
    example_losses,
    load_entry_point,
)


def test_vgg_mini_has_the_unforgeability_papers_layers():
    model = build_model(ModelSpec("vgg-mini", (3, 32, 32), 10))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert sum(isinstance(m, nn.ELU) for m in model.modules()) == 10
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [
        (8192, 128),
        (128, 64),
        (64, 10),
    ]
    # no BatchNorm, hence no buffers: the weights alone determine the next step
    assert list(model.buffers()) == []
    # convolutions 3*64*9+64 + 64*64*9+64 + ... + 512*512*9+512 = 4,685,376; dense
    # 8192*128+128 + 128*64+64 + 64*10+10 = 1,057,610
    assert sum(p.numel() for p in model.parameters()) == 4_685_376 + 1_057_610
    assert tuple(model(torch.zeros(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(ConfigError, match="divisible by 8"):
        build_model(ModelSpec("vgg-mini", (1, 28, 28), 10))


def test_transformer_size_and_token_inputs():
    spec = ModelSpec("transformer", (200,), 2, vocab_size=30)
    model = build_model(spec)
    assert isinstance(model, TransformerClassifier)
    # token 30x32, positions 200x32, q/k/v 3x(32x64+64), output 64x32+32, two layer
    # norms 2x64, feed-forward 32x32+32 and back, hidden 32x20+20, output 20x2+2
    expected = 960 + 6400 + 6336 + 2080 + 128 + 2 * 1056 + 660 + 42
    assert sum(p.numel() for p in model.parameters()) == expected == 18_718
    assert list(model.buffers()) == []
    tokens = torch.randint(0, 30, (3, 200))
    assert tuple(model(tokens).shape) == (3, 2)
    with pytest.raises(ConfigError, match="reads token ids"):
        build_model(ModelSpec("transformer", (200,), 2))
    with pytest.raises(ConfigError, match="holds token ids"):
        build_model(ModelSpec("logreg", (200,), 2, vocab_size=30))


def test_transformer_per_sample_gradients_over_token_ids():
    torch.manual_seed(0)
    model = build_model(ModelSpec("transformer", (200,), 2, vocab_size=30))
    tokens = torch.randint(0, 30, (5, 200))
    labels = torch.tensor([0, 1, 1, 0, 1])
    fast = per_sample_gradients(model, "cross_entropy", tokens, labels, chunk_size=2)
    slow = per_sample_gradients_loop(model, "cross_entropy", tokens, labels)
    assert fast.shape == (5, 18_718)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-4)
    # rows of tokens that no example uses get no gradient
    unused = sorted(set(range(30)) - set(tokens.unique().tolist()))
    embedding = fast[:, : 30 * 32].reshape(5, 30, 32)
    assert all(embedding[:, token].abs().max() == 0 for token in unused)
    mean = batch_gradient(model, "cross_entropy", tokens, labels)
    assert torch.allclose(fast.mean(0), mean, atol=1e-6, rtol=1e-4)


def _write_module(directory, name, body):
    (directory / f"{name}.py").write_text(body)


def test_entry_point_models_are_imported_only_when_trusted(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    _write_module(
        tmp_path,
        "entry_point_models",
        "import pathlib\n"
        "from torch import nn\n"
        f"pathlib.Path({str(marker)!r}).write_text('yes')\n"
        "def make():\n"
        "    return nn.Linear(4, 3)\n"
        "def not_a_model():\n"
        "    return 42\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "entry_point_models", raising=False)
    spec = ModelSpec(
        ENTRY_POINT_MODEL,
        (4,),
        3,
        entry_point="entry_point_models:make",
        declared_loss="cross_entropy",
    )
    with pytest.raises(
        ConfigError, match="pass --allow-import entry_point_models:make"
    ):
        build_model(spec)
    with pytest.raises(ConfigError, match="the verifier allows only 'other:make'"):
        build_model(spec, trusted_entry_point="other:make")
    assert not marker.exists()
    model = build_model(spec, trusted_entry_point="entry_point_models:make")
    assert marker.exists() and isinstance(model, nn.Linear)
    assert spec.describe()["entry_point"] == "entry_point_models:make"
    assert spec.loss == "cross_entropy"

    other = ModelSpec(
        ENTRY_POINT_MODEL,
        (4,),
        3,
        entry_point="entry_point_models:not_a_model",
        declared_loss="bce",
    )
    with pytest.raises(ConfigError, match="returned int, not a torch.nn.Module"):
        build_model(other, trusted_entry_point="entry_point_models:not_a_model")
    with pytest.raises(ConfigError, match="No module named 'nowhere_to_be_found'"):
        load_entry_point("nowhere_to_be_found:make")
    with pytest.raises(ConfigError, match="has no callable 'missing'"):
        load_entry_point("entry_point_models:missing")
    with pytest.raises(ConfigError, match="package.module:factory"):
        ModelSpec(ENTRY_POINT_MODEL, (4,), 3, entry_point="../x:y", declared_loss="bce")
    with pytest.raises(ConfigError, match="built in"):
        ModelSpec("lenet", (1, 28, 28), 10, entry_point="a:b")
    # a factory that exits would otherwise end the verifier with exit code 0
    exiting = ModelSpec(
        ENTRY_POINT_MODEL, (4,), 3, entry_point="builtins:exit", declared_loss="bce"
    )
    with pytest.raises(ConfigError, match="failed \\(SystemExit"):
        build_model(exiting, trusted_entry_point="builtins:exit")


@pytest.mark.parametrize("loss, classes", [("cross_entropy", 10), ("bce", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_example_losses_equal_batches_of_one_bit_for_bit(loss, classes, dtype):
    generator = torch.Generator().manual_seed(7)
    logits = (
        5 * torch.randn(64, classes, generator=generator, dtype=dtype)
    ).requires_grad_()
    labels = torch.randint(0, max(classes, 2), (64,), generator=generator)
    losses = example_losses(loss, logits, labels)
    (fast,) = torch.autograd.grad(losses.sum(), logits)
    for i in range(64):
        single = compute_loss(loss, logits[i : i + 1], labels[i : i + 1])
        (slow,) = torch.autograd.grad(single, logits)
        assert torch.equal(losses[i], single)
        if loss == "cross_entropy":
            assert torch.equal(fast[i], slow[i])
        else:
            # the backward pass's vectorised sigmoid may round the last bit otherwise
            eps = torch.finfo(dtype).eps
            assert torch.allclose(fast[i], slow[i], rtol=2 * eps, atol=eps)
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        example_losses("mse", logits, labels)
