"""The mean-field Gaussian variational posterior q(w | θ) of Bayes by Backprop.

Blundell et al. (2015), "Weight Uncertainty in Neural Networks", §3.2: every weight has an
independent Gaussian posterior with mean μ and standard deviation σ = softplus(ρ) = log(1 + e^ρ),
so that σ > 0 for any real ρ. A sample is drawn by the reparameterisation trick,
w = μ + σ ∘ ε with ε ~ N(0, I), so that gradients flow through μ and ρ.

`MeanFieldGaussian` is a pure pytree: its `mu` and `rho` fields mirror the parameter pytree of
any Flax model, leaf for leaf, and it can be passed through `jit`, `vmap` and Optax.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from bbb.errors import check_choice
from bbb.special import HALF_LOG_2PI, horner, materialize, softplus

PyTree = Any


def inverse_softplus(sigma: jax.Array | float) -> jax.Array:
    """ρ such that softplus(ρ) = σ, for σ > 0 (stable for small and large σ).

    Args:
      sigma: a positive standard deviation.

    Returns:
      ρ = log(expm1(σ)), computed as σ + log(−expm1(−σ)).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma + jnp.log(-jnp.expm1(-sigma))


def _sum_leaves(tree: PyTree) -> jax.Array:
    return sum((jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree)), jnp.float32(0.0))


def split_like(key: jax.Array, tree: PyTree) -> PyTree:
    """One independent key per leaf of `tree`, as a pytree of the same structure.

    Args:
      key: a JAX PRNG key.
      tree: any pytree.

    Returns:
      A pytree of keys with the structure of `tree`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(treedef, list(jax.random.split(key, len(leaves))))


NOISE_GENERATORS = ("jax", "hash")


def _mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser with full avalanche (the "lowbias32" constants)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_normal(key: jax.Array, n: int) -> jax.Array:
    """n standard normals from a counter-based hash seeded by `key`: 3× cheaper than threefry.

    Two 32-bit seeds are drawn from `key` with JAX's own PRNG; number i is
    √2 · erfinv(2u − 1), u = (mix(mix(i·φ + s₀) ⊕ s₁) >> 9 + ½) / 2²³. The mixer is a
    full-avalanche integer hash, so the stream passes the moment, Kolmogorov–Smirnov and
    correlation tests in tests/test_noise.py; but, unlike threefry, it carries no
    cryptographic guarantee that streams of different keys are independent. Monte-Carlo noise
    for variational inference needs no more; anything that does should keep "jax".

    Args:
      key: a PRNG key.
      n: how many numbers.

    Returns:
      float32 [n].
    """
    return map_hash_bits(key, n, bits_to_normal)


def hash_bits(key: jax.Array, n: int) -> jax.Array:
    """n uniform uint32 words, mix(mix(i·φ + s₀) ⊕ s₁), seeds s drawn from `key` (`hash_normal`)."""
    return map_hash_bits(key, n, lambda bits: bits)


def hash_counter(counter: jax.Array, seed: jax.Array) -> jax.Array:
    """mix(mix(counter·φ + s₀) ⊕ s₁), elementwise: the words of `hash_bits`, seeds `seed` [2]."""
    return _mix32(_mix32(counter * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])


def map_hash_bits(key: jax.Array, n: int, f: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """f(hash_bits(key, n)) for an elementwise f, with the counters laid out as two rows.

    The bits are those of one flat counter i = 0, …, n − 1, bit for bit; only the loop that
    XLA compiles differs. From a flat `iota`, XLA:CPU carried the counter in 64-bit lanes (a
    512-bit register on an AVX-512 CPU) and the noise ran 1.4–1.6× slower on an Intel Xeon;
    at an odd n that loop ran 5–6× slower (docs/performance.md, "The noise's loop"). As two
    rows of ⌊n/2⌋ (i = row · ⌊n/2⌋ + column; an odd n's last number on its own), the loop
    keeps 32-bit lanes and an even length. f runs on each part before they are joined, so
    that its work stays in that loop.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    half = n // 2
    parts = []
    if half:
        row = jax.lax.broadcasted_iota(jnp.uint32, (2, half), 0)
        column = jax.lax.broadcasted_iota(jnp.uint32, (2, half), 1)
        parts.append(f(hash_counter(row * jnp.uint32(half) + column, seed)).reshape(2 * half))
    if n % 2 or not parts:
        parts.append(f(hash_counter(jnp.arange(2 * half, n, dtype=jnp.uint32), seed)))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def standard_normal(
    key: jax.Array, shape: tuple[int, ...], generator: str = "jax", dtype: Any = jnp.float32
) -> jax.Array:
    """N(0, 1) noise of `shape` from `generator`: "jax" (`jax.random.normal`) or "hash".

    The per-example noise of the local reparameterisation comes from here, so that
    `posterior.noise` chooses the generator of all of an estimator's noise.
    """
    check_choice("posterior.noise", generator, NOISE_GENERATORS)
    if generator == "hash":
        return hash_normal(key, math.prod(shape)).reshape(shape).astype(dtype)
    return jax.random.normal(key, shape, dtype)


def rademacher(key: jax.Array, shape: tuple[int, ...], generator: str = "jax") -> jax.Array:
    """Random signs ±1 (float32) of `shape`, each with probability ½, from `generator`.

    "hash" takes the top bit of `hash_bits` (flipout's sign vectors).
    """
    check_choice("posterior.noise", generator, NOISE_GENERATORS)
    if generator == "hash":
        signs = map_hash_bits(key, math.prod(shape), _top_bit_sign)
        return signs.reshape(shape)
    return jax.random.rademacher(key, shape, dtype=jnp.int8).astype(jnp.float32)


def _top_bit_sign(bits: jax.Array) -> jax.Array:
    """1 − 2 · (the top bit), float32: ±1 (`rademacher`)."""
    return 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)


