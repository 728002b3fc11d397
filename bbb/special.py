"""Elementwise special functions for the weight-space work: cheaper than `jnp`'s, as accurate.

Every weight of a Bayes by Backprop step passes through `softplus` (σ = softplus(ρ)) and, under
the paper's scale-mixture prior, a `logaddexp` of the two components' log densities. In `jnp`,
each evaluates `exp` and `log1p`, and its derivative another `exp`: transcendental functions,
which bound the step's elementwise work on a CPU (docs/performance.md). Here log1p(t) is
needed only on t = e^−|x| ∈ (0, 1], where a polynomial fitted in float64 does it in ten
multiply-adds, and the derivatives reuse t (custom JVPs, themselves differentiable).
`materialize` (used for the noise, in bbb/posterior.py) lives here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)  # ½ log 2π, of every Gaussian log density.


def materialize(x: jax.Array) -> jax.Array:
    """`x`, bit for bit, but computed once into memory rather than inside each consumer.

    XLA fuses a chain of cheap elementwise operations into every fusion that reads it, so on
    a CPU the hash and the inverse-CDF polynomial of the noise were recomputed in each of the
    ~5 fusions (forward, log q, log P, gradients) that read ε (storing it once made the H=400
    reparam step with the hash noise 25% faster, docs/performance.md). XLA does not
    duplicate a floating-point division, so `x · d / d`, with d = 2 where x = 1 and 1
    elsewhere (exact either way: scaling by 2 is exact away from overflow), ends the chain in
    one: the chain is fused into that division and its result is stored.
    (Subnormal inputs come out as 0, as from any arithmetic on XLA's CPU backend; noise has
    none.)
    """
    d = jnp.where(x == 1.0, jnp.asarray(2.0, x.dtype), jnp.asarray(1.0, x.dtype))
    return (x * d) / d


# log1p(t) / t on t ∈ [0, 1] as a polynomial in s = 2t − 1: the monomial form of a degree-10
# Chebyshev least-squares fit in float64 (numpy.polynomial.chebyshev.chebfit on 200,001 points,
# then cheb2poly); relative error 1.3e-8, under float32's half ulp.
_LOG1P_OVER_T = (
    0.810930216150849,
    -0.1442635542753998,
    0.03315244350196881,
    -0.008460979157622542,
    0.0022881783728893796,
    -0.0006427479037872736,
    0.00018518144900312152,
    -5.284912048618411e-05,
    1.5606716704604714e-05,
    -6.277414797250783e-06,
    1.963782514230283e-06,
)


def horner(coefficients: Sequence[float], s: jax.Array) -> jax.Array:
    """Σ_i c_i s^i by Horner's rule, in the dtype of `s`."""
    acc = jnp.asarray(coefficients[-1], s.dtype)
    for c in coefficients[-2::-1]:
        acc = acc * s + jnp.asarray(c, s.dtype)
    return acc


def _log1p_unit(t: jax.Array) -> jax.Array:
    """log1p(t) for t ∈ [0, 1], as t times the polynomial `_LOG1P_OVER_T`."""
    return t * horner(_LOG1P_OVER_T, 2.0 * t - 1.0)


def _sigmoid_pair(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sigmoid(|x|), sigmoid(−|x|)) = (1 / (1 + t), t / (1 + t)) from t = e^−|x|."""
    return jnp.ones_like(t) / (1.0 + t), t / (1.0 + t)


def _softplus_parts(rho: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t, softplus(ρ)), t = e^−|ρ| ∈ (0, 1]: softplus(ρ) = max(ρ, 0) + log1p(t).

    σ is stored once (`materialize`): XLA would otherwise fuse the polynomial into several of
    σ's readers (the sample, log q, the gradients) and evaluate it in each.
    """
    t = jnp.exp(-jnp.abs(rho))
    return t, materialize(jnp.maximum(rho, 0.0) + _log1p_unit(t))


def _float_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The arrays' common dtype as `jnp` would compute in it: integers and bools as float32."""
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


@jax.custom_jvp
def _softplus32(rho: jax.Array) -> jax.Array:
    return _softplus_parts(rho)[1]


@_softplus32.defjvp
def _softplus32_jvp(primals, tangents):
    (rho,), (rho_dot,) = primals, tangents
    t, sigma = _softplus_parts(rho)
    larger, smaller = _sigmoid_pair(t)  # sigmoid(ρ) from the same t
    return sigma, jnp.where(rho >= 0.0, larger, smaller) * rho_dot


def softplus(rho: jax.Array) -> jax.Array:
    """σ = log(1 + exp(ρ)), finite and accurate to a few ulp for every float32 ρ.

    Computed as max(ρ, 0) + log1p(t), t = e^−|ρ| ∈ (0, 1], never overflowing and keeping full
    relative precision for very negative ρ (softplus(−30) ≈ 9.4e−14), where
    `log(1 + exp(ρ))` would round to zero. On t ∈ [0, 1], log1p(t) is t times a degree-10
    polynomial (fitted in float64, `_LOG1P_OVER_T`): one `exp` and ten multiply-adds, where
    `jnp.logaddexp(ρ, 0)` evaluates `exp` and `log1p`. At most 2.3 ulp from float64 over
    [−90, 90] (`jnp.logaddexp`: 2.7), and cheaper (docs/performance.md). The derivative
    sigmoid(ρ) reuses t (a custom JVP), so the backward pass costs one division. float64
    inputs take `jnp.logaddexp`, whose precision the polynomial does not reach.

    Args:
      rho: the unconstrained parameter.

    Returns:
      σ, with the shape of `rho`.
    """
    rho = jnp.asarray(rho)
    dtype = _float_dtype(rho)
    if dtype == jnp.float64:
        return jnp.logaddexp(rho, 0.0)
    return _softplus32(rho.astype(dtype))


@jax.custom_jvp
def _logaddexp32(a: jax.Array, b: jax.Array) -> jax.Array:
    return _logaddexp_parts(a, b)[1]


def _logaddexp_parts(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(t, log(e^a + e^b)), t = e^−|a − b|; equal infinities give a + b, as in `jnp`."""
    delta = a - b
    t = jnp.exp(-jnp.abs(delta))
    out = jnp.maximum(a, b) + _log1p_unit(t)
    return t, jnp.where(jnp.isnan(delta), a + b, out)


@_logaddexp32.defjvp
def _logaddexp32_jvp(primals, tangents):
    (a, b), (a_dot, b_dot) = primals, tangents
    t, out = _logaddexp_parts(a, b)
    # The weights sigmoid(a − b) and sigmoid(b − a), both from the same t.
    larger, smaller = _sigmoid_pair(t)
    a_wins = a >= b
    return out, jnp.where(a_wins, larger, smaller) * a_dot + jnp.where(
        a_wins, smaller, larger
    ) * b_dot


def logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(e^a + e^b) = max(a, b) + log1p(e^−|a − b|), as `jnp.logaddexp`, with one `exp` and
    the polynomial log1p. Within 3 ulp of float64 (ulps of the larger of |max(a, b)| and the
    result), and never further than `jnp.logaddexp` by more than one; its derivatives are the
    two components' weights sigmoid(±(a − b)), from the same exponential. float64 takes
    `jnp.logaddexp`.

    Args:
      a, b: arrays (broadcast against each other).

    Returns:
      log(e^a + e^b).
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    dtype = _float_dtype(a, b)
    if dtype == jnp.float64:
        return jnp.logaddexp(a, b)
    a, b = jnp.broadcast_arrays(a.astype(dtype), b.astype(dtype))
    return _logaddexp32(a, b)
