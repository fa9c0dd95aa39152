"""Per-sample gradients, flattened, in memory-bounded chunks.

Every forging attack and most of the theory compare gradients of single examples, so
this is the hot path. Gradients are flattened in the order of
``model.named_parameters()``; :func:`flatten_parameters` uses the same order.

Two engines compute the same per-sample gradients:

- ``"layerwise"``: one batched forward and one backward pass per chunk. For a dense
  or convolutional layer, the gradient of one example's loss with respect to the
  weights is a product of the layer's input and the gradient at the layer's output
  for that example alone, both of which the batched passes already hold (Goodfellow
  2015, "Efficient per-example gradient computations", arXiv 1510.01799). Dense
  layers give an outer product, convolutions the same product over the unfolded
  (im2col) input. Only models built from layers known to keep examples independent
  qualify; see :func:`layerwise_supported`.
- ``"vmap"``: ``torch.func.vmap`` of ``torch.func.grad`` over batches of one. It
  handles any model (attention, embeddings, normalisation layers, custom modules)
  but is slower: on the project's 2-core machines about 1.2 times for LeNet and 3 to
  4 times for the MLP (``forgelab bench``).

``engine="auto"`` (the default everywhere) picks the layerwise engine when the model
qualifies and falls back to vmap otherwise. Both agree with a loop of single-example
backward passes (:func:`per_sample_gradients_loop`) up to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from forgelab.errors import ConfigError
from forgelab.models import compute_loss, example_losses

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Default memory budget for one chunk of flattened per-sample gradients."""

STREAM_CHUNK_BYTES = 16 * 2**20
"""Default size of the one buffer that streamed chunks of gradients are written to."""

ENGINES = ("auto", "layerwise", "vmap")
"""Names accepted by the ``engine`` arguments of this module."""

_WEIGHTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers whose per-sample gradients the layerwise engine computes itself."""

_PER_EXAMPLE_LAYERS = (
    nn.Sequential,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
"""Parameter-free layers that act on each example of a batch separately.

Types are matched exactly: a subclass may override ``forward`` and mix examples (or
use its weights differently), so it takes the vmap engine."""


class _Unsupported(Exception):
    """The layerwise engine cannot handle this model; the reason is the message."""


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


def _unsupported_reason(model: nn.Module) -> str | None:
    """Why the layerwise engine cannot handle ``model``, or None if it can."""
    for name, module in model.named_modules():
        label = name or "the model"
        if type(module) in _WEIGHTED_LAYERS:
            if isinstance(module, nn.Conv1d | nn.Conv2d) and (
                isinstance(module.padding, str) or module.padding_mode != "zeros"
            ):
                return f"{label}: only numeric zero padding is supported"
            continue
        if type(module) not in _PER_EXAMPLE_LAYERS:
            return f"{label}: layer type {type(module).__name__} is not supported"
        if isinstance(module, nn.Flatten) and module.start_dim < 1:
            return f"{label}: only flattening that starts after the batch dimension"
        if isinstance(module, nn.Unflatten) and module.dim < 1:
            return f"{label}: only unflattening after the batch dimension"
    parameters = list(model.parameters())
    if not parameters:
        return "the model has no parameters"
    if len(list(model.named_parameters(remove_duplicate=False))) != len(parameters):
        return "a parameter is shared by several layers or uses"
    if not all(p.requires_grad for p in parameters):
        return "some parameters do not require gradients"
    return None


def layerwise_supported(model: nn.Module) -> bool:
    """Whether the layerwise engine can compute the per-sample gradients of ``model``.

    It can when the model is an ``nn.Sequential`` tree whose weighted layers are
    ``Linear``, ``Conv1d`` or ``Conv2d`` (numeric zero padding, any stride, dilation
    or groups) and whose other layers are element-wise activations, pooling,
    flattening or dropout: layers that never mix the examples of a batch. Each
    weighted layer must run exactly once per forward pass; that is checked when the
    engine runs.
    """
    return _unsupported_reason(model) is None


def select_engine(model: nn.Module, engine: str = "auto") -> str:
    """Resolve an engine name for a model.

    Args:
        model: The model.
        engine: ``"auto"``, ``"layerwise"`` or ``"vmap"``.

    Returns:
        ``"layerwise"`` or ``"vmap"``; ``"auto"`` picks layerwise when
        :func:`layerwise_supported` holds.

    Raises:
        ConfigError: If the name is unknown, or layerwise is asked for a model it
            cannot handle.
    """
    if engine not in ENGINES:
        raise ConfigError(
            f"unknown gradient engine {engine!r}; choose one of {', '.join(ENGINES)}"
        )
    if engine == "vmap":
        return engine
    reason = _unsupported_reason(model)
    if reason is None:
        return "layerwise"
    if engine == "layerwise":
        raise ConfigError(f"the layerwise gradient engine cannot run: {reason}")
    logger.debug("per-sample gradients through vmap: %s", reason)
    return "vmap"


@dataclass
class _Slot:
    """Where one parameter's per-sample gradients go in a flattened row."""

    module: nn.Module
    kind: str
    offset: int
    numel: int