# √2 · erfinv(u) / u as a polynomial in s = w / 7.625 − 1, w = −log(1 − u²) ∈ [0, 15.25]: the
# monomial form of a degree-16 Chebyshev least-squares fit in float64 to scipy's erfinv at
# 397,000 of the 2²³ values of u that `bits_to_normal` takes (every 31st, and all of the 2¹⁶
# nearest each end).
_NORMAL_QUANTILE_OVER_U = (
    3.6692911162912853,
    1.9437505814764002,
    -0.43898295477238725,
    0.16175511353750102,
    -0.036443640828993394,
    -0.03276469471676438,
    0.0635437665460443,
    -0.06351494367169948,
    0.030782608731192262,
    0.0026270215315590366,
    0.013559455064394696,
    -0.004177501238535291,
    -0.05744590061540503,
    0.023959768267233218,
    0.040805733551290656,
    -0.010870532116216832,
    -0.01103123079227407,
)


def bits_to_normal(bits: jax.Array) -> jax.Array:
    """Maps uniform uint32 bits to N(0, 1) by the inverse CDF, finite for every input.

    The top 23 bits k give u = (k + ½) / 2²² − 1 ∈ (−1, 1), exact in float32, as do 1 + u and
    1 − u (with 24 bits, k + ½ would round up to 2²⁴ and the quantile be infinite), so
    |z| ≤ 5.3. z = u · P(w), w = −log((1 + u)(1 − u)), P a degree-16 polynomial
    (`_NORMAL_QUANTILE_OVER_U`): one `log` and sixteen multiply-adds, with no branch. Over all
    2²³ inputs it is within 7 ulp of float64's √2 · erfinv(u) (`jax.lax.erf_inv`, whose float32
    approximation evaluates both of its branches and a `log1p`, is up to 91 ulp off), and
    exactly antisymmetric: bits k and 2²³ − 1 − k give z and −z.

    Args:
      bits: uint32 array.

    Returns:
      float32 normals, shape of `bits`.
    """
    with jax.named_scope("normal_quantile"):
        one_plus_u = ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0**-22)
        one_minus_u = 2.0 - one_plus_u
        w = -jnp.log(one_plus_u * one_minus_u)
        z = (one_plus_u - 1.0) * horner(_NORMAL_QUANTILE_OVER_U, w * (1.0 / 7.625) - 1.0)
        return materialize(z)


# Longest sample axis summed by adds in order; beyond it, by a product with ones (`sum_samples`).
_MAX_UNROLLED_SUM = 16


def sum_samples(x: jax.Array) -> jax.Array:
    """Σ over the leading (sample) axis of `x`.

    XLA's CPU backend reduces a leading axis of a 3-D array at ~10 ns per element, 60–85×
    slower than the same sum as adds ([8, 784, 400]: 26 ms against 0.3 ms; [2, 1200, 1200]:
    29 ms against 0.5 ms; [128, 784, 400]: 954 ms against 14 ms as a product with a vector of
    ones, on this project's 2-core CPU; the effect on the step: docs/performance.md). So on
    the CPU, up to 16 samples are added in order, x[0] + x[1] + … (one fused elementwise
    pass), and more are contracted with ones (a matrix-vector product). Other backends use
    `jnp.sum`.

    Args:
      x: an array [K, ...].

    Returns:
      The sum, shape x.shape[1:].
    """
    if jax.default_backend() != "cpu":
        return jnp.sum(x, axis=0)
    if x.shape[0] > _MAX_UNROLLED_SUM:
        return jnp.tensordot(jnp.ones(x.shape[:1], x.dtype), x, axes=(0, 0))
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


