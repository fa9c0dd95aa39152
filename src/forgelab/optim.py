"""Optimizers by name, and their state as named tensors for checkpoints.

The state of a stateful optimizer (momentum buffers, Adam moments and step counts)
is stored next to the weights, keyed by parameter name, so that a replay restores it
exactly.

For a stateful optimizer one step depends on the weights, the batch gradient and the
state, so the forging error of a forged batch B' is defined with the state held fixed:
the distance between the weights after one step with g(B) and after one step with
g(B'), both from the same logged checkpoint (weights and state). For plain SGD and for
SGD with momentum (no dampening, no Nesterov) this is exactly eta * ||g(B) - g(B')||,
since weight decay and the momentum term are the same on both sides; for Adam it is
not a multiple of the gradient distance and is computed by
:func:`measure_step_error`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from forgelab.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
MAX_SETTING = 1e4
"""Largest learning rate or weight decay accepted."""


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
        if self.name == "adam" and self.momentum != 0:
            raise ConfigError(
                f"Adam takes no momentum (beta1 plays that part); got momentum "
                f"{self.momentum}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps >= 0):
            raise ConfigError(
                f"Adam needs 0 <= beta1, beta2 < 1 and eps >= 0, got {self.beta1}, "
                f"{self.beta2} and {self.eps}"
            )
        values = (self.lr, self.momentum, self.weight_decay, self.eps)
        if not all(math.isfinite(value) for value in values):
            raise ConfigError(
                f"optimizer settings must be finite, got lr {self.lr}, momentum "
                f"{self.momentum}, weight decay {self.weight_decay}, eps {self.eps}"
            )
        # beyond these, one float32 update overflows or never settles
        if (
            self.momentum > 1
            or self.lr > MAX_SETTING
            or self.weight_decay > MAX_SETTING
        ):
            raise ConfigError(
                f"need momentum <= 1 and lr, weight decay <= {MAX_SETTING:g}; got "
                f"{self.momentum}, {self.lr} and {self.weight_decay}"
            )

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


def config_from_torch(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> OptimizerConfig:
    """Describe a torch optimizer built by someone else's training loop.

    Only the optimizers a replay can rebuild are accepted: ``torch.optim.SGD`` (with
    momentum and weight decay, no dampening, no Nesterov) and ``torch.optim.Adam``
    (no AMSGrad, no decoupled weight decay), with one parameter group holding exactly
    the model's parameters.

    Args:
        optimizer: The optimizer of the training loop.
        model: The model it updates.

    Returns:
        The equivalent configuration.

    Raises:
        ConfigError: Naming the setting a replay could not reproduce.
    """
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam):
        raise ConfigError(
            f"optimizer {kind.__name__} is not supported; use torch.optim.SGD or "
            "torch.optim.Adam"
        )
    if len(optimizer.param_groups) != 1:
        raise ConfigError(
            f"the optimizer has {len(optimizer.param_groups)} parameter groups; a "
            "trace records one set of hyperparameters, so use a single group"
        )
    group = optimizer.param_groups[0]
    if {id(p) for p in group["params"]} != {id(p) for p in model.parameters()}:
        raise ConfigError(
            "the optimizer must update exactly the model's parameters "
            "(build it with model.parameters())"
        )
    refused = {"maximize": False, "differentiable": False}
    if kind is torch.optim.SGD:
        refused |= {"nesterov": False, "dampening": 0}
    else:
        refused |= {"amsgrad": False, "decoupled_weight_decay": False}
    for key, supported in refused.items():
        if group.get(key, supported) != supported:
            raise ConfigError(
                f"optimizer setting {key}={group[key]!r} is not supported "
                f"(only {key}={supported!r})"
            )
    if kind is torch.optim.SGD:
        return OptimizerConfig(
            name="sgd",
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            weight_decay=float(group["weight_decay"]),
        )
    beta1, beta2 = (float(b) for b in group["betas"])
    return OptimizerConfig(
        name="adam",
        lr=float(group["lr"]),
        weight_decay=float(group["weight_decay"]),
        beta1=beta1,
        beta2=beta2,
        eps=float(group["eps"]),
    )


def compute_update(
    config: OptimizerConfig,
    weight: torch.Tensor,
    gradient: torch.Tensor,
    state: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The change W_{t+1} - W_t of one parameter in one step, in float64.

    Written out from the update rules torch implements (SGD with momentum and L2
    weight decay; Adam, Kingma and Ba 2015, with bias correction), so that two
    gradients can be pushed through the same state without touching an optimizer.

    Args:
        config: The optimizer.
        weight: The parameter before the step.
        gradient: Its gradient of the batch loss.
        state: Its optimizer state before the step (empty before the first step).

    Returns:
        The update, shaped like ``weight``.
    """
    weight, gradient = weight.to(torch.float64), gradient.to(torch.float64)
    direction = gradient + config.weight_decay * weight
    if config.name == "sgd":
        buffer = state.get("momentum_buffer")
        if config.momentum > 0 and buffer is not None:
            direction = config.momentum * buffer.to(torch.float64) + direction
        return -config.lr * direction
    step = float(state["step"]) + 1 if "step" in state else 1.0
    exp_avg = torch.zeros_like(weight)
    exp_avg_sq = torch.zeros_like(weight)
    if "exp_avg" in state:
        exp_avg = state["exp_avg"].to(torch.float64)
        exp_avg_sq = state["exp_avg_sq"].to(torch.float64)
    exp_avg = config.beta1 * exp_avg + (1 - config.beta1) * direction
    exp_avg_sq = config.beta2 * exp_avg_sq + (1 - config.beta2) * direction**2
    correction1 = 1 - config.beta1**step
    correction2 = math.sqrt(1 - config.beta2**step)
    denominator = exp_avg_sq.sqrt() / correction2 + config.eps
    return -(config.lr / correction1) * exp_avg / denominator


def measure_step_error(
    config: OptimizerConfig,
    weights: dict[str, torch.Tensor],
    state: dict[str, dict[str, torch.Tensor]],
    true_gradient: dict[str, torch.Tensor],
    forged_gradient: dict[str, torch.Tensor],
) -> tuple[float, float]:
    """Forging error and update size of one step from a checkpoint's optimizer state.

    The forging error of a forged batch is the L2 distance between the weights after
    one step with the true batch gradient and after one step with the forged one,
    both from the same weights and optimizer state (for plain SGD this reduces to
    eta * ||g(B) - g(B')||, the definition of Suliman et al. 2025).

    Args:
        config: The optimizer.
        weights: The checkpoint's weights by parameter name.
        state: The checkpoint's optimizer state by parameter name.
        true_gradient: g(B) by parameter name.
        forged_gradient: g(B') by parameter name.

    Returns:
        ``(forging_error, update_norm)``: the distance between the two updates, and
        the L2 norm of the true update.
    """
    squared_error = 0.0
    squared_update = 0.0
    for name, weight in weights.items():
        own_state = state.get(name, {})
        true_update = compute_update(config, weight, true_gradient[name], own_state)
        forged_update = compute_update(config, weight, forged_gradient[name], own_state)
        squared_error += float(((true_update - forged_update) ** 2).sum())
        squared_update += float((true_update**2).sum())
    return math.sqrt(squared_error), math.sqrt(squared_update)
