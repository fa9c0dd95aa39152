"""Models by name and the losses they train with.

- ``lenet``: the LeNet of the re-evaluation (Suliman et al. 2025): 6 filters 5x5
  same-padded, ReLU, 2x2 max-pool, 16 filters 5x5, ReLU, max-pool, dense 120-84-classes.
- ``lenet5-tanh``: the tanh / average-pool LeNet-5 used by the earlier forging papers
  (Thudi et al. 2022; Kong et al. 2023).
- ``fcn1``: one hidden layer of 100 ReLU units and one logit trained with binary
  cross-entropy, the tabular model of the re-evaluation.
- ``logreg``: softmax regression.
- ``mlp``: two hidden ReLU layers (128, 64).
- ``vgg-mini``: the BatchNorm-free VGG-mini of the unforgeability paper (Baluta et al.
  2023), the CIFAR-10 model of the re-evaluation; see :func:`_vgg_mini`.
- ``transformer``: one transformer block over token ids (context 200, embedding 32,
  2 heads, feed-forward 32), the IMDB model of the re-evaluation; see
  :class:`TransformerClassifier`.

A trace recorded from someone else's training loop names its model by an entry point
``package.module:factory`` instead (model name :data:`ENTRY_POINT_MODEL`). Importing
it runs code named by the trace, so :func:`build_model` does so only when the caller
names the same entry point as trusted.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forgelab.errors import ConfigError

LOSSES = ("cross_entropy", "bce")
ENTRY_POINT_MODEL = "entry-point"
"""Model name of traces whose model is built by an importable factory."""
ENTRY_POINT_PATTERN = (
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
)
"""``package.module:factory``: dotted identifiers, a colon, one identifier."""
TOKEN_MODELS = ("transformer",)
"""Models whose inputs are token ids rather than real values."""


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model: its name, input shape and classes.

    Attributes:
        name: Registry name, one of :data:`MODELS`, or :data:`ENTRY_POINT_MODEL`.
        input_shape: Shape of one input example.
        num_classes: Number of classes of the task.
        vocab_size: Number of token ids, for models over token-id inputs.
        entry_point: ``package.module:factory`` building the model, for
            :data:`ENTRY_POINT_MODEL` only.
        declared_loss: The loss of an entry-point model (registry models imply
            theirs).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None
    entry_point: str | None = None
    declared_loss: str | None = None

    def __post_init__(self) -> None:
        if self.name == ENTRY_POINT_MODEL:
            if self.entry_point is None or not re.match(
                ENTRY_POINT_PATTERN, self.entry_point
            ):
                raise ConfigError(
                    f"entry point {self.entry_point!r} is not of the form "
                    "package.module:factory"
                )
            if self.declared_loss not in LOSSES:
                raise ConfigError(
                    f"unknown loss {self.declared_loss!r}; choose one of "
                    f"{', '.join(LOSSES)}"
                )
        elif self.entry_point is not None or self.declared_loss is not None:
            raise ConfigError(
                f"model {self.name!r} is built in; it takes no entry point or loss"
            )

    @classmethod
    def for_domain(cls, name: str, domain: object) -> ModelSpec:
        """The spec of a registry model for data with the given domain.

        Args:
            name: Registry name.
            domain: A :class:`forgelab.data.Domain` (input shape, classes and, for
                token ids, the vocabulary size).
        """
        return cls(
            name,
            tuple(domain.input_shape),
            domain.num_classes,
            vocab_size=domain.vocab_size,
        )

    @classmethod
    def from_manifest(cls, fields: dict) -> ModelSpec:
        """Rebuild a spec from the ``model`` entry of a trace manifest."""
        is_entry_point = fields["name"] == ENTRY_POINT_MODEL
        return cls(
            fields["name"],
            tuple(fields["input_shape"]),
            fields["num_classes"],
            vocab_size=fields.get("vocab_size"),
            entry_point=fields.get("entry_point"),
            declared_loss=fields.get("loss") if is_entry_point else None,
        )

    @property
    def loss(self) -> str:
        """Name of the loss the model trains with."""
        if self.declared_loss is not None:
            return self.declared_loss
        return "bce" if self.name == "fcn1" else "cross_entropy"

    def describe(self) -> dict:
        """The model identity recorded in a trace manifest."""
        fields = {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "loss": self.loss,
        }
        if self.vocab_size is not None:
            fields["vocab_size"] = self.vocab_size
        if self.entry_point is not None:
            fields["entry_point"] = self.entry_point
        return fields


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


def _vgg_mini(spec: ModelSpec) -> nn.Module:
    """VGG-mini without BatchNorm, as trained by Baluta et al. 2023 on CIFAR-10.

    Their code removes the BatchNorm layers of the usual VGG-mini and keeps ELU
    activations. Four blocks of two 3x3 same-padded convolutions (64, 128, 256, 512
    channels), ELU after each, 2x2 max-pooling after the first three blocks, then
    dense layers 128 and 64 with ELU and a linear output. On 32x32 inputs the last
    feature map is 512 x 4 x 4 and the model has 5,742,986 parameters for 10 classes.
    Without BatchNorm the model has no buffers, so a checkpoint's weights determine
    the next step.
    """
    channels, height, width = _image_shape(spec, 8)
    if height % 8 or width % 8:
        raise ConfigError(
            f"model 'vgg-mini' pools three times and needs height and width divisible "
            f"by 8; this dataset has inputs of shape {spec.input_shape}"
        )
    layers: list[nn.Module] = []
    previous = channels
    for block, width_out in enumerate((64, 128, 256, 512)):
        for _ in range(2):
            layers += [nn.Conv2d(previous, width_out, 3, padding=1), nn.ELU()]
            previous = width_out
        if block < 3:
            layers.append(nn.MaxPool2d(2))
    flat = 512 * (height // 8) * (width // 8)
    layers += [
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ELU(),
        nn.Linear(128, 64),
        nn.ELU(),
        nn.Linear(64, spec.num_classes),
    ]
    return nn.Sequential(*layers)


class TransformerClassifier(nn.Module):
    """One transformer block over token ids, mean-pooled, then a small classifier.

    The text model of the re-evaluation (Suliman et al. 2025): context 200, embedding
    32, 2 heads, feed-forward 32, trained with Adam on IMDB. The layout follows the
    widely used Keras text-classification transformer that setup comes from: learned
    token and position embeddings, multi-head self-attention with 32-dimensional
    queries, keys and values per head, residual connections each followed by layer
    normalisation (epsilon 1e-6), a ReLU feed-forward layer of 32 units, mean over
    positions, a ReLU layer of 20 units and a linear output. Dropout is left out: a
    replay must recompute each step exactly, and forgelab does not log dropout masks.
    There is no padding mask (padding id 0 is attended to like any token).

    Args:
        vocab_size: Number of token ids.
        context: Sequence length.
        num_classes: Number of classes.
        embed_dim: Embedding width.
        num_heads: Attention heads.
        head_dim: Width of each head's queries, keys and values.
        ff_dim: Units of the feed-forward layer.
        hidden_dim: Units of the classifier's hidden layer.
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        num_classes: int,
        *,
        embed_dim: int = 32,
        num_heads: int = 2,
        head_dim: int = 32,
        ff_dim: int = 32,
        hidden_dim: int = 20,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Embedding(context, embed_dim)
        self.query = nn.Linear(embed_dim, num_heads * head_dim)
        self.key = nn.Linear(embed_dim, num_heads * head_dim)
        self.value = nn.Linear(embed_dim, num_heads * head_dim)
        self.attention_output = nn.Linear(num_heads * head_dim, embed_dim)
        self.attention_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.feed_forward = nn.Linear(embed_dim, ff_dim)
        self.feed_forward_output = nn.Linear(ff_dim, embed_dim)
        self.feed_forward_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.hidden = nn.Linear(embed_dim, hidden_dim)
        self.output = nn.Linear(hidden_dim, num_classes)

    def _heads(self, values: torch.Tensor) -> torch.Tensor:
        count, length, _ = values.shape
        return values.reshape(count, length, self.num_heads, self.head_dim).transpose(
            1, 2
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of token-id sequences of shape ``(n, context)``."""
        count, length = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)

        # self-attention, residual, normalisation
        query, key, value = (
            self._heads(f(x)) for f in (self.query, self.key, self.value)
        )
        scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)
        attended = (scores.softmax(dim=-1) @ value).transpose(1, 2)
        attended = attended.reshape(count, length, self.num_heads * self.head_dim)
        x = self.attention_norm(x + self.attention_output(attended))

        # feed-forward, residual, normalisation
        update = self.feed_forward_output(F.relu(self.feed_forward(x)))
        x = self.feed_forward_norm(x + update)

        # mean over positions, then classify
        return self.output(F.relu(self.hidden(x.mean(dim=1))))


def _transformer(spec: ModelSpec) -> nn.Module:
    if len(spec.input_shape) != 1:
        raise ConfigError(
            f"model 'transformer' needs token-id sequences of shape (context,); this "
            f"dataset has inputs of shape {spec.input_shape}"
        )
    return TransformerClassifier(spec.vocab_size, spec.input_shape[0], spec.num_classes)


_BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "lenet": lambda spec: _lenet(spec, nn.ReLU, nn.MaxPool2d),
    "lenet5-tanh": lambda spec: _lenet(spec, nn.Tanh, nn.AvgPool2d),
    "fcn1": _fcn1,
    "logreg": _logreg,
    "mlp": _mlp,
    "vgg-mini": _vgg_mini,
    "transformer": _transformer,
}
MODELS = tuple(_BUILDERS)


def load_entry_point(entry_point: str) -> Callable[[], nn.Module]:
    """Import the factory ``package.module:factory`` names.

    This runs the module's code; callers decide whether it is trusted.

    Raises:
        ConfigError: If the name is malformed, the import fails, or the attribute
            is not callable.
    """
    if not re.match(ENTRY_POINT_PATTERN, entry_point):
        raise ConfigError(
            f"entry point {entry_point!r} is not of the form package.module:factory"
        )
    module_name, _, attribute = entry_point.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - foreign code may fail
        raise ConfigError(
            f"cannot import model entry point {entry_point!r} "
            f"({type(error).__name__}: {error}); make {module_name!r} importable "
            "(installed or on PYTHONPATH)"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(
            f"model entry point {entry_point!r}: {module_name} has no callable "
            f"{attribute!r}"
        )
    return factory


def _build_from_entry_point(spec: ModelSpec, trusted: str | None) -> nn.Module:
    if trusted is None:
        raise ConfigError(
            f"the model is built by entry point {spec.entry_point!r} named in the "
            "trace; importing it runs code the trace names, so forgelab does so only "
            f"when told to: pass --allow-import {spec.entry_point} to verify if you "
            "trust that code"
        )
    if trusted != spec.entry_point:
        raise ConfigError(
            f"the trace names model entry point {spec.entry_point!r}, but the "
            f"verifier allows only {trusted!r}"
        )
    factory = load_entry_point(spec.entry_point)
    try:
        model = factory()
    except (Exception, SystemExit) as error:  # noqa: BLE001 - foreign code may fail
        # SystemExit too: an exit code from the factory would pass for a verdict
        raise ConfigError(
            f"model entry point {spec.entry_point!r} failed "
            f"({type(error).__name__}: {error})"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model entry point {spec.entry_point!r} returned "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_model(
    spec: ModelSpec, *, trusted_entry_point: str | None = None
) -> nn.Module:
    """Build a freshly initialised model (uses the global torch RNG).

    Args:
        spec: Which model, for which input shape and classes.
        trusted_entry_point: For an entry-point model, the entry point the caller
            trusts; the model is imported only if it is the one the spec names.

    Returns:
        The model, in float32.

    Raises:
        ConfigError: If the name is unknown, the model does not fit the data, or an
            entry point is not trusted or cannot be built.
    """
    if spec.name == ENTRY_POINT_MODEL:
        return _build_from_entry_point(spec, trusted_entry_point)
    if spec.name not in _BUILDERS:
        raise ConfigError(
            f"unknown model {spec.name!r}; choose one of {', '.join(MODELS)}"
        )
    if spec.name in TOKEN_MODELS and spec.vocab_size is None:
        raise ConfigError(
            f"model {spec.name!r} reads token ids; use a token dataset such as 'imdb'"
        )
    if spec.name not in TOKEN_MODELS and spec.vocab_size is not None:
        raise ConfigError(
            f"model {spec.name!r} takes real-valued inputs but this dataset holds "
            f"token ids; use one of {', '.join(TOKEN_MODELS)}"
        )
    return _BUILDERS[spec.name](spec)


def as_model_input(inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inputs as a model of the given dtype takes them.

    Real-valued inputs are cast to the model's dtype; token ids (integer tensors)
    are indices and stay as they are.
    """
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


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


def example_losses(
    loss: str, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Each example's own loss, shape ``(n,)``.

    Example i's value equals bit for bit that of :func:`compute_loss` on the batch of
    that example alone (a mean over one element). So does its gradient with respect
    to ``logits[i]`` for cross-entropy; for binary cross-entropy the vectorised
    sigmoid of the backward pass may differ from the single-element one in the last
    bit (the tests check both).

    Args:
        loss: ``"cross_entropy"`` or ``"bce"``.
        logits: Model outputs, shape ``(n, classes)`` or ``(n, 1)``.
        labels: Class indices, shape ``(n,)``.
    """
    if loss == "cross_entropy":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(
            logits.squeeze(-1), labels.to(logits.dtype), reduction="none"
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
    # chunks of 250 keep the attention scores of the transformer near 80 MB
    for start in range(0, inputs.shape[0], 250):
        logits = model(as_model_input(inputs[start : start + 250], dtype))
        correct += int((predict(loss, logits) == labels[start : start + 250]).sum())
    return correct / max(1, inputs.shape[0])
