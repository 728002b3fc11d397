"""A LeNet-style Bayesian CNN on MNIST (conv 5×5 ×32 → pool → conv 5×5 ×64 → pool → 256 → 10).

  python scripts/train.py --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn
  python scripts/train.py --config=configs/mnist_cnn.py --config.posterior.estimator=flipout \
      --workdir=runs/mnist_cnn_flipout

`local_reparam` has no form for convolutions: it is a config error that names the layer.
"""

import ml_collections

from configs import mnist


def get_config() -> ml_collections.ConfigDict:
    """The MNIST config with a LeNet-5-style network."""
    config = mnist.get_config()
    config.model.name = "lenet"  # Two conv layers with max pooling, then dense layers.
    config.model.features = (32, 64)  # Channels of the two 5×5 conv layers.
    config.model.hidden_sizes = (256,)  # Dense layer after the convolutions.
    config.posterior.estimator = "reparam"  # Or "flipout"; "local_reparam" is Dense-only.
    config.num_epochs = 50  # Convolutions cost more per step than the MLP.
    config.eval.num_samples = 10  # Fewer posterior samples than the MLP's: each costs more.
    return config