# Two primitives, each with its own vmap, JVP and transpose rules, so that `shared` works under
# jit, vmap, grad and forward mode, and under nested vmaps (a sweep's members around the samples).
_tile_p = Primitive("bbb_tile_samples")  # x ↦ K copies of x on a new leading axis.
_shared_p = Primitive("bbb_shared")  # (x, like) ↦ x; a batched copy of x under a vmap of like.


def _tile(x: jax.Array, size: int) -> jax.Array:
    return _tile_p.bind(x, size=size)


def _tile_abstract(x, *, size):
    return jax.core.ShapedArray((size, *x.shape), x.dtype)


def _tile_transpose(ct, x, *, size):
    del size
    return (ad.Zero(x.aval) if type(ct) is ad.Zero else sum_samples(ct),)


def _tile_batch(args, dims, *, size):
    (x,), (dim,) = args, dims
    return _tile(jnp.moveaxis(x, dim, 0), size), 1  # [K, batch, ...]


def _tile_impl(x: jax.Array, *, size: int) -> jax.Array:
    return jnp.broadcast_to(x, (size, *x.shape))


_tile_p.def_impl(_tile_impl)
_tile_p.def_abstract_eval(_tile_abstract)
ad.deflinear2(_tile_p, _tile_transpose)
batching.primitive_batchers[_tile_p] = _tile_batch
mlir.register_lowering(_tile_p, mlir.lower_fun(_tile_impl, False))


