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
from jax import lax

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


# e^r on r ∈ [−ln 2 / 2, ln 2 / 2]: the monomial form of a degree-6 Chebyshev least-squares fit
# in float64 (as `_LOG1P_OVER_T`, in the variable r / (ln 2 / 2), then rescaled); relative error
# 6.2e-9, under float32's half ulp.
_EXP_SMALL = (
    0.9999999999718424,
    1.0000000281364971,
    0.5000000084379258,
    0.16666455914292969,
    0.04166628040934905,
    0.008371908716367091,
    0.0013944595729011202,
)
# ln 2 in two parts (Cody and Waite): the first has 9 trailing zero bits, so n · _LN2_HI is exact
# in float32 for every |n| ≤ 127 that `exp_nonpositive` meets.
_LN2_HI = 0.693145751953125
_LN2_LO = 1.4286068202862268e-06
# log of float32's smallest normal number: below it e^x is 0 (XLA's CPU backend flushes
# subnormal results to zero, so `jnp.exp` gives 0 there too).
_EXP_UNDERFLOW = -87.33654


def exp_nonpositive(x: jax.Array) -> jax.Array:
    """e^x for x ≤ 0 (or −∞), within 1.5 float32 ulp (`jnp.exp`: 1.0), in multiply-adds only.

    x = n ln 2 + r with n = round(x / ln 2) and |r| ≤ ln 2 / 2; e^x = 2^n e^r, e^r by the
    polynomial `_EXP_SMALL` and 2^n written into the float's exponent bits. What it buys is
    not speed of its own (about `jnp.exp`'s on a CPU) but where it is computed: XLA does
    not duplicate `exp` into the fusions that read it, so it stores the result and each
    reader loads it; this chain of cheap operations it fuses into each reader instead
    (`e_minus_abs`). Results below float32's smallest normal number are 0, as `jnp.exp`'s on
    XLA's CPU backend (which flushes subnormals); NaN gives NaN. Not float32: `jnp.exp`.

    Args:
      x: an array of non-positive values (positive ones are not supported: 2^n overflows).

    Returns:
      e^x.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        return jnp.exp(x)
    clipped = jnp.maximum(x, -88.0)  # keeps n + 127 ≥ 0 below; NaN stays NaN
    n = jnp.round(clipped * (1.0 / math.log(2.0)))
    r = (clipped - n * _LN2_HI) - n * _LN2_LO
    two_to_n = lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)
    return jnp.where(x < _EXP_UNDERFLOW, 0.0, horner(_EXP_SMALL, r) * two_to_n)


# From this many elements on, an array no longer fits a core's L2 cache (2 MiB of float32 on the
# Intel Xeon VM of docs/performance.md), and `e_minus_abs` recomputes e^−|x| in each reader
# rather than store it.
RECOMPUTE_MIN_SIZE = 2**19


def e_minus_abs(x: jax.Array) -> jax.Array:
    """t = e^−|x| for `logaddexp`, which reads it twice: in log1p(t) in the forward pass, and in
    the sigmoids of its derivative in the backward pass.

    A small array is cheaper stored once and read back from the cache (`jnp.exp`, which XLA
    computes once); a large one cheaper computed twice than written to memory and read back
    (`exp_nonpositive`, which XLA fuses into both readers). The paper's step (`reparam`, the
    scale-mixture prior's MC KL, whose log-prior takes a `logaddexp` of every sampled weight)
    took 0.82–0.84× the time at H = 1200 with the second; at H = 400 the first was faster
    (docs/performance.md, "e^−|x| stored or recomputed"). `softplus` keeps `jnp.exp`: there
    recomputing was slower at H = 1200 too.
    """
    if x.size >= RECOMPUTE_MIN_SIZE:
        return exp_nonpositive(-jnp.abs(x))
    return jnp.exp(-jnp.abs(x))


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
    t = e_minus_abs(delta)
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
