"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al., yann.lecun.com/exdb/mnist).

An IDX file is a 4-byte magic number `00 00 <dtype code> <number of dimensions>`, then one
big-endian uint32 per dimension, then the array in C order, big-endian. The four files of a
dataset are named as in the original distribution (`IDX_FILENAMES`) and may be gzipped (`.gz`).
Only numpy is used here, so these functions are cheap to import and test.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from bbb.data.errors import DataError

# The four files of MNIST and Fashion-MNIST, keyed by role.
IDX_FILENAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX dtype codes (the third byte of the magic number) and the big-endian numpy dtypes.
_CODE_TO_DTYPE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes `array` as an IDX file, gzipped if `path` ends in `.gz`.

    The file is written next to its destination and renamed into place, so an interrupted
    write never leaves a partial file under the final name.

    Args:
      path: destination file.
      array: an array of dtype uint8, int8, int16, int32, float32 or float64, with 1 to 255
        dimensions.

    Returns:
      The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _CODE_TO_DTYPE.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise DataError(
            f"write_idx: dtype {array.dtype} cannot be written as IDX: allowed are "
            + ", ".join(str(d) for d in codes)
        )
    if not 1 <= array.ndim <= 255:
        raise DataError(f"write_idx: ndim={array.ndim} is invalid: allowed is 1 to 255")
    header = bytes([0, 0, codes[dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[codes[dtype]]).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id in the temporary name: tasks of a job array may write the same file at once.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(payload)
    os.replace(partial, path)
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or not (recognised by its content, not its name).

    Args:
      path: the IDX file.

    Returns:
      The array, in native byte order, with the shape stored in the file.

    Raises:
      DataError: the file is missing, truncated, too long or not an IDX file; the message
        names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"IDX file {path} is not a readable gzip file ({error}); delete it and fetch it again"
        ) from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _CODE_TO_DTYPE or data[3] == 0:
        raise DataError(
            f"IDX file {path} does not start with an IDX magic number "
            f"(got {data[:4].hex() or 'an empty file'})"
        )
    dtype, ndim = _CODE_TO_DTYPE[data[2]], data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {state}: header shape {shape} needs {expected} bytes, "
            f"the file has {len(data)}; delete it and fetch it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Finds the four standard IDX files in `directory`, each plain or gzipped.

    Args:
      directory: a folder holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
        `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each optionally ending `.gz`.

    Returns:
      A dict from role (the keys of `IDX_FILENAMES`) to the file's path.

    Raises:
      DataError: the folder or one of the files is missing; the message lists what it holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"IDX folder {directory} does not exist or is not a folder")
    found, missing = {}, []
    for role, name in IDX_FILENAMES.items():
        candidates = [directory / name, directory / (name + ".gz")]
        existing = [path for path in candidates if path.is_file()]
        if existing:
            found[role] = existing[0]
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        present = sorted(path.name for path in directory.iterdir())
        raise DataError(
            f"IDX folder {directory} lacks {', '.join(missing)}; it holds "
            f"{present or 'nothing'}. It must hold the four files "
            f"{', '.join(IDX_FILENAMES.values())} (each may end in .gz)."
        )
    return found


def read_image_classification_idx(
    directory: str | os.PathLike,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads and checks the four IDX files of an MNIST-like dataset.

    Args:
      directory: a folder as for `find_idx_files`.

    Returns:
      {"train": (images, labels), "test": (images, labels)}, images uint8 [N, 28, 28],
      labels uint8 [N] with values 0 to 9.

    Raises:
      DataError: a file is missing or malformed, or images and labels do not match.
    """
    paths = find_idx_files(directory)
    splits = {}
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_images"])  # [N, 28, 28]
        labels = read_idx(paths[f"{split}_labels"])  # [N]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"IDX file {paths[f'{split}_images']} holds {images.dtype} {images.shape}: "
                "expected uint8 images of shape [N, 28, 28]"
            )
        if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise DataError(
                f"IDX file {paths[f'{split}_labels']} holds {labels.dtype} {labels.shape}: "
                f"expected uint8 labels of shape [{images.shape[0]}] to match the images"
            )
        if labels.size and labels.max() > 9:
            raise DataError(
                f"IDX file {paths[f'{split}_labels']} holds label {labels.max()}: allowed is 0 to 9"
            )
        splits[split] = (images, labels)
    return splits
