"""Per-sample gradients, flattened, in memory-bounded chunks (torch.func).

Every forging attack and most of the theory compare gradients of single examples, so
this is the hot path. Gradients are flattened in the order of
``model.named_parameters()``; :func:`flatten_parameters` uses the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from forgelab.models import compute_loss

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Default memory budget for one chunk of flattened per-sample gradients."""


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of a model as one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def chunk_size_for(model: nn.Module, max_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Largest number of examples whose flattened gradients fit in ``max_bytes``."""
    param = next(model.parameters())
    per_example = num_parameters(model) * param.element_size()
    return max(1, max_bytes // (3 * per_example))


def batch_gradient(
    model: nn.Module, loss: str, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Flattened gradient of the mean loss of a batch (one backward pass).

    Args:
        model: The model at the weights of interest; its ``.grad`` fields are unchanged.
        loss: Loss name, see :func:`forgelab.models.compute_loss`.
        inputs: Batch inputs.
        labels: Batch labels.

    Returns:
        The gradient as a vector of length ``num_parameters(model)``.
    """
    params = list(model.parameters())
    value = compute_loss(loss, model(inputs), labels)
    grads = torch.autograd.grad(value, params)
    return torch.cat([g.reshape(-1) for g in grads])


def iter_per_sample_gradients(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    with_losses: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield per-sample gradients chunk by chunk.

    Each example's gradient is that of its own loss (a batch of one), so the gradient of
    the batch mean is the mean of the rows.

    Args:
        model: The model at the weights of interest.
        loss: Loss name.
        inputs: Inputs, shape ``(n, *input_shape)``.
        labels: Labels, shape ``(n,)``.
        chunk_size: Examples per chunk; by default as many as fit in
            :data:`DEFAULT_CHUNK_BYTES`.
        with_losses: Also yield each example's loss.

    Yields:
        ``(start, gradients, losses)``: the index of the chunk's first example, its
        gradients of shape ``(chunk, num_parameters)``, and its losses (or None).
    """
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        value = compute_loss(loss, logits, y.unsqueeze(0))
        return value, value.detach()

    per_example = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0))
    step = chunk_size or chunk_size_for(model)
    for start in range(0, inputs.shape[0], step):
        grads, values = per_example(
            params, inputs[start : start + step], labels[start : start + step]
        )
        count = values.shape[0]
        flat = torch.cat([grads[name].reshape(count, -1) for name in names], dim=1)
        yield start, flat, (values if with_losses else None)


def per_sample_gradients(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """All per-sample gradients as one ``(n, num_parameters)`` matrix.

    Use :func:`iter_per_sample_gradients` when ``n * num_parameters`` does not fit in
    memory.
    """
    chunks = [
        flat
        for _, flat, _ in iter_per_sample_gradients(
            model, loss, inputs, labels, chunk_size=chunk_size
        )
    ]
    if not chunks:
        return torch.zeros(0, num_parameters(model))
    return torch.cat(chunks)


def per_sample_gradients_loop(
    model: nn.Module, loss: str, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Slow reference: one backward pass per example.

    Used by the tests and the benchmark to check and time :func:`per_sample_gradients`.
    """
    rows = [
        batch_gradient(model, loss, inputs[i : i + 1], labels[i : i + 1])
        for i in range(inputs.shape[0])
    ]
    return torch.stack(rows) if rows else torch.zeros(0, num_parameters(model))
