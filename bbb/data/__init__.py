"""Data for bbb: MNIST (train/validation/test as in Blundell et al. 2015) and Fashion-MNIST.

TensorFlow and TensorFlow Datasets are imported only when data is prepared or loaded, never
when this package is imported.
"""

from bbb.data.errors import DataError
from bbb.data.mnist import (
    load_fashion_mnist,
    load_mnist,
    prepare_fashion_mnist,
    prepare_mnist,
)

__all__ = [
    "DataError",
    "load_fashion_mnist",
    "load_mnist",
    "prepare_fashion_mnist",
    "prepare_mnist",
]
