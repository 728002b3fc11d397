"""The paper's dropout baseline (Table 1), evaluated as MC dropout by `scripts/evaluate.py`;
the optimiser is configs/mnist.py's (Adam, cosine decay), as for configs/mnist_sgd.py.

python scripts/train.py --config=configs/mnist_dropout.py --workdir=runs/mnist_dropout
"""

import ml_collections

from configs import mnist_sgd


def get_config(width: str | None = None) -> ml_collections.ConfigDict:
    """Maximum likelihood with dropout on the hidden units."""
    config = mnist_sgd.get_config(width)
    config.model.dropout_rate = 0.5  # Dropout probability on each hidden unit.
    return config
