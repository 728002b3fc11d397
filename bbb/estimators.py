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
tracing, before any compute. A Dense layer's products with a kernel that the MC samples share (μ,
and σ² for `local_reparam`) go through `rows_dot`, which takes the samples of the free energy's
vmap as more rows of one product.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from bbb.errors import ConfigError
from bbb.posterior import MeanFieldGaussian, rademacher, shared, standard_normal

PyTree = Any
ESTIMATORS = ("reparam", "local_reparam", "flipout")
SUPPORTED_LAYERS = {
    "reparam": "any layer",
    "local_reparam": "nn.Dense",
    "flipout": "nn.Dense and nn.Conv",
}


def rows_dot(
    x: jax.Array,
    kernel: jax.Array,
    precision: lax.PrecisionLike = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """x @ kernel over the last axis of `x`, with all of x's leading axes as the rows of one
    matrix product, under `jax.vmap` too: a vmap's axis joins the rows when `kernel` is shared.

    The free energy's K Monte-Carlo samples are a vmap, so from the second layer on a Dense
    layer's input is [K, B, in] while its kernel (μ, and σ² for `local_reparam`'s variance) is
    the same for every sample. `lax.dot_general` batches that by moving K into the product's
    free axes, and its transpose for the kernel's gradient then contracts over the two axes
    (K, B); XLA:CPU turns that into a 2-D product by first copying one operand transposed. Here
    the kernel's gradient is one product of the [K·B, in] input by the [K·B, out] cotangent,
    with no copy: `local_reparam`'s step at K = 8 took 0.91–0.92× as long at H = 400
    (docs/performance.md, "The samples as rows of one product"). Same values as `x @ kernel`;
    a batched kernel (a weight sample per MC sample, or a sweep's members) falls back to
    `lax.dot_general`'s own batching. On a device mesh the merged rows would mix the "samples"
    and "data" shardings, so the free energy does not use it there (`apply_local`).

    Args:
      x: the inputs [..., in].
      kernel: the weights [in, out].
      precision: as for `lax.dot_general`.
      preferred_element_type: as for `lax.dot_general`.

    Returns:
      [..., out].
    """
    return _rows_dot_p.bind(
        x, kernel, precision=precision, preferred_element_type=preferred_element_type
    )


_rows_dot_p = Primitive("bbb_rows_dot")


def _rows_dot_impl(x, kernel, *, precision, preferred_element_type):
    out = lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        kernel,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


def _rows_dot_abstract(x, kernel, *, precision, preferred_element_type):
    del precision
    dtype = preferred_element_type
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype)
    return jax.core.ShapedArray((*x.shape[:-1], kernel.shape[-1]), dtype)


def _rows_dot_transpose_x(ct, x, kernel, *, precision, preferred_element_type):
    del preferred_element_type
    return rows_dot(ct, kernel.T, precision, x.aval.dtype)


def _rows_dot_transpose_kernel(ct, x, kernel, *, precision, preferred_element_type):
    del preferred_element_type
    return lax.dot_general(
        x.reshape(-1, x.shape[-1]),
        ct.reshape(-1, ct.shape[-1]),
        (((0,), (0,)), ((), ())),  # Contract all the rows at once.
        precision=precision,
        preferred_element_type=kernel.aval.dtype,
    )


def _rows_dot_batch(args, dims, *, precision, preferred_element_type):
    (x, kernel), (x_dim, kernel_dim) = args, dims
    if kernel_dim is None:  # A shared kernel: the vmap's axis becomes more rows.
        return rows_dot(jnp.moveaxis(x, x_dim, 0), kernel, precision, preferred_element_type), 0
    impl = functools.partial(
        _rows_dot_impl, precision=precision, preferred_element_type=preferred_element_type
    )
    return jax.vmap(impl, in_axes=(x_dim, kernel_dim))(x, kernel), 0


_rows_dot_p.def_impl(_rows_dot_impl)
_rows_dot_p.def_abstract_eval(_rows_dot_abstract)
ad.defbilinear(_rows_dot_p, _rows_dot_transpose_x, _rows_dot_transpose_kernel)
batching.primitive_batchers[_rows_dot_p] = _rows_dot_batch
mlir.register_lowering(_rows_dot_p, mlir.lower_fun(_rows_dot_impl, False))


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: its product is `rows_dot`."""
    if rhs.ndim == 2 and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())):
        return rows_dot(lhs, rhs, precision, preferred_element_type)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def _linear(
    module: nn.Module, params: dict[str, jax.Array], x: jax.Array, rows: bool, **fields
) -> jax.Array:
    """The layer's own map (dense or convolution) of `x` under `params`, as an unbound copy of
    it with `fields` changed; with `rows`, a Dense layer with the default product multiplies
    by `rows_dot`."""
    dense = isinstance(module, nn.Dense)
    if rows and dense and module.dot_general is None and module.dot_general_cls is None:
        fields["dot_general"] = _dense_dot_general
    return module.clone(parent=None, **fields).apply({"params": params}, x)


def _without_bias(module: nn.Module, kernel: jax.Array, x: jax.Array, rows: bool) -> jax.Array:
    """The layer's own linear map (dense or convolution) of `x` by `kernel`, without bias."""
    return _linear(module, {"kernel": kernel}, x, rows, use_bias=False)


def _local_reparam(
    module: nn.Module, mean: jax.Array, x: jax.Array, generator: str, rows: bool
) -> jax.Array:
    """Samples the pre-activations b ~ N(mean, x² σ_W² + σ_b²), one draw per output."""
    sigma = module.variables["sigma"]
    # A bfloat16 layer (model.dtype) multiplies in bfloat16; the noise and the sum are float32.
    mean = _at_least_float32(mean)
    variance = _without_bias(module, jnp.square(sigma["kernel"]), jnp.square(x), rows)
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
    # ΔW is drawn per MC sample: no shared kernel for `rows_dot` to take the samples as rows.
    perturbation = _at_least_float32(_without_bias(module, delta["kernel"], x * sign_in, False))
    if "bias" in delta:
        perturbation = perturbation + delta["bias"]
    return shared(mean, perturbation) + perturbation * sign_out


def _own_variables(module: nn.Module, collection: str) -> dict[str, Any]:
    """The variables a module holds itself, not those of its submodules."""
    variables = module.variables.get(collection, {})
    return {k: v for k, v in variables.items() if not isinstance(v, Mapping)}


def _make_interceptor(estimator: str, generator: str, rows: bool):
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
        mean = _linear(module, _own_variables(module, "params"), x, rows)  # x μ + b
        if estimator == "local_reparam":
            return _local_reparam(module, mean, x, generator, rows)
        return _flipout(module, mean, x, generator)

    return interceptor


def apply_local(
    model: nn.Module,
    posterior: MeanFieldGaussian,
    x: jax.Array,
    key: jax.Array,
    estimator: str,
    rngs: dict[str, jax.Array] | None = None,
    noise: PyTree | None = None,
    samples_as_rows: bool = True,
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
      samples_as_rows: under a vmap over MC samples, multiply each Dense layer's shared kernel
        (μ, σ²) by all the samples' inputs as the rows of one product (`rows_dot`). False
        keeps `lax.dot_general`'s batching, for a device mesh: there the merged rows would
        mix the "samples" and "data" shardings, and XLA would gather the activations.
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
    with nn.intercept_methods(_make_interceptor(estimator, generator, samples_as_rows)):
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
