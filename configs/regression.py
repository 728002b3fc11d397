"""The toy regression of Blundell et al. (2015), §5.2 and Figure 5: Bayes by Backprop and a plain
network on 1,000 points y = x + 0.3 sin(2π(x+ε)) + 0.3 sin(4π(x+ε)) + ε, x ~ U[0, 0.5].

  python scripts/train.py --config=configs/regression.py --workdir=runs/regression/bbb
  python scripts/train.py --config=configs/regression.py:plain --workdir=runs/regression/plain
  python scripts/regression.py --workdir=runs/regression   # both, and the Figure 5 plot

The config string "plain" gives the deterministic baseline: a point estimate, flat prior
(maximum likelihood), same network, data and optimiser.
"""

import math

import ml_collections

from configs import mnist


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """Bayes by Backprop on the toy regression; `variant="plain"` gives the plain network."""
    if variant not in (None, "", "bbb", "plain"):
        raise ValueError(f"configs/regression.py:{variant}: expected 'bbb' or 'plain'")
    config = mnist.get_config()
    config.num_epochs = 300  # Passes over the 1,000 training points (3,000 steps).
    config.batch_size = 100  # Minibatch size B: 10 steps per epoch.

    config.model.hidden_sizes = (100, 100)  # Two hidden layers of 100 ReLU units.
    config.model.num_outputs = 1  # One regression output, the mean of y.

    config.posterior.estimator = "reparam"  # The paper's; the README's figures used it.
    config.posterior.init_rho = -5.0  # σ₀ = softplus(−5) ≈ 0.0067.
    config.posterior.noise = "jax"  # Threefry: the figures in docs/experiments.md used it.

    # A Gaussian prior N(0, 1) on every weight.
    config.prior.name = "gaussian"
    config.prior.sigma = math.exp(0.0)

    config.likelihood.name = "gaussian"  # y ~ N(f(x; w), s²).
    # s: the data's own spread around the noise-free curve. ε's std is 0.02, but ε also shifts
    # both sines' argument, so y − f(x) has std ≈ 0.0625 (tests/test_regression.py). Chosen on
    # validation NLL against s = 0.02 and a learned s (docs/experiments.md, "Regression");
    # `--config.likelihood.learnable=True` fits s instead.
    config.likelihood.noise_std = 0.0625
    config.likelihood.learnable = False  # Keep s fixed.

    config.optim.learning_rate = 1e-2  # Adam, cosine decay to 0 (lets σ grow off the data).

    config.data.name = "toy_regression"  # bbb/data/regression.py.
    config.data.num_train = 1000  # Training points; 500 more validate, 500 test.
    config.data.seed = 0  # The data seed (the same data for every config.seed).
    config.data.pixel_scale = 1.0  # Unused here.

    config.eval.num_samples = 100  # Posterior samples of the predictive (test NLL and RMSE).
    config.eval.every_epochs = 50  # Evaluate every 50 epochs.
    config.eval.batch_size = 500  # The whole validation or test split in one chunk.
    config.checkpoint_every_epochs = 100  # Checkpoints (and always at the end).
    config.progress = False  # No progress bar (runs take seconds).

    if variant == "plain":
        config.posterior.name = "point"  # A point estimate: a plain network.
        config.prior.name = "flat"  # No weight penalty: maximum likelihood.
        config.eval.num_samples = 1  # A point estimate has one "sample".
    return config


def get_sweep() -> list[dict]:
    """8 members, all numeric, so that `scripts/sweep.py --vectorize` trains them as one program.

      python scripts/sweep.py --config=configs/regression.py --workdir=runs/regression_sweep

    Two seeds (init, shuffling and noise) × two prior widths × two Adam learning rates.
    """
    return [
        {"seed": seed, "prior.sigma": math.exp(-a), "optim.learning_rate": lr}
        for seed in (0, 1)  # Repeats: how much of a difference is noise.
        for a in (0, 1)  # −log σ of the Gaussian prior (the paper's grid: 0, 1, 2).
        for lr in (1e-2, 3e-3)  # The config's rate and a slower one.
    ]
