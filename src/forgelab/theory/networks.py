"""First-layer gradients of neural networks: rank one, and they give the input away.

For a fully connected layer ``h = W a + c`` the gradient of one example is
``dW = delta a^T`` and ``dc = delta`` (``delta`` is the loss gradient by ``h``), so
``dW`` has rank one and any row ``i`` with ``dc_i != 0`` returns the layer's input
exactly: ``a = dW_i / dc_i``. This is the observation behind gradient inversion
(Phong et al., "Privacy-Preserving Deep Learning via Additively Homomorphic
Encryption", 2017; Geiping et al., "Inverting Gradients", NeurIPS 2020) and it is
why the re-evaluation (Suliman et al., USENIX Security 2025) finds single-example
forgeries implausible: the gradient pins the example.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from forgelab.gradients import per_sample_gradients

logger = logging.getLogger(__name__)

RANK_TOLERANCE = 1e-10
"""Singular values below this fraction of the largest count as zero (float64)."""

RECOVERY_TOLERANCE = 1e-10
"""Relative error below which a recovered input counts as exact (float64)."""


@dataclass
class LayerGradientSummary:
    """Rank and input recovery of one layer's per-sample gradients.

    Attributes:
        model: Model name.
        layer: Parameter name of the layer's weight.
        kind: ``"linear"`` or ``"conv"``.
        num_examples: Examples analysed.
        num_rank_one: Examples whose weight gradient has numerical rank one.
        max_second_singular_ratio: Largest ``sigma_2 / sigma_1`` over examples.
        median_numerical_rank: Median numerical rank of the weight gradient.
        num_recovered: Examples whose layer input ``dW_i / dc_i`` recovers exactly
            (linear layers only).
        max_recovery_error: Largest relative recovery error over examples with a
            non-zero bias gradient (linear layers only).
        num_zero_bias_gradient: Examples whose bias gradient is all zero (every
            unit inactive), where recovery is impossible.
        num_labels_recovered: Examples whose label is the only negative entry of
            the output layer's bias gradient.
    """

    model: str
    layer: str
    kind: str
    num_examples: int
    num_rank_one: int
    max_second_singular_ratio: float
    median_numerical_rank: float
    num_recovered: int | None
    max_recovery_error: float | None
    num_zero_bias_gradient: int
    num_labels_recovered: int


def _split(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    parts, start = {}, 0
    for name, param in model.named_parameters():
        parts[name] = flat[:, start : start + param.numel()].reshape(
            flat.shape[0], *param.shape
        )
        start += param.numel()
    return parts


def _layer_inputs(
    model: nn.Sequential, index: int, inputs: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        value = inputs
        for module in list(model)[:index]:
            value = module(value)
    return value.reshape(inputs.shape[0], -1)


def analyse_first_layers(
    model: nn.Sequential, name: str, inputs: torch.Tensor, labels: torch.Tensor
) -> list[LayerGradientSummary]:
    """Rank and input recovery of the first layer and the first linear layer.

    The model is copied to float64 so that "rank one" and "exact" can be told apart
    from round-off. For a convolution the gradient (reshaped to out-channels by
    kernel entries) sums one outer product per position and is reported with its
    numerical rank; the first fully connected layer is where rank one and exact
    recovery hold.

    Args:
        model: A ``nn.Sequential`` classifier trained with cross-entropy.
        name: Its registry name, for the report.
        inputs: Examples, scaled.
        labels: Class indices.

    Returns:
        One summary for the first layer and, if that is not linear, one for the
        first linear layer.
    """
    model = _float64_copy(model)
    inputs = inputs.to(torch.float64)
    grads = _split(model, per_sample_gradients(model, "cross_entropy", inputs, labels))
    modules = list(model)
    last_bias = [n for n, _ in model.named_parameters()][-1]
    output_bias = grads[last_bias]
    labels_recovered = int(
        (
            (output_bias.argmin(dim=1) == labels) & ((output_bias < 0).sum(dim=1) == 1)
        ).sum()
    )
    chosen = []
    for index, module in enumerate(modules):
        if isinstance(module, nn.Conv2d | nn.Linear):
            if not chosen or isinstance(module, nn.Linear):
                chosen.append(index)
            if isinstance(module, nn.Linear):
                break
    summaries = []
    for index in chosen:
        module = modules[index]
        weight = grads[f"{index}.weight"].reshape(
            inputs.shape[0], module.weight.shape[0], -1
        )
        bias = grads[f"{index}.bias"]
        singular = torch.linalg.svdvals(weight)
        ratios = singular[:, 1] / singular[:, 0].clamp_min(1e-300)
        ranks = (singular > RANK_TOLERANCE * singular[:, :1]).sum(dim=1)
        recovered = recovery = None
        if isinstance(module, nn.Linear):
            layer_input = _layer_inputs(model, index, inputs)
            errors = []
            for example in range(inputs.shape[0]):
                unit = int(bias[example].abs().argmax())
                if bias[example, unit] == 0:
                    continue
                estimate = weight[example, unit] / bias[example, unit]
                truth = layer_input[example]
                errors.append(
                    float(
                        torch.linalg.vector_norm(estimate - truth)
                        / torch.linalg.vector_norm(truth).clamp_min(1e-300)
                    )
                )
            recovered = sum(1 for e in errors if e <= RECOVERY_TOLERANCE)
            recovery = max(errors) if errors else None
        summaries.append(
            LayerGradientSummary(
                model=name,
                layer=f"{index}.weight",
                kind="linear" if isinstance(module, nn.Linear) else "conv",
                num_examples=int(inputs.shape[0]),
                num_rank_one=int((ranks == 1).sum()),
                max_second_singular_ratio=float(ratios.max()),
                median_numerical_rank=float(np.median(ranks.numpy())),
                num_recovered=recovered,
                max_recovery_error=recovery,
                num_zero_bias_gradient=int((bias.abs().sum(dim=1) == 0).sum()),
                num_labels_recovered=labels_recovered,
            )
        )
        logger.info("%s %s: %s", name, f"{index}.weight", summaries[-1])
    return summaries


def singular_value_profile(
    model: nn.Sequential, inputs: torch.Tensor, labels: torch.Tensor, layer: str
) -> np.ndarray:
    """Normalised singular values ``sigma_k / sigma_1`` of one layer's gradients.

    Returns:
        Shape ``(n, min(out, in))``, one row per example, in float64.
    """
    model = _float64_copy(model)
    grads = _split(
        model,
        per_sample_gradients(model, "cross_entropy", inputs.to(torch.float64), labels),
    )
    weight = grads[layer].reshape(inputs.shape[0], grads[layer].shape[1], -1)
    singular = torch.linalg.svdvals(weight)
    return (singular / singular[:, :1].clamp_min(1e-300)).numpy()


def _float64_copy(model: nn.Module) -> nn.Sequential:
    import copy

    return copy.deepcopy(model).to(torch.float64)
