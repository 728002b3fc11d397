"""A LeNet-5 Bayesian CNN on MNIST (conv 5×5 ×6 → pool → conv 5×5 ×16 → pool → 120 → 84 → 10).

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
    # LeCun et al. 1998's widths: what a 2-core CPU affords (XLA's CPU convolutions are slow;
    # (32, 64) channels with 256 units cost several times as much per step).
    config.model.features = (6, 16)  # Channels of the two 5×5 conv layers.
    config.model.hidden_sizes = (120, 84)  # Dense layers after the convolutions.
    # XLA:CPU computes a convolution's kernel gradient far slower inside lax.scan's loop
    # (jax-ml/jax#12868): one compiled call per step trains this config twice as fast on a CPU
    # (README); on a GPU either works.
    config.epoch_loop = "steps"
    config.posterior.estimator = "reparam"  # Or "flipout"; "local_reparam" is Dense-only.
    config.num_epochs = 20  # Convolutions cost more per step than the MLP (~35 s per epoch).
    config.eval.num_samples = 10  # Fewer posterior samples than the MLP's: each costs more.
    config.eval.every_epochs = 5  # Validation and test every 5 epochs.
    return config