def _slots(model: nn.Module) -> list[_Slot]:
    owners = {}
    for module in model.modules():
        if isinstance(module, _WEIGHTED_LAYERS):
            for kind in ("weight", "bias"):
                param = getattr(module, kind)
                if param is not None:
                    owners[id(param)] = (module, kind)
    slots, offset = [], 0
    for name, param in model.named_parameters():
        if id(param) not in owners:
            raise _Unsupported(f"parameter {name} belongs to no supported layer")
        module, kind = owners[id(param)]
        slots.append(_Slot(module, kind, offset, param.numel()))
        offset += param.numel()
    return slots


def _layerwise_chunk(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write a chunk's per-sample gradients into ``out``; return the losses.

    One forward pass records each weighted layer's input and output; one backward
    pass of the summed losses gives, for each example, the gradient of its own loss
    at every layer output (examples do not interact). The weight gradient of example
    i is then the layer's input of example i contracted with that output gradient.
    """
    slots = _slots(model)
    layers = list(dict.fromkeys(slot.module for slot in slots))
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int, int]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module in seen:
            raise _Unsupported(f"{type(module).__name__} runs twice in one pass")
        seen[module] = (args[0], output, args[0]._version, output._version)

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with torch.enable_grad():
            logits = model(inputs)
            losses = example_losses(loss, logits, labels)
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        if layer not in seen:
            raise _Unsupported(f"{type(layer).__name__} did not run in forward")
        activation, output, input_version, output_version = seen[layer]
        if (activation._version, output._version) != (input_version, output_version):
            raise _Unsupported("a layer's input or output was modified in place")
    output_grads = torch.autograd.grad(
        losses.sum(), [seen[layer][1] for layer in layers], allow_unused=True
    )
    backprops = dict(zip(layers, output_grads, strict=True))

    count = inputs.shape[0]
    for slot in slots:
        activation = seen[slot.module][0].detach()
        backprop = backprops[slot.module]
        target = out[:, slot.offset : slot.offset + slot.numel]
        if backprop is None:
            target.zero_()
        elif isinstance(slot.module, nn.Linear):
            _linear_grads(slot.kind, activation, backprop, target, count)
        else:
            _conv_grads(slot.module, slot.kind, activation, backprop, target, count)
    return losses.detach()


def _linear_grads(
    kind: str,
    activation: torch.Tensor,
    backprop: torch.Tensor,
    target: torch.Tensor,
    count: int,
) -> None:
    features_out = backprop.shape[-1]
    if kind == "bias":
        target.copy_(backprop.reshape(count, -1, features_out).sum(1))
        return
    features_in = activation.shape[-1]
    weights = target.view(count, features_out, features_in)
    if activation.dim() == 2:
        # one input vector per example: an outer product, written in place; a
        # broadcast product is one rounding per entry, as a matrix product of
        # depth one is, and stores faster than bmm's loop over the examples
        torch.mul(backprop.unsqueeze(2), activation.unsqueeze(1), out=weights)
    else:
        # a sequence of vectors per example: sum the outer products over positions
        weights.copy_(
            torch.bmm(
                backprop.reshape(count, -1, features_out).transpose(1, 2),
                activation.reshape(count, -1, features_in),
            )
        )


def _conv_grads(
    module: nn.Conv1d | nn.Conv2d,
    kind: str,
    activation: torch.Tensor,
    backprop: torch.Tensor,
    target: torch.Tensor,
    count: int,
) -> None:
    channels_out = module.out_channels
    backprop = backprop.reshape(count, channels_out, -1)
    if kind == "bias":
        target.copy_(backprop.sum(2))
        return
    if isinstance(module, nn.Conv1d):
        # a 1-d convolution is a 2-d one over images of height 1
        activation = activation.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    patches = _patches(activation, kernel, dilation, padding, stride)
    groups = module.groups
    weights = target.view(count, channels_out, -1)
    if groups == 1:
        torch.bmm(backprop, patches.transpose(1, 2), out=weights)
        return
    positions = backprop.shape[2]
    grouped = torch.einsum(
        "ngol,ngkl->ngok",
        backprop.reshape(count, groups, channels_out // groups, positions),
        patches.reshape(count, groups, -1, positions),
    )
    weights.copy_(grouped.reshape(count, channels_out, -1))


def _patches(
    activation: torch.Tensor,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """im2col: ``(n, channels * kh * kw, positions)``, one input patch per position.

    Without dilation the patches are taken as a strided view of the padded input and
    copied once, which on a CPU is several times faster than ``F.unfold``.
    """
    if dilation != (1, 1):
        return F.unfold(
            activation, kernel, dilation=dilation, padding=padding, stride=stride
        )
    padded = F.pad(activation, (padding[1], padding[1], padding[0], padding[0]))
    windows = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
    # (n, c, out_h, out_w, kh, kw) -> (n, c, kh, kw, out_h, out_w)
    count, channels = activation.shape[:2]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(
        count, channels * kernel[0] * kernel[1], -1
    )


def _vmap_chunk(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write a chunk's per-sample gradients into ``out`` with vmap; return losses.

    ``functional_call`` in torch 2.13 can leave plain tensors in place of a
    parameter that several modules share; the model's own parameters are put back
    afterwards.
    """
    names = [name for name, _ in model.named_parameters()]
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    owned = [
        (module, name, param)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
    ]

    def example_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        value = compute_loss(loss, logits, y.unsqueeze(0))
        return value, value.detach()

    per_example = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0))
    try:
        grads, values = per_example(params, inputs, labels)
    finally:
        for module, name, param in owned:
            if getattr(module, name) is not param:
                setattr(module, name, param)
    count = inputs.shape[0]
    torch.cat([grads[name].reshape(count, -1) for name in names], dim=1, out=out)
    return values


