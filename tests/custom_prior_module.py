"""A user-defined prior, loaded in tests as `custom_prior_module:my_prior`.

It stands for user code outside the bbb package: a logistic prior, which bbb does not ship.
"""

import dataclasses

import jax
import jax.numpy as jnp

from bbb.errors import check_positive
from bbb.priors import Prior


@dataclasses.dataclass(frozen=True)
class Logistic(Prior):
    """Logistic(0, s): log p(w) = −z − 2 log(1 + e^−z) − log s, z = w / s."""

    scale: float = 1.0

    def log_density(self, params: dict[str, jax.Array], w: jax.Array) -> jax.Array:
        z = w / self.scale
        return -z - 2.0 * jnp.logaddexp(0.0, -z) - jnp.log(self.scale)


def my_prior(scale: float = 1.0) -> Logistic:
    """The factory that `make_prior` calls with the config's `scale`."""
    check_positive("prior.scale", scale)
    return Logistic(scale=float(scale))


def not_a_prior(scale: float = 1.0) -> dict[str, float]:
    """A callable that returns something other than a `Prior` (make_prior must reject it)."""
    return {"scale": scale}
