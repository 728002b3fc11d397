"""The paper's unregularised baseline (Table 1's SGD row): a plain network trained by maximum
likelihood, with the optimiser of configs/mnist.py (Adam, cosine decay) so that only the
posterior differs; the paper used plain SGD (--config.optim.name=sgd).

python scripts/train.py --config=configs/mnist_sgd.py --workdir=runs/mnist_sgd
"""

import ml_collections

from configs import mnist


def get_config(width: str | None = None) -> ml_collections.ConfigDict:
    """A point estimate with a flat prior: maximum likelihood."""
    config = mnist.get_config(width)
    config.posterior.name = "point"  # A point estimate: no σ, no sampling.
    config.posterior.estimator = "reparam"  # A point has no pre-activation noise to sample.
    config.prior.name = "flat"  # No regularisation.
    config.eval.num_samples = 1  # A point estimate has one prediction.
    return config