def _fill_chunks(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None,
    engine: str,
    out: torch.Tensor | None = None,
    reuse_buffer: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Compute chunk by chunk into rows of ``out``, one reused buffer or new tensors."""
    if inputs.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"{inputs.shape[0]} inputs but {labels.shape[0]} labels for per-sample "
            "gradients"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
    chosen = select_engine(model, engine)
    param = next(model.parameters())
    width = num_parameters(model)
    if chunk_size is None:
        chunk_size = chunk_size_for(model)
        if reuse_buffer:
            # a buffer this small is recycled by the C allocator from call to call
            # instead of being mapped afresh (and page-faulted) every time
            chunk_size = min(chunk_size, chunk_size_for(model, 3 * STREAM_CHUNK_BYTES))
    step = min(chunk_size, max(1, inputs.shape[0]))
    buffer = None
    if reuse_buffer and out is None:
        buffer = torch.empty(step, width, dtype=param.dtype, device=param.device)
    for start in range(0, inputs.shape[0], step):
        # take the chunk (float inputs in the model's dtype) and the rows it fills
        chunk_inputs = inputs[start : start + step]
        if chunk_inputs.is_floating_point():
            chunk_inputs = chunk_inputs.to(param.dtype)
        chunk_labels = labels[start : start + step]
        count = chunk_inputs.shape[0]
        if out is not None:
            rows = out[start : start + count]
        elif buffer is not None:
            rows = buffer[:count]
        else:
            rows = torch.empty(count, width, dtype=param.dtype, device=param.device)

        # per-sample gradients, with the general engine if the fast one gives up
        if chosen == "layerwise":
            try:
                values = _layerwise_chunk(model, loss, chunk_inputs, chunk_labels, rows)
            except _Unsupported as reason:
                if engine == "layerwise":
                    raise ConfigError(
                        f"the layerwise gradient engine cannot run: {reason}"
                    ) from None
                logger.debug("per-sample gradients through vmap: %s", reason)
                chosen = "vmap"
        if chosen == "vmap":
            values = _vmap_chunk(model, loss, chunk_inputs, chunk_labels, rows)
        yield start, rows, values


def iter_per_sample_gradients(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    with_losses: bool = False,
    engine: str = "auto",
    reuse_buffer: bool = False,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yield per-sample gradients chunk by chunk.

    Each example's gradient is that of its own loss (a batch of one), so the gradient of
    the batch mean is the mean of the rows.

    Args:
        model: The model at the weights of interest; its ``.grad`` fields are
            unchanged.
        loss: Loss name.
        inputs: Inputs, shape ``(n, *input_shape)``; floating-point chunks are
            converted to the model's dtype (token indices stay integers).
        labels: Labels, shape ``(n,)``.
        chunk_size: Examples per chunk; by default as many as fit in
            :data:`DEFAULT_CHUNK_BYTES`, or in :data:`STREAM_CHUNK_BYTES` with
            ``reuse_buffer``.
        with_losses: Also yield each example's loss.
        engine: ``"auto"``, ``"layerwise"`` or ``"vmap"`` (see the module docstring).
        reuse_buffer: Write every chunk into the same buffer. Each yielded gradient
            tensor is then overwritten by the next chunk, so a consumer must reduce
            or copy it before asking for more. This spares the allocation of fresh
            memory per chunk, whose first touch (page faults) can cost more than
            computing the gradients.

    Yields:
        ``(start, gradients, losses)``: the index of the chunk's first example, its
        gradients of shape ``(chunk, num_parameters)``, and its losses (or None).

    Raises:
        ConfigError: On mismatched inputs and labels, a chunk size below 1 or an
            unusable engine name.
    """
    for start, rows, values in _fill_chunks(
        model,
        loss,
        inputs,
        labels,
        chunk_size=chunk_size,
        engine=engine,
        reuse_buffer=reuse_buffer,
    ):
        yield start, rows, (values if with_losses else None)


def per_sample_gradients(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    engine: str = "auto",
    out: torch.Tensor | None = None,
    losses: torch.Tensor | None = None,
) -> torch.Tensor:
    """All per-sample gradients as one ``(n, num_parameters)`` matrix.

    The chunks are written straight into the result. Use
    :func:`iter_per_sample_gradients` when ``n * num_parameters`` does not fit in
    memory.

    Args:
        model: The model at the weights of interest.
        loss: Loss name.
        inputs: Inputs, shape ``(n, *input_shape)``.
        labels: Labels, shape ``(n,)``.
        chunk_size: Examples per chunk (see :func:`iter_per_sample_gradients`).
        engine: ``"auto"``, ``"layerwise"`` or ``"vmap"``.
        out: A contiguous ``(n, num_parameters)`` tensor of the model's dtype to
            fill instead of allocating a new one.
        losses: A tensor of shape ``(n,)`` that receives each example's loss.

    Returns:
        The matrix (``out`` itself when given).

    Raises:
        ConfigError: On mismatched shapes, a bad chunk size or engine name.
    """
    param = next(model.parameters())
    shape = (inputs.shape[0], num_parameters(model))
    if out is None:
        out = torch.empty(shape, dtype=param.dtype, device=param.device)
    elif tuple(out.shape) != shape or out.dtype != param.dtype:
        raise ConfigError(
            f"out has shape {tuple(out.shape)} and dtype {out.dtype}; per-sample "
            f"gradients need {shape} and {param.dtype}"
        )
    elif not out.is_contiguous():
        raise ConfigError("out must be a contiguous tensor")
    if losses is not None and tuple(losses.shape) != shape[:1]:
        raise ConfigError(
            f"losses has shape {tuple(losses.shape)}; expected ({shape[0]},)"
        )
    for start, rows, values in _fill_chunks(
        model, loss, inputs, labels, chunk_size=chunk_size, engine=engine, out=out
    ):
        if losses is not None:
            losses[start : start + rows.shape[0]] = values
    return out


def _check_targets(targets: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Targets as a ``(t, num_parameters)`` matrix in the model's dtype."""
    width = num_parameters(model)
    if targets.dim() not in (1, 2) or targets.shape[-1] != width:
        raise ConfigError(
            f"target gradient has shape {tuple(targets.shape)}; the model has "
            f"{width} parameters"
        )
    return targets.reshape(-1, width).to(next(model.parameters()).dtype)


def _norms(difference: torch.Tensor, slices: list[slice] | None) -> torch.Tensor:
    """Row norms in float64: L2, or the sum of the L2 norms of column slices."""
    if slices is None:
        return torch.linalg.vector_norm(difference, dim=1).to(torch.float64)
    total = torch.zeros(difference.shape[0], dtype=torch.float64)
    for part in slices:
        total += torch.linalg.vector_norm(difference[:, part], dim=1)
    return total


def _distances_to_targets(
    rows: torch.Tensor, targets: torch.Tensor, slices: list[slice] | None
) -> torch.Tensor:
    """``(t, rows)`` distances; ``rows`` is used as scratch and overwritten."""
    if targets.shape[0] == 1:
        return _norms(rows.sub_(targets[0]), slices).unsqueeze(0)
    scratch = torch.empty_like(rows)
    return torch.stack(
        [_norms(torch.sub(rows, target, out=scratch), slices) for target in targets]
    )


def gradient_distances(
    targets: torch.Tensor,
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    engine: str = "auto",
    slices: list[slice] | None = None,
) -> torch.Tensor:
    """Distances of every example's per-sample gradient to one or more targets.

    The gradients stream through one reused chunk buffer and are never held all at
    once, so memory stays bounded by the chunk size whatever the number of examples.

    Args:
        targets: A flattened gradient of length ``num_parameters(model)``, or a
            ``(t, num_parameters)`` matrix of them.
        model: The model at the weights of interest.
        loss: Loss name.
        inputs: Inputs of the examples, shape ``(n, *input_shape)``.
        labels: Their labels, shape ``(n,)``.
        chunk_size: Examples per chunk (see :func:`iter_per_sample_gradients`).
        engine: ``"auto"``, ``"layerwise"`` or ``"vmap"``.
        slices: If given, the distance is the sum of the L2 norms of the difference
            over these column slices (e.g. one per layer, as in Zhang et al. 2024)
            instead of the L2 norm of the whole difference.

    Returns:
        Float64 distances, shape ``(n,)`` for one target or ``(t, n)``; each
        difference is formed and its norm summed in the model's dtype.

    Raises:
        ConfigError: If the targets do not match the model, or on bad inputs.
    """
    matrix = _check_targets(targets, model)
    distances = torch.empty(matrix.shape[0], inputs.shape[0], dtype=torch.float64)
    for start, rows, _ in _fill_chunks(
        model,
        loss,
        inputs,
        labels,
        chunk_size=chunk_size,
        engine=engine,
        reuse_buffer=True,
    ):
        distances[:, start : start + rows.shape[0]] = _distances_to_targets(
            rows, matrix, slices
        )
    return distances[0] if targets.dim() == 1 else distances


def nearest_rows(
    targets: torch.Tensor,
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 1,
    chunk_size: int | None = None,
    engine: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples whose per-sample gradients are closest to a target gradient.

    A chunked search over a pool: per-sample gradients stream through one reused
    buffer, and only the running ``k`` best per target are kept from chunk to
    chunk, so a pool of any size fits in bounded memory. This is the search step
    of nearest-gradient forging, where a replaced example is swapped for the pool
    example with the closest gradient (the per-example variant of Thudi et al.
    2022, "On the necessity of auditable algorithmic definitions for machine
    unlearning"; the re-evaluation, Suliman et al. 2025, draws M random candidates
    instead of scanning the pool).

    Args:
        targets: A flattened gradient of length ``num_parameters(model)``, or a
            ``(t, num_parameters)`` matrix of them.
        model: The model at the weights of interest.
        loss: Loss name.
        inputs: The pool's inputs, shape ``(n, *input_shape)``.
        labels: The pool's labels, shape ``(n,)``.
        k: How many of the closest examples to return per target.
        chunk_size: Examples per chunk.
        engine: ``"auto"``, ``"layerwise"`` or ``"vmap"``.

    Returns:
        ``(indices, distances)``: positions in the pool of the ``min(k, n)``
        closest examples and their float64 L2 distances, closest first, shape
        ``(k,)`` for one target or ``(t, k)``; ties go to the lower index.

    Raises:
        ConfigError: If ``k < 1``, the targets do not match the model, or on bad
            inputs.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    matrix = _check_targets(targets, model)
    count = matrix.shape[0]
    best = torch.empty(count, 0, dtype=torch.float64)
    where = torch.empty(count, 0, dtype=torch.int64)
    for start, rows, _ in _fill_chunks(
        model,
        loss,
        inputs,
        labels,
        chunk_size=chunk_size,
        engine=engine,
        reuse_buffer=True,
    ):
        # merge this chunk into the running best; a stable sort keeps ties in
        # index order, and earlier chunks come first
        positions = torch.arange(start, start + rows.shape[0]).expand(count, -1)
        values = torch.cat([best, _distances_to_targets(rows, matrix, None)], dim=1)
        positions = torch.cat([where, positions], dim=1)
        order = torch.sort(values, dim=1, stable=True).indices[:, :k]
        best = torch.gather(values, 1, order)
        where = torch.gather(positions, 1, order)
    if targets.dim() == 1:
        return where[0], best[0]
    return where, best


def subset_distances(
    rows: torch.Tensor,
    subsets: torch.Tensor,
    target: torch.Tensor,
    *,
    block_size: int = 64,
    slices: list[slice] | None = None,
) -> torch.Tensor:
    """``||sum_j rows[subsets[m, j]] - target||`` for every subset m.

    Used to rank candidate replacement sets by the gradient distance they leave. Each
    block of subsets is summed into one reused buffer, in the order of its columns,
    so no block-sized temporary is allocated.

    Args:
        rows: Per-sample gradients, shape ``(u, num_parameters)``.
        subsets: Row indices, shape ``(m, f)``.
        target: The gradient to approach, length ``num_parameters``.
        block_size: Subsets summed at once.
        slices: If given, sum the L2 norms over these column slices instead (see
            :func:`gradient_distances`).

    Returns:
        ``(m,)`` float64 distances, formed and summed in the rows' dtype.

    Raises:
        ConfigError: On mismatched shapes or a block size below 1.
    """
    if subsets.dim() != 2 or rows.dim() != 2 or tuple(target.shape) != rows.shape[1:]:
        raise ConfigError(
            f"cannot rank subsets of shape {tuple(subsets.shape)} of rows of shape "
            f"{tuple(rows.shape)} against a target of shape {tuple(target.shape)}"
        )
    if block_size < 1:
        raise ConfigError(f"block size must be >= 1, got {block_size}")
    target = target.to(rows.dtype)
    count, size = subsets.shape
    distances = torch.empty(count, dtype=torch.float64)
    buffer = torch.empty(min(block_size, count), rows.shape[1], dtype=rows.dtype)
    for start in range(0, count, block_size):
        block = subsets[start : start + block_size]
        sums = buffer[: block.shape[0]]
        torch.index_select(rows, 0, block[:, 0], out=sums)
        for column in range(1, size):
            sums.add_(rows.index_select(0, block[:, column]))
        distances[start : start + block.shape[0]] = _norms(sums.sub_(target), slices)
    return distances


def per_sample_gradients_loop(
    model: nn.Module,
    loss: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slow reference: one backward pass per example.

    Used by the tests and the benchmark to check and time :func:`per_sample_gradients`.

    Args:
        model: The model at the weights of interest.
        loss: Loss name.
        inputs: Inputs, shape ``(n, *input_shape)``.
        labels: Labels, shape ``(n,)``.
        out: A ``(n, num_parameters)`` tensor to fill row by row instead of stacking
            the rows into a new one (the benchmark compares both engines this way).

    Returns:
        The matrix (``out`` itself when given).
    """
    count = inputs.shape[0]
    if out is not None:
        for i in range(count):
            out[i] = batch_gradient(model, loss, inputs[i : i + 1], labels[i : i + 1])
        return out
    rows = [
        batch_gradient(model, loss, inputs[i : i + 1], labels[i : i + 1])
        for i in range(count)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, num_parameters(model))
