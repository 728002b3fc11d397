"""Priors P(w) over the weights, each summed over a parameter pytree.

- `Gaussian(sigma)`: N(0, σ²) (Blundell et al. 2015, §3.3, σ ∈ {e⁰, e⁻¹, e⁻²}).
- `ScaleMixture(pi, sigma1, sigma2)`: π N(0, σ1²) + (1 − π) N(0, σ2²), σ1 > σ2, σ2 ≪ 1
  (Blundell et al. 2015, eq. (7)). Computed in log space with log-sum-exp, so it stays finite
  for σ2 = e⁻¹⁰ and |w| up to 50.
- `Laplace(scale)` and `StudentT(df, scale)`: heavier tails, no closed-form KL.
- `learnable=True` on `Gaussian` and `ScaleMixture` makes the hyperparameters trainable
  (empirical Bayes, type-II maximum likelihood of the ELBO): they live in a small pytree that is
  optimised with μ and ρ. A trained σ is used clipped to [1e-15, 1e15], the scales a config may
  set, where float32 log densities stay finite.

A prior is chosen by name in the config (`config.prior.name`), or imported from user code
with `name="mypackage.mymodule:my_prior"`, where `my_prior(**fields)` returns a `Prior`.
The import runs that module's code and nothing else: no string is evaluated.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bbb import special
from bbb.errors import ConfigError, check_open_interval, check_positive
from bbb.posterior import MeanFieldGaussian

PyTree = Any


class ClosedFormUnavailableError(ConfigError):
    """`objective.kl="closed_form"` was asked for a prior that has no closed-form KL."""


class Prior:
    """A prior density over every weight, with optional trainable hyperparameters.

    Subclasses define `log_density` (elementwise); `log_prob` sums it over a pytree.
    """

    has_closed_form_kl: bool = False

    def init_params(self) -> dict[str, jax.Array]:
        """The trainable hyperparameters (an empty dict for a fixed prior)."""
        return {}

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        """log p(w) per element.

        Args:
          params: the hyperparameters from `init_params` (possibly trained).
          w: an array of weights.

        Returns:
          log p(w), elementwise, shape of `w`.
        """
        raise NotImplementedError

    def log_prob(self, params: dict[str, jax.Array], tree: PyTree) -> jax.Array:
        """log P(w) = Σ_i log p(w_i), summed over every leaf of `tree`.

        Args:
          params: the hyperparameters from `init_params`.
          tree: a weight pytree.

        Returns:
          A float32 scalar.
        """
        leaves = jax.tree_util.tree_leaves(tree)
        return sum((jnp.sum(self.log_density(params, w)) for w in leaves), jnp.float32(0.0))

    def kl(self, params: dict[str, jax.Array], posterior: MeanFieldGaussian) -> jax.Array:
        """KL[q ‖ P] in closed form, where one exists.

        Args:
          params: the hyperparameters from `init_params`.
          posterior: the mean-field Gaussian q.

        Returns:
          A float32 scalar.

        Raises:
          ClosedFormUnavailableError: this prior has no closed-form KL.
        """
        raise closed_form_unavailable(self)


def closed_form_unavailable(prior: Prior) -> ClosedFormUnavailableError:
    """The error for `objective.kl="closed_form"` with a prior that has no closed-form KL."""
    return ClosedFormUnavailableError(
        "objective.kl",
        "closed_form",
        f"'mc' for the {type(prior).__name__} prior, which has no closed-form KL against a "
        "Gaussian posterior (only the gaussian prior has one)",
    )


@dataclasses.dataclass(frozen=True)
class Gaussian(Prior):
    """N(0, σ²) on every weight; with `learnable`, σ is trained (as log σ)."""

    sigma: float = 1.0
    learnable: bool = False
    has_closed_form_kl = True

    def init_params(self) -> dict[str, jax.Array]:
        return {"log_sigma": jnp.float32(math.log(self.sigma))} if self.learnable else {}

    def _log_sigma(self, params: dict[str, jax.Array]) -> jax.Array:
        if self.learnable:
            return _clip_log_scale(params["log_sigma"])
        return jnp.float32(math.log(self.sigma))

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        log_sigma = self._log_sigma(params)
        return -0.5 * jnp.square(w * jnp.exp(-log_sigma)) - log_sigma - special.HALF_LOG_2PI

    def kl(self, params: dict[str, jax.Array], posterior: MeanFieldGaussian) -> jax.Array:
        """Σ_i [log(σ_p/σ_i) + (σ_i² + μ_i²) / (2σ_p²) − ½]."""
        log_sigma_p = self._log_sigma(params)
        inv_var_p = jnp.exp(-2.0 * log_sigma_p)

        def leaf_kl(mu: jax.Array, sigma: jax.Array) -> jax.Array:
            # The per-weight constant log σ_p − ½ is added once, n times, outside the sum: inside
            # it, XLA:CPU stored it broadcast to the leaf's shape (14 MB per step at H=1200).
            per_weight = -jnp.log(sigma) + 0.5 * (jnp.square(sigma) + jnp.square(mu)) * inv_var_p
            return jnp.sum(per_weight) + mu.size * (log_sigma_p - 0.5)

        leaves = jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(leaf_kl, posterior.mu, posterior.stddev())
        )
        return sum(leaves, jnp.float32(0.0))


@dataclasses.dataclass(frozen=True)
class ScaleMixture(Prior):
    """π N(0, σ1²) + (1 − π) N(0, σ2²) on every weight (Blundell et al. 2015, eq. (7)).

    With `learnable`, logit π, log σ1 and log σ2 are trained.
    """

    pi: float = 0.5
    sigma1: float = 1.0
    sigma2: float = math.exp(-6.0)
    learnable: bool = False

    def init_params(self) -> dict[str, jax.Array]:
        if not self.learnable:
            return {}
        return {
            "logit_pi": jnp.float32(math.log(self.pi) - math.log1p(-self.pi)),
            "log_sigma1": jnp.float32(math.log(self.sigma1)),
            "log_sigma2": jnp.float32(math.log(self.sigma2)),
        }

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        if self.learnable:
            log_pi = jax.nn.log_sigmoid(params["logit_pi"])
            log_1m_pi = jax.nn.log_sigmoid(-params["logit_pi"])
            log_sigma1 = _clip_log_scale(params["log_sigma1"])
            log_sigma2 = _clip_log_scale(params["log_sigma2"])
        else:
            log_pi, log_1m_pi = math.log(self.pi), math.log1p(-self.pi)
            log_sigma1, log_sigma2 = math.log(self.sigma1), math.log(self.sigma2)
        square = jnp.square(w)
        log_n1 = log_pi - log_sigma1 - 0.5 * square * jnp.exp(-2.0 * log_sigma1)
        log_n2 = log_1m_pi - log_sigma2 - 0.5 * square * jnp.exp(-2.0 * log_sigma2)
        return special.logaddexp(log_n1, log_n2) - special.HALF_LOG_2PI


@dataclasses.dataclass(frozen=True)
class Laplace(Prior):
    """Laplace(0, b): log p(w) = −|w|/b − log 2b."""

    scale: float = 1.0

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        return -jnp.abs(w) / self.scale - math.log(2.0 * self.scale)


@dataclasses.dataclass(frozen=True)
class StudentT(Prior):
    """Student's t with ν degrees of freedom and scale s, centred at 0."""

    df: float = 3.0
    scale: float = 1.0

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        nu, s = self.df, self.scale
        log_norm = (
            math.lgamma((nu + 1.0) / 2.0)
            - math.lgamma(nu / 2.0)
            - 0.5 * math.log(nu * math.pi)
            - math.log(s)
        )
        return log_norm - 0.5 * (nu + 1.0) * jnp.log1p(jnp.square(w / s) / nu)


