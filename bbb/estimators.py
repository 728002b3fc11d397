"""Gradient estimators for the expected log-likelihood, behind one switch.

`posterior.estimator` picks how one Monte-Carlo sample of the network's output is drawn:

- `"reparam"` (Blundell et al. 2015): one weight sample w = μ + σ ∘ ε per MC sample, shared by
  the whole minibatch. Works for any Flax model.
- `"local_reparam"` (Kingma, Salimans & Welling 2015, "Variational Dropout and the Local
  Reparameterization Trick"): for a Dense layer, the pre-activations are Gaussian given the
  input, b ~ N(x μ_W + μ_b, x² σ_W² + σ_b²), so they are sampled directly with one noise draw
  per example and output unit: lower variance, and no weight sample.
- `"flipout"` (Wen et al. 2018, "Flipout: Efficient Pseudo-Independent Weight Perturbations on
  Mini-Batches"): one shared perturbation ΔW = σ ∘ ε, decorrelated across the minibatch by
  random signs, out = x μ + ((x ∘ s) ΔW) ∘ r, with s, r ∈ {±1} per example. For Dense and Conv
  (for Conv, s and r are per input / output channel, constant over space). With the MC KL, the
  KL is taken at w = μ + ΔW: one weight-sized draw per sample serves both terms.

The model stays a plain Flax module. The local estimators run it with μ as its `params` and σ
in a second variable collection, `"sigma"` (flipout's ΔW in a third, `"perturbation"`); a Flax
method interceptor replaces the call of each `nn.Dense` / `nn.Conv` by its stochastic form. A
layer with parameters that the chosen estimator has no form for raises `ConfigError` while
tracing, before any compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bbb.errors import ConfigError
from bbb.posterior import MeanFieldGaussian, rademacher, shared, standard_normal

PyTree = Any
ESTIMATORS = ("reparam", "local_reparam", "flipout")
SUPPORTED_LAYERS = {
    "reparam": "any layer",
    "local_reparam": "nn.Dense",
    "flipout": "nn.Dense and nn.Conv",
}


def _without_bias(module: nn.Module, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """The layer's own linear map (dense or convolution) of `x` by `kernel`, without bias."""
    layer = module.clone(parent=None, use_bias=False)
    return layer.apply({"params": {"kernel": kernel}}, x)


def _local_reparam(module: nn.Module, mean: jax.Array, x: jax.Array, generator: str) -> jax.Array:
    """Samples the pre-activations b ~ N(mean, x² σ_W² + σ_b²), one draw per output."""
    sigma = module.variables["sigma"]
    # A bfloat16 layer (model.dtype) multiplies in bfloat16; the noise and the sum are float32.
    mean = _at_least_float32(mean)
    variance = _without_bias(module, jnp.square(sigma["kernel"]), jnp.square(x))
    variance = _at_least_float32(variance)
    if "bias" in sigma:
        variance = variance + jnp.square(sigma["bias"])
    noise = standard_normal(module.make_rng("noise"), mean.shape, generator, mean.dtype)
    # The first layer's mean and variance are computed once for all the MC samples (a vmap).
    return shared(mean, noise) + shared(_safe_sqrt(variance), noise) * noise


