"""Bayes by Backprop on MNIST with the Gaussian prior N(0, σ²) (Blundell et al. 2015, Table 1).

python scripts/train.py --config=configs/mnist_gaussian.py --workdir=runs/mnist_gaussian
"""

import math

import ml_collections

from configs import mnist


def get_config(width: str | None = None) -> ml_collections.ConfigDict:
    """The MNIST config with a Gaussian prior and its closed-form KL."""
    config = mnist.get_config(width)
    config.prior.name = "gaussian"
    config.prior.sigma = math.exp(-1.0)  # The paper searched σ ∈ {e⁰, e⁻¹, e⁻²}.
    config.objective.kl = "closed_form"  # Exact KL: same objective, lower variance.
    return config


def get_sweep() -> list[dict]:
    """The paper's Gaussian-prior grid."""
    return [{"prior.sigma": math.exp(-a)} for a in (0, 1, 2)]
