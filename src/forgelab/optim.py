"""Optimizers by name, and their state as named tensors for checkpoints.

The state of a stateful optimizer (momentum buffers, Adam moments and step counts)
is stored next to the weights, keyed by parameter name, so that a replay restores it
exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from forgelab.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimizerConfig:
    """Hyperparameters of the optimizer that produced a trace.

    Attributes:
        name: ``"sgd"`` or ``"adam"``.
        lr: Learning rate (eta).
        momentum: SGD momentum (0 for plain SGD).
        weight_decay: L2 penalty added to the gradient.
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        eps: Adam's denominator constant.
    """

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.name!r}; choose one of "
                f"{', '.join(OPTIMIZERS)}"
            )
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if not (self.momentum >= 0 and self.weight_decay >= 0):
            raise ConfigError(
                f"momentum and weight decay must be non-negative, got "
                f"{self.momentum} and {self.weight_decay}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps >= 0):
            raise ConfigError(
                f"Adam needs 0 <= beta1, beta2 < 1 and eps >= 0, got {self.beta1}, "
                f"{self.beta2} and {self.eps}"
            )
        values = (self.lr, self.momentum, self.weight_decay, self.eps)
        if not all(math.isfinite(value) for value in values):
            raise ConfigError(f"optimizer settings must be finite, got {values}")

    @property
    def is_stateless(self) -> bool:
        """Whether one step depends on the weights and the batch only."""
        return self.name == "sgd" and self.momentum == 0

    def describe(self) -> dict:
        """The optimizer as recorded in a trace manifest."""
        return asdict(self)

    @classmethod
    def from_manifest(cls, fields: dict) -> OptimizerConfig:
        """Rebuild a configuration from a manifest entry.

        Numbers are converted to float, as the fields are declared, so that an
        integer too large for a float is refused here rather than deep inside torch.
        """
        try:
            values = {
                key: value if key == "name" else float(value)
                for key, value in fields.items()
            }
        except (TypeError, ValueError, OverflowError) as error:
            raise ConfigError(f"optimizer settings must be numbers ({error})") from None
        return cls(**values)


def build_optimizer(config: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Create the torch optimizer described by ``config`` for ``model``."""
    if config.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            foreach=False,
        )
    return torch.optim.Adam(
        model.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        foreach=False,
    )


def state_keys(config: OptimizerConfig) -> tuple[str, ...]:
    """Names of the per-parameter state tensors the optimizer keeps."""
    if config.name == "adam":
        return ("step", "exp_avg", "exp_avg_sq")
    return ("momentum_buffer",) if config.momentum > 0 else ()


def export_state(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state keyed by parameter name, then by state name.

    Parameters the optimizer has not touched yet have no entry.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    exported: dict[str, dict[str, torch.Tensor]] = {}
    for param, state in optimizer.state.items():
        tensors = {
            key: value.detach().clone()
            for key, value in state.items()
            if isinstance(value, torch.Tensor)
        }
        if tensors:
            exported[names[id(param)]] = tensors
    return exported


def import_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    state: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Restore optimizer state exported by :func:`export_state`."""
    optimizer.state.clear()
    params = dict(model.named_parameters())
    for name, tensors in state.items():
        param = params[name]
        optimizer.state[param] = {
            key: value.clone().to(param.dtype if key != "step" else value.dtype)
            for key, value in tensors.items()
        }
