"""A tiny MNIST config for the tests: a 2×32 MLP on 2,048 images, seconds on a CPU.

python scripts/train.py --config=configs/test.py --workdir=/tmp/bbb_test
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    """The MNIST config, shrunk."""
    config = mnist.get_config()
    config.num_epochs = 2  # Two short epochs.
    config.batch_size = 64  # Smaller minibatches.
    config.model.hidden_sizes = (32, 32)  # A small network.
    config.posterior.estimator = "reparam"  # The paper's (tests of the others set them).
    config.data.train_subset = 2048  # The first 2,048 training images.
    config.data.eval_subset = 500  # The first 500 validation and test images.
    config.eval.num_samples = 4  # A cheap predictive.
    config.eval.every_epochs = 1  # Evaluate every epoch.
    config.eval.batch_size = 250  # Two evaluation chunks.
    config.checkpoint_every_epochs = 1  # Checkpoint every epoch (resume tests).
    config.progress = False  # Quiet test logs.
    return config