@dataclasses.dataclass(frozen=True)
class Flat(Prior):
    """An improper flat prior, log p(w) = 0: maximum likelihood for the deterministic baselines."""

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        return jnp.zeros_like(w)


# Scales the float32 log densities handle: (w / σ)² stays finite for |w| up to ~10⁴, where
# below ~1e-19 it overflows and 0 · inf gives NaN log densities and gradients at w = 0.
_MIN_SCALE, _MAX_SCALE = 1e-15, 1e15


def _clip_log_scale(log_scale: jax.Array) -> jax.Array:
    """A trained log σ, held to the scales `_check_scale` admits: a hyperparameter that the
    optimiser drives past them keeps finite log densities (at the bound, with zero gradient
    outward) instead of overflowing into NaN."""
    return jnp.clip(log_scale, math.log(_MIN_SCALE), math.log(_MAX_SCALE))


def _check_scale(field: str, value: float) -> None:
    """Raises ConfigError unless `value` is a number in [1e-15, 1e15]."""
    check_positive(field, value)
    if not _MIN_SCALE <= value <= _MAX_SCALE:
        raise ConfigError(
            field, value, f"a scale in [{_MIN_SCALE:g}, {_MAX_SCALE:g}] (float32 log densities)"
        )


def gaussian(sigma: float = 1.0, learnable: bool = False) -> Gaussian:
    """The Gaussian prior N(0, σ²)."""
    _check_scale("prior.sigma", sigma)
    return Gaussian(sigma=float(sigma), learnable=bool(learnable))


