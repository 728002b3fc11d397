"""The toy regression data of Blundell et al. (2015), §5.2 and Figure 5.

    y = x + 0.3 sin(2π(x + ε)) + 0.3 sin(4π(x + ε)) + ε,   ε ~ N(0, 0.02²),

with the training inputs x ~ U[0, 0.5]. The validation and test splits are drawn from the same
distribution (independent draws), so that they measure the fit where there is data; the
interesting region, x outside [0, 0.5], is where the predictive band should widen.
"""

from __future__ import annotations

import numpy as np

NOISE_STD = 0.02  # The standard deviation of ε.
X_RANGE = (0.0, 0.5)  # Training inputs are uniform on this interval.


def toy_function(x: np.ndarray, eps: np.ndarray | float = 0.0) -> np.ndarray:
    """y = x + 0.3 sin(2π(x + ε)) + 0.3 sin(4π(x + ε)) + ε.

    Args:
      x: inputs, any shape.
      eps: the noise ε (0 gives the noise-free curve).

    Returns:
      y, with the shape of `x`.
    """
    shifted = x + eps
    return x + 0.3 * np.sin(2 * np.pi * shifted) + 0.3 * np.sin(4 * np.pi * shifted) + eps


def sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points (x, y) with x ~ U[0, 0.5] and y from `toy_function` with fresh noise.

    Args:
      n: the number of points.
      rng: a numpy generator.

    Returns:
      (x [n, 1], y [n, 1]), float32.
    """
    x = rng.uniform(*X_RANGE, size=(n, 1))
    y = toy_function(x, rng.normal(0.0, NOISE_STD, size=(n, 1)))
    return x.astype(np.float32), y.astype(np.float32)


def load_toy_regression(
    num_train: int = 1000, num_validation: int = 500, num_test: int = 500, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three splits, drawn from one seeded generator (the same seed gives the same data).

    Args:
      num_train: training points.
      num_validation: validation points.
      num_test: test points.
      seed: the data seed.

    Returns:
      {"train", "validation", "test"} → (x [n, 1], y [n, 1]), float32.
    """
    rng = np.random.default_rng(seed)
    return {
        "train": sample(num_train, rng),
        "validation": sample(num_validation, rng),
        "test": sample(num_test, rng),
    }