def shared(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` itself; under `jax.vmap`, if `like` is batched and `x` is not, a batched copy.

    The Monte-Carlo samples of the free energy are a `jax.vmap`. A value shared by all
    samples (μ and σ of the weights, the first layer's pre-activation mean) meets per-sample
    noise there, and reverse mode sums its cotangent over the samples with a reduction that
    XLA:CPU runs slowly (`sum_samples`). Passing the value through `shared` where it meets the
    noise (`like`) makes that sum `sum_samples`. Same values, same gradients; with 2 samples,
    the reparameterisation step at H = 400 runs about twice as fast (docs/performance.md).

    Args:
      x: an array.
      like: an array that is batched wherever the copy of `x` should be (only its batching
        matters; no gradient flows to it).

    Returns:
      `x`.
    """
    return _shared_p.bind(x, like)


def _shared_jvp(primals, tangents):
    x, like = primals
    tangent = tangents[0]
    if type(tangent) is ad.Zero:
        return shared(x, like), tangent
    return shared(x, like), shared(tangent, like)


def _shared_transpose(ct, x, like):
    del x, like
    return ct, None


def _shared_batch(args, dims):
    (x, like), (x_dim, like_dim) = args, dims
    if x_dim is None:  # Shared here, and perhaps by an outer vmap too: mark it there as well.
        return _tile(shared(x, like), like.shape[like_dim]), 0
    return x, x_dim  # Already per sample.


def _first(x, like):
    return x


_shared_p.def_impl(_first)
_shared_p.def_abstract_eval(_first)  # The aval of x.
ad.primitive_jvps[_shared_p] = _shared_jvp
ad.primitive_transposes[_shared_p] = _shared_transpose
batching.primitive_batchers[_shared_p] = _shared_batch
mlir.register_lowering(_shared_p, mlir.lower_fun(_first, False))


def normal_like(key: jax.Array, tree: PyTree, generator: str = "jax") -> PyTree:
    """Standard normal noise shaped like `tree`, drawn in one call for all of its leaves.

    One draw of n numbers, sliced into the leaves, compiles to one RNG kernel instead of one
    per leaf: about 5× faster to compile on the CPU, and no slower to run.

    Args:
      key: a PRNG key.
      tree: a pytree of arrays (float32).
      generator: "jax" (`jax.random.normal`, the key's own implementation, threefry by
        default) or "hash" (`hash_normal`, about 3× faster on a CPU).

    Returns:
      ε ~ N(0, I), a pytree like `tree`.
    """
    check_choice("posterior.noise", generator, NOISE_GENERATORS)
    n = count_params(tree)
    if generator == "hash":
        flat = hash_normal(key, n)
    else:
        flat = materialize(jax.random.normal(key, (n,), jnp.float32))
    return unflatten_like(flat, tree)


def unflatten_like(flat: jax.Array, tree: PyTree) -> PyTree:
    """`flat` [n] cut into consecutive pieces shaped (and typed) like the leaves of `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    offsets = [0, *itertools.accumulate(leaf.size for leaf in leaves)]
    pieces = [
        flat[start:stop].reshape(leaf.shape).astype(leaf.dtype)
        for start, stop, leaf in zip(offsets[:-1], offsets[1:], leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, pieces)


@flax.struct.dataclass
class MeanFieldGaussian:
    """q(w) = Π_i N(w_i | μ_i, softplus(ρ_i)²), over a parameter pytree.

    Attributes:
      mu: the means, a pytree with the structure of the model's parameters.
      rho: the unconstrained scales, same structure; σ = softplus(ρ).
      noise: how ε is drawn, "jax" or "hash" (see `normal_like`); static, not a leaf. The
        estimators draw their per-example noise and signs with it too (`standard_normal`,
        `rademacher`).
      pytree_class: the module-qualified name of the instance's class, set on construction;
        static. JAX compares the treedefs of two dataclass pytrees by their fields and static
        values, not by their class, so without it a subclass with the same fields (an ablation,
        or a user's own posterior) would have a treedef equal to this class's but hashing
        differently, and a jit cache whose buckets collide could hand one the other's trace.
    """

    mu: PyTree
    rho: PyTree
    noise: str = flax.struct.field(pytree_node=False, default="jax")
    pytree_class: str = flax.struct.field(pytree_node=False, default="", repr=False, kw_only=True)

    def __post_init__(self):
        cls = type(self)
        object.__setattr__(self, "pytree_class", f"{cls.__module__}.{cls.__qualname__}")

    def mean(self) -> PyTree:
        """The posterior mean weights μ (also the mode)."""
        return self.mu

    def stddev(self) -> PyTree:
        """The posterior standard deviations σ = softplus(ρ), a pytree like `mu`."""
        return jax.tree_util.tree_map(softplus, self.rho)

    def sample_noise(self, key: jax.Array) -> PyTree:
        """Standard normal ε with the structure of `mu` (one draw per weight).

        Args:
          key: a PRNG key.

        Returns:
          A pytree of ε ~ N(0, I), float32, like `mu`.
        """
        return normal_like(key, self.mu, self.noise)

    def sample(self, key: jax.Array) -> PyTree:
        """One reparameterised sample w = μ + σ ∘ ε.

        Args:
          key: a PRNG key.

        Returns:
          A parameter pytree like `mu`, differentiable with respect to μ and ρ.
        """
        return self.sample_and_log_prob(key)[0]

    def sample_and_log_prob(self, key: jax.Array) -> tuple[PyTree, jax.Array]:
        """A sample w = μ + σ ∘ ε and log q(w), computed from ε without cancellation.

        log q(w) = Σ_i [−½ ε_i² − log σ_i − ½ log 2π]. Its total derivative with respect to
        (μ, ρ) at fixed ε equals that of log q(w(θ, ε) | θ) in Blundell et al. (2015), eq. (3):
        the path through w and the direct path sum to −∂ log σ.

        Args:
          key: a PRNG key.

        Returns:
          (w, log q(w)), w a pytree like `mu` and log q a float32 scalar.
        """
        return self.reparameterize(self.sample_noise(key))

    def reparameterize(self, eps: PyTree) -> tuple[PyTree, jax.Array]:
        """(w = μ + σ ∘ ε, log q(w)) for given noise ε, as `sample_and_log_prob` draws it.

        Flipout (`bbb.estimators`) perturbs its layers by σ ∘ ε and takes the MC KL at
        w = μ + σ ∘ ε with the same ε, as the paper's estimator takes the likelihood and the
        KL at one weight sample.

        Args:
          eps: standard normal noise like `mu` (from `sample_noise`).

        Returns:
          (w, log q(w)).
        """
        sigma = self.stddev()
        # μ, σ and log σ are computed once and `shared` by the Monte-Carlo samples (a vmap).
        w = jax.tree_util.tree_map(
            lambda m, s, e: shared(m, e) + shared(s, e) * e, self.mu, sigma, eps
        )
        log_q = _sum_leaves(
            jax.tree_util.tree_map(
                lambda s, e: -0.5 * jnp.square(e) - shared(jnp.log(s), e) - HALF_LOG_2PI,
                sigma,
                eps,
            )
        )
        return w, log_q

    def log_prob(self, w: PyTree) -> jax.Array:
        """log q(w), summed over every weight.

        Args:
          w: a parameter pytree like `mu`.

        Returns:
          A float32 scalar.
        """
        sigma = self.stddev()
        return _sum_leaves(
            jax.tree_util.tree_map(
                lambda x, m, s: -0.5 * jnp.square((x - m) / s) - jnp.log(s) - HALF_LOG_2PI,
                w,
                self.mu,
                sigma,
            )
        )

    def entropy(self) -> jax.Array:
        """H[q] = Σ_i (½ log 2πe + log σ_i), in nats."""
        return _sum_leaves(
            jax.tree_util.tree_map(lambda s: jnp.log(s) + HALF_LOG_2PI + 0.5, self.stddev())
        )

    def signal_to_noise(self) -> PyTree:
        """|μ| / σ per weight (Blundell et al. 2015, §5.1, used for pruning)."""
        return jax.tree_util.tree_map(lambda m, s: jnp.abs(m) / s, self.mu, self.stddev())

    def num_weights(self) -> int:
        """n, the number of model weights (the posterior has 2n variational parameters)."""
        return count_params(self.mu)

    def num_variational_params(self) -> int:
        """2n: one μ and one ρ per weight."""
        return 2 * self.num_weights()


def count_params(tree: PyTree) -> int:
    """The number of scalars in a pytree of arrays.

    Args:
      tree: a pytree of arrays.

    Returns:
      The total number of elements.
    """
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def init_rho(key: jax.Array, params: PyTree, init: float | Sequence[float]) -> PyTree:
    """Initial ρ: a constant, or uniform in [low, high), for every weight.

    Args:
      key: a PRNG key (used only for the uniform case).
      params: a pytree giving the shapes.
      init: a float ρ₀, or a pair (low, high) for ρ ~ U(low, high) (a reproduction of the paper
        uses U(−3.5, −3); another uses −8).

    Returns:
      A pytree like `params`.
    """
    if isinstance(init, int | float):
        return jax.tree_util.tree_map(lambda p: jnp.full(p.shape, init, jnp.float32), params)
    low, high = init
    keys = split_like(key, params)
    return jax.tree_util.tree_map(
        lambda k, p: jax.random.uniform(k, p.shape, jnp.float32, low, high), keys, params
    )


def init_posterior(
    key: jax.Array,
    params: PyTree,
    init_rho_value: float | Sequence[float] = -6.0,
    mu_scale: float = 1.0,
    noise: str = "jax",
) -> MeanFieldGaussian:
    """A mean-field posterior around a Flax model's own initial parameters.

    Args:
      key: a PRNG key for ρ (the means come from `params`, drawn by the model's initialiser).
      params: the model's parameter pytree, e.g. `model.init(key, x)["params"]`.
      init_rho_value: ρ₀ as a float, or (low, high) for a uniform draw.
      mu_scale: multiplies the model's initial weights to give μ₀.
      noise: the noise generator, "jax" or "hash" (see `normal_like`).

    Returns:
      The posterior, in float32.
    """
    mu = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32) * mu_scale, params)
    return MeanFieldGaussian(mu=mu, rho=init_rho(key, mu, init_rho_value), noise=noise)


