"""Plain Flax models. Nothing here is Bayesian: the posterior wraps their parameters.

They use Flax's own `nn.Dense` and `nn.Conv`, so the weight-sampling estimator works on them
as it does on any Flax model, and the local-reparameterisation and flipout estimators
(`bbb.estimators`) recognise their layers.

`model.dtype` is the compute dtype of the hidden layers (Flax's `dtype`; the parameters stay
float32). "bfloat16" is mixed precision as on TPUs and recent GPUs and CPUs: each hidden layer
casts its input and weights to bfloat16 and multiplies them there (and so does the gradient of
that product), while the output layer, the logits, the posterior, its noise, the KL and the
optimiser stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bbb.errors import ConfigError, check_choice, check_in_range, check_positive

# model.dtype → the hidden layers' Flax `dtype`; None computes in the parameters' dtype
# (float32, or float64 under jax.enable_x64, as the gradient tests use).
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "elu": nn.elu,
    "silu": nn.silu,
}


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs (Blundell et al. 2015: 784-H-H-10, ReLU).

    Attributes:
      hidden_sizes: widths of the hidden layers.
      num_outputs: the output width (classes, or regression targets).
      activation: a name in `ACTIVATIONS`.
      dropout_rate: dropout on hidden units (the paper's dropout baseline); 0 disables it.
      dtype: the hidden layers' compute dtype; None: the parameters' (the output layer's).
    """

    hidden_sizes: Sequence[int] = (400, 400)
    num_outputs: int = 10
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Args: x [B, ...]; train: draw dropout masks (needs the 'dropout' rng).

        Returns: outputs [B, num_outputs].
        """
        x = x.reshape(x.shape[0], -1)
        act = ACTIVATIONS[self.activation]
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_outputs)(x)


class LeNet(nn.Module):
    """A LeNet-5-style CNN: conv(5×5) → pool → conv(5×5) → pool → dense → dense → dense.

    Attributes:
      features: channels of the two conv layers.
      hidden_sizes: widths of the dense layers after them.
      num_outputs: classes.
      activation: a name in `ACTIVATIONS`.
      dropout_rate: dropout before the dense layers; 0 disables it.
      dtype: the hidden layers' compute dtype; None: the parameters' (the output layer's).
    """

    features: Sequence[int] = (32, 64)
    hidden_sizes: Sequence[int] = (256,)
    num_outputs: int = 10
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Args: x [B, H, W, C]; train: draw dropout masks.

        Returns: logits [B, num_outputs].
        """
        act = ACTIVATIONS[self.activation]
        for channels in self.features:
            x = act(nn.Conv(channels, (5, 5), padding="SAME", dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden_sizes:
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = act(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_outputs)(x)


MODELS = {"mlp": MLP, "lenet": LeNet}


def _positive_integers(field: str, values) -> tuple[int, ...]:
    """`values` as a tuple; ConfigError unless each is a positive int (a bool is not)."""
    values = tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(field, values, "a sequence of positive integers")
    return values


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model that `config` (the `config.model` block) describes.

    Args:
      config: `name` ("mlp" or "lenet"), `hidden_sizes`, `num_outputs`, `activation`,
        `dropout_rate`, `dtype` (default "float32"), and for "lenet" `features`.

    Returns:
      An unbound Flax module.

    Raises:
      ConfigError: naming the bad field.
    """
    check_choice("model.name", config.name, MODELS)
    check_choice("model.activation", config.activation, ACTIVATIONS)
    dtype = config.get("dtype", "float32")  # Configs saved before the field had none.
    check_choice("model.dtype", dtype, DTYPES)
    sizes = _positive_integers("model.hidden_sizes", config.hidden_sizes)
    check_positive("model.num_outputs", config.num_outputs, integer=True)
    check_in_range("model.dropout_rate", config.dropout_rate, 0, 1, include_high=False)
    kwargs = dict(
        hidden_sizes=sizes,
        num_outputs=config.num_outputs,
        activation=config.activation,
        dropout_rate=float(config.dropout_rate),
        dtype=DTYPES[dtype],
    )
    if config.name == "lenet":
        kwargs["features"] = _positive_integers("model.features", config.get("features", (32, 64)))
    return MODELS[config.name](**kwargs)
