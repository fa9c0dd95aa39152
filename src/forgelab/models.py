"""Models by name and the losses they train with.

- ``lenet``: the LeNet of the re-evaluation (Suliman et al. 2025): 6 filters 5x5
  same-padded, ReLU, 2x2 max-pool, 16 filters 5x5, ReLU, max-pool, dense 120-84-classes.
- ``lenet5-tanh``: the tanh / average-pool LeNet-5 used by the earlier forging papers
  (Thudi et al. 2022; Kong et al. 2023).
- ``fcn1``: one hidden layer of 100 ReLU units and one logit trained with binary
  cross-entropy, the tabular model of the re-evaluation.
- ``logreg``: softmax regression.
- ``mlp``: two hidden ReLU layers (128, 64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forgelab.errors import ConfigError

LOSSES = ("cross_entropy", "bce")


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model: its name, input shape and classes.

    Attributes:
        name: Registry name, one of :data:`MODELS`.
        input_shape: Shape of one input example.
        num_classes: Number of classes of the task.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def loss(self) -> str:
        """Name of the loss the model trains with."""
        return "bce" if self.name == "fcn1" else "cross_entropy"

    def describe(self) -> dict:
        """The model identity recorded in a trace manifest."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "loss": self.loss,
        }


def _image_shape(spec: ModelSpec, minimum: int) -> tuple[int, int, int]:
    if len(spec.input_shape) != 3 or min(spec.input_shape[1:]) < minimum:
        raise ConfigError(
            f"model {spec.name!r} needs images of shape (channels, h, w) with h, w >= "
            f"{minimum}; this dataset has inputs of shape {spec.input_shape}"
        )
    return spec.input_shape  # type: ignore[return-value]


def _lenet(
    spec: ModelSpec, activation: type[nn.Module], pool: type[nn.Module]
) -> nn.Module:
    channels, height, width = _image_shape(spec, 12)
    flat = 16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2),
        activation(),
        pool(2),
        nn.Conv2d(6, 16, 5),
        activation(),
        pool(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        activation(),
        nn.Linear(120, 84),
        activation(),
        nn.Linear(84, spec.num_classes),
    )


def _num_features(spec: ModelSpec) -> int:
    return int(torch.Size(spec.input_shape).numel())


def _fcn1(spec: ModelSpec) -> nn.Module:
    if spec.num_classes != 2:
        raise ConfigError(
            f"model 'fcn1' trains with binary cross-entropy and needs a two-class "
            f"dataset; this one has {spec.num_classes} classes"
        )
    return nn.Sequential(
        nn.Flatten(), nn.Linear(_num_features(spec), 100), nn.ReLU(), nn.Linear(100, 1)
    )


def _logreg(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_num_features(spec), spec.num_classes))


def _mlp(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_num_features(spec), 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, spec.num_classes),
    )


_BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "lenet": lambda spec: _lenet(spec, nn.ReLU, nn.MaxPool2d),
    "lenet5-tanh": lambda spec: _lenet(spec, nn.Tanh, nn.AvgPool2d),
    "fcn1": _fcn1,
    "logreg": _logreg,
    "mlp": _mlp,
}
MODELS = tuple(_BUILDERS)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build a freshly initialised model (uses the global torch RNG).

    Args:
        spec: Which model, for which input shape and classes.

    Returns:
        The model, in float32.

    Raises:
        ConfigError: If the name is unknown or the model does not fit the data.
    """
    if spec.name not in _BUILDERS:
        raise ConfigError(
            f"unknown model {spec.name!r}; choose one of {', '.join(MODELS)}"
        )
    return _BUILDERS[spec.name](spec)


def compute_loss(loss: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of a batch.

    Args:
        loss: ``"cross_entropy"`` (softmax over classes) or ``"bce"`` (one logit).
        logits: Model outputs, shape ``(n, classes)`` or ``(n, 1)``.
        labels: Class indices, shape ``(n,)``.

    Returns:
        The scalar mean loss.
    """
    if loss == "cross_entropy":
        return F.cross_entropy(logits, labels)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(
            logits.squeeze(-1), labels.to(logits.dtype)
        )
    raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def predict(loss: str, logits: torch.Tensor) -> torch.Tensor:
    """Predicted class indices for model outputs trained with ``loss``."""
    if loss == "bce":
        return (logits.squeeze(-1) > 0).long()
    return logits.argmax(dim=-1)


@torch.no_grad()
def accuracy(
    model: nn.Module, loss: str, inputs: torch.Tensor, labels: torch.Tensor
) -> float:
    """Fraction of examples the model classifies correctly."""
    dtype = next(model.parameters()).dtype
    correct = 0
    for start in range(0, inputs.shape[0], 1000):
        logits = model(inputs[start : start + 1000].to(dtype))
        correct += int((predict(loss, logits) == labels[start : start + 1000]).sum())
    return correct / max(1, inputs.shape[0])