def scale_mixture(
    pi: float = 0.5,
    sigma1: float = 1.0,
    sigma2: float = math.exp(-6.0),
    learnable: bool = False,
) -> ScaleMixture:
    """The scale-mixture prior π N(0, σ1²) + (1 − π) N(0, σ2²)."""
    check_open_interval("prior.pi", pi, 0.0, 1.0)
    _check_scale("prior.sigma1", sigma1)
    _check_scale("prior.sigma2", sigma2)
    return ScaleMixture(
        pi=float(pi), sigma1=float(sigma1), sigma2=float(sigma2), learnable=bool(learnable)
    )


def laplace(scale: float = 1.0) -> Laplace:
    """The Laplace prior with scale b."""
    _check_scale("prior.scale", scale)
    return Laplace(scale=float(scale))


def student_t(df: float = 3.0, scale: float = 1.0) -> StudentT:
    """Student's t prior with `df` degrees of freedom and scale `scale`."""
    check_positive("prior.df", df)
    _check_scale("prior.scale", scale)
    return StudentT(df=float(df), scale=float(scale))


def flat() -> Flat:
    """The improper flat prior (no regularisation)."""
    return Flat()


PRIORS: dict[str, Callable[..., Prior]] = {
    "gaussian": gaussian,
    "scale_mixture": scale_mixture,
    "laplace": laplace,
    "student_t": student_t,
    "flat": flat,
}


def _import_factory(name: str) -> Callable[..., Prior]:
    module_name, _, attr = name.partition(":")
    allowed = f"a built-in prior ({', '.join(PRIORS)}) or 'package.module:callable'"
    if not module_name or not attr or not attr.isidentifier():
        raise ConfigError("prior.name", name, allowed)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError("prior.name", name, f"{allowed}; importing failed: {e}") from e
    except Exception as e:  # The module's own code failed while it was imported.
        raise ConfigError(
            "prior.name", name, f"{allowed}; importing {module_name} raised {e!r}"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError("prior.name", name, f"{allowed}; {module_name} has no callable {attr}")
    return factory


def make_prior(config: ml_collections.ConfigDict | dict) -> Prior:
    """Builds the prior that `config` (the `config.prior` block) names.

    The factory receives the fields of `config` that its signature names, so one config block
    can hold the fields of every prior (`sigma`, `pi`, `sigma1`, `sigma2`, `scale`, `df`,
    `learnable`) and switching `name` on the command line just works.

    Args:
      config: a mapping with `name` and the prior's fields.

    Returns:
      The prior.

    Raises:
      ConfigError: unknown name, failed import, or a bad value (naming the field).
    """
    fields = dict(config)
    name = fields.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("prior.name", name, f"one of {', '.join(PRIORS)} or 'module:callable'")
    factory = PRIORS.get(name) or (_import_factory(name) if ":" in name else None)
    if factory is None:
        raise ConfigError(
            "prior.name", name, f"one of {', '.join(map(repr, PRIORS))} or 'module:callable'"
        )
    signature = inspect.signature(factory)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if fields.get("learnable") and not (takes_any or "learnable" in signature.parameters):
        raise ConfigError(
            "prior.learnable",
            True,
            f"False for the {name!r} prior (learnable: gaussian, scale_mixture)",
        )
    kwargs = {k: v for k, v in fields.items() if takes_any or k in signature.parameters}
    for parameter in signature.parameters.values():
        required = parameter.default is parameter.empty and parameter.kind in (
            parameter.POSITIONAL_OR_KEYWORD,
            parameter.KEYWORD_ONLY,
        )
        if required and parameter.name not in kwargs:
            raise ConfigError(
                f"prior.{parameter.name}",
                None,
                f"a value: the prior {name!r} requires it; add the field to the config's "
                "prior block",
            )
    prior = factory(**kwargs)
    if not isinstance(prior, Prior):
        raise ConfigError("prior.name", name, "a callable that returns a bbb.priors.Prior")
    return prior