def _at_least_float32(x: jax.Array) -> jax.Array:
    """`x` in float32, unless it is wider (float64 under jax.enable_x64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_sqrt(variance: jax.Array) -> jax.Array:
    """√variance, with gradient 0 (not NaN) where the variance is exactly 0.

    The variance is 0 for a point-mass posterior (σ = 0), and where σ² underflows (ρ ≲ −44 in
    float32) on an input row of zeros; `jnp.sqrt` would give an infinite derivative there, and
    inf · 0 = NaN in every upstream gradient.
    """
    positive = variance > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)


def _flipout(module: nn.Module, mean: jax.Array, x: jax.Array, generator: str) -> jax.Array:
    """Adds the sign-flipped shared perturbation ((x ∘ s) ΔW) ∘ r to the mean path.

    ΔW = σ ∘ ε comes in the "perturbation" collection (see `apply_local`); the signs are
    drawn here, per layer.
    """
    delta = module.variables["perturbation"]
    k_in, k_out = jax.random.split(module.make_rng("noise"))
    # Signs per example and input channel (constant over spatial positions for a conv), and
    # per example and output channel.
    batch_shape = x.shape[:1] + (1,) * (x.ndim - 2)
    sign_in = rademacher(k_in, (*batch_shape, x.shape[-1]), generator).astype(x.dtype)
    mean = _at_least_float32(mean)  # As in `_local_reparam`: the sum is float32.
    sign_out = rademacher(k_out, (*batch_shape, mean.shape[-1]), generator).astype(mean.dtype)
    perturbation = _at_least_float32(_without_bias(module, delta["kernel"], x * sign_in))
    if "bias" in delta:
        perturbation = perturbation + delta["bias"]
    return shared(mean, perturbation) + perturbation * sign_out


def _own_variables(module: nn.Module, collection: str) -> dict[str, Any]:
    """The variables a module holds itself, not those of its submodules."""
    variables = module.variables.get(collection, {})
    return {k: v for k, v in variables.items() if not isinstance(v, Mapping)}


def _make_interceptor(estimator: str, generator: str):
    """The method interceptor of one `apply_local` call: each Dense / Conv layer that holds σ is
    replaced by its stochastic form; anything else that holds σ raises `ConfigError`."""
    called = set()  # The layers sampled so far in this application of the model.

    def refuse(module: nn.Module, why: str) -> ConfigError:
        path = "/".join(module.scope.path) if module.scope is not None else module.name
        return ConfigError(
            "posterior.estimator",
            estimator,
            f"'reparam' for the model's layer {path!r} of type {type(module).__name__}: {why}",
        )

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        method = context.method_name
        if method == "setup" or (method.startswith("_") and method != "__call__"):
            return next_fun(*args, **kwargs)
        if not _own_variables(module, "sigma"):
            return next_fun(*args, **kwargs)
        is_dense = isinstance(module, nn.Dense)
        is_conv = isinstance(module, nn.Conv)
        supported = (estimator == "local_reparam" and is_dense) or (
            estimator == "flipout" and (is_dense or is_conv)
        )
        if method != "__call__":
            # E.g. nn.Embed.attend (tied output weights): it would run on μ, without noise.
            raise refuse(module, f"{estimator!r} samples layers through __call__, not {method}")
        if not supported:
            raise refuse(module, f"{estimator!r} supports {SUPPORTED_LAYERS[estimator]} only")
        path = module.scope.path if module.scope is not None else (module.name,)
        if path in called:
            # Two calls would draw independent noise for what is one weight sample.
            raise refuse(
                module,
                "its weights are used twice (shared), and each call would "
                "draw the pre-activations' noise independently",
            )
        called.add(path)
        x = args[0]
        if estimator == "local_reparam":
            if x.ndim != 2:
                # Positions of one example share one weight sample: their pre-activations are
                # correlated, which one independent draw per output cannot give.
                raise refuse(
                    module,
                    f"'local_reparam' needs inputs [batch, features]; this layer gets {x.ndim}-D "
                    f"inputs {tuple(x.shape)} ('flipout' keeps its signs constant over positions)",
                )
            return _local_reparam(module, next_fun(*args, **kwargs), x, generator)
        return _flipout(module, next_fun(*args, **kwargs), x, generator)

    return interceptor


def apply_local(
    model: nn.Module,
    posterior: MeanFieldGaussian,
    x: jax.Array,
    key: jax.Array,
    estimator: str,
    rngs: dict[str, jax.Array] | None = None,
    noise: PyTree | None = None,
    **kwargs: Any,
) -> jax.Array:
    """One MC sample of the model's output under `local_reparam` or `flipout`.

    Flipout's shared perturbation is ΔW = σ ∘ ε for the whole network, with ε from the
    posterior's own generator (`posterior.noise`) and `flipout_keys(key)[1]`, unless `noise`
    gives ε: the free energy passes the ε of its MC KL sample, so that flipout, like the
    paper's estimator, draws one weight-sized ε per sample for both terms.

    Args:
      model: a Flax module built from `nn.Dense` (and, for flipout, `nn.Conv`) layers.
      posterior: the mean-field posterior over the model's parameters.
      x: the inputs [B, ...].
      key: the key for this sample's noise.
      estimator: "local_reparam" or "flipout".
      rngs: further rng streams for the model (e.g. "dropout").
      noise: flipout only: ε like `posterior.mu`; None draws it.
      **kwargs: passed to the model's `__call__`.

    Returns:
      The outputs [B, ...], one noise draw per example.

    Raises:
      ConfigError: a layer has parameters but no form under this estimator.
    """
    if estimator not in ("local_reparam", "flipout"):
        raise ConfigError("posterior.estimator", estimator, "'local_reparam' or 'flipout' here")
    sigma = posterior.stddev()
    variables = {"params": posterior.mean(), "sigma": sigma}
    if estimator == "flipout":
        key, key_eps = flipout_keys(key)
        if noise is None:
            noise = posterior.sample_noise(key_eps)
        variables["perturbation"] = jax.tree_util.tree_map(
            lambda s, e: shared(s, e) * e, sigma, noise
        )
    generator = getattr(posterior, "noise", "jax")  # A point estimate (σ = 0) has none.
    with nn.intercept_methods(_make_interceptor(estimator, generator)):
        return model.apply(variables, x, rngs={**(rngs or {}), "noise": key}, **kwargs)


def flipout_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the key of flipout's random signs, the key of its ε) for one sample's `key`."""
    key_signs, key_eps = jax.random.split(key)
    return key_signs, key_eps


def sample_output(
    model: nn.Module,
    posterior: MeanFieldGaussian,
    x: jax.Array,
    key: jax.Array,
    estimator: str = "reparam",
    **kwargs: Any,
) -> jax.Array:
    """One MC sample of the model's output, under any estimator (no KL term).

    Args:
      model: the Flax module.
      posterior: the posterior over its parameters.
      x: the inputs [B, ...].
      key: a PRNG key.
      estimator: one of `ESTIMATORS`.
      **kwargs: passed to the model's `__call__`.

    Returns:
      The outputs [B, ...].
    """
    key_noise, key_dropout = jax.random.split(key)
    rngs = {"dropout": key_dropout}
    if estimator == "reparam":
        return model.apply({"params": posterior.sample(key_noise)}, x, rngs=rngs, **kwargs)
    return apply_local(model, posterior, x, key_noise, estimator, rngs=rngs, **kwargs)