@flax.struct.dataclass
class PointEstimate:
    """A point mass at `mu`: the deterministic baselines (plain SGD, dropout) in the same loop.

    Sampling returns `mu` itself and log q is taken as 0, so the free energy reduces to the
    negative log-likelihood (and −log P(w), a weight penalty, if the prior is not flat).

    Attributes:
      mu: the parameter pytree.
    """

    mu: PyTree

    def mean(self) -> PyTree:
        """The parameters."""
        return self.mu

    def stddev(self) -> PyTree:
        """Zeros like `mu`."""
        return jax.tree_util.tree_map(jnp.zeros_like, self.mu)

    def sample(self, key: jax.Array) -> PyTree:
        """Returns `mu` (the key is unused)."""
        return self.mu

    def sample_and_log_prob(self, key: jax.Array) -> tuple[PyTree, jax.Array]:
        """Returns (`mu`, 0)."""
        return self.mu, jnp.float32(0.0)

    def sample_noise(self, key: jax.Array) -> PyTree:
        """Zeros like `mu`: a point mass has no noise (so flipout's ΔW = σ ∘ ε is 0 too)."""
        return jax.tree_util.tree_map(jnp.zeros_like, self.mu)

    def reparameterize(self, eps: PyTree) -> tuple[PyTree, jax.Array]:
        """Returns (`mu`, 0) whatever `eps`, as `sample_and_log_prob`."""
        return self.mu, jnp.float32(0.0)

    def num_weights(self) -> int:
        """The number of parameters."""
        return count_params(self.mu)

    def num_variational_params(self) -> int:
        """The number of trained parameters (one per weight)."""
        return self.num_weights()
