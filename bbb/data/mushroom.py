"""The UCI Mushroom data set (Schlimmer 1987), the contexts of the bandit of Blundell et al. (2015),
§5.3: 8,124 mushrooms, each a row of `agaricus-lepiota.data`, comma-separated, no header.

Column 0 is the class (`e` edible or `p` poisonous); columns 1–22 are 22 categorical attributes
(`?` marks a missing stalk-root and is kept as a category of its own). Each attribute is one-hot
encoded over the values that occur in its column, in sorted order: 117 features for the full file.

The file comes from `config.data.path` (the file itself, or a folder holding it). With an empty
path it is fetched once from the UCI repository into a cache folder, and checked against its
known SHA-256; offline, the error says to pass --config.data.path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request

import numpy as np

from bbb.data.errors import DataError

FILENAME = "agaricus-lepiota.data"
URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/mushroom/" + FILENAME
SHA256 = "e65d082030501a3ebcbcd7c9f7c71aa9d28fdfff463bf4cf4716a3fe13ac360e"
NUM_ROWS = 8124  # Rows of the UCI file.
NUM_ATTRIBUTES = 22  # Categorical attributes after the class column.
LABELS = ("e", "p")  # Edible, poisonous.


@dataclasses.dataclass(frozen=True)
class Mushrooms:
    """The encoded data set.

    Attributes:
      features: one-hot attributes, float32 [N, F] (F = 117 for the UCI file).
      poisonous: 1 for a poisonous mushroom, 0 for an edible one, int32 [N].
      categories: per attribute, the values its one-hot block encodes, in order.
      path: the file read.
    """

    features: np.ndarray
    poisonous: np.ndarray
    categories: tuple[tuple[str, ...], ...]
    path: str


def resolve_path(path: str, cache_dir: str = "") -> str:
    """The data file that `path` names, fetching it when `path` is empty.

    Args:
      path: the file, a folder holding `agaricus-lepiota.data`, or "" to fetch.
      cache_dir: where a fetched copy is kept; "" is ~/.cache/bbb/mushroom.

    Returns:
      The path of the file.

    Raises:
      DataError: the path does not exist or holds no such file, or the fetch fails.
    """
    if path:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            candidate = os.path.join(path, FILENAME)
            if not os.path.isfile(candidate):
                raise DataError(
                    f"folder {path} holds no {FILENAME}: pass the file itself, or a folder with it."
                )
            return candidate
        if not os.path.isfile(path):
            raise DataError(f"mushroom data {path} does not exist (config field data.path).")
        return path
    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "bbb", "mushroom"))
    target = os.path.join(cache_dir, FILENAME)
    if os.path.isfile(target):
        return target
    return fetch(target)


def fetch(target: str, url: str = URL, timeout: float = 30.0) -> str:
    """Downloads the UCI file to `target`, checking its SHA-256.

    Args:
      target: the file to write (its folder is created).
      url: where to fetch from.
      timeout: seconds before giving up.

    Returns:
      `target`.

    Raises:
      DataError: offline, an HTTP error, or a file that is not the UCI one.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            content = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not fetch the mushroom data from {url} ({e}). Without a network, download "
            f"{FILENAME} elsewhere and pass --config.data.path=/path/to/{FILENAME} (or its folder)."
        ) from e
    digest = hashlib.sha256(content).hexdigest()
    if digest != SHA256:
        raise DataError(
            f"the file fetched from {url} has SHA-256 {digest}, not the UCI file's {SHA256}; "
            "pass a good copy with --config.data.path."
        )
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    temporary = f"{target}.{os.getpid()}.tmp"  # Per process: tasks may fetch at once.
    with open(temporary, "wb") as f:
        f.write(content)
    os.replace(temporary, target)
    return target


def load_mushroom(path: str, num_rows: int | None = NUM_ROWS) -> Mushrooms:
    """Reads and one-hot encodes the mushroom file, checking its shape and labels.

    Args:
      path: the `agaricus-lepiota.data` file.
      num_rows: the rows the file must have (8,124 for the UCI file); None accepts any number.

    Returns:
      The encoded `Mushrooms`.

    Raises:
      DataError: naming the file and, for a bad row, its line number.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read mushroom data {path}: {e}") from e
    rows = [line.split(",") for line in lines if line]
    if not rows:
        raise DataError(f"mushroom data {path} is empty.")
    for number, row in enumerate(rows, start=1):
        if len(row) != NUM_ATTRIBUTES + 1:
            raise DataError(
                f"mushroom data {path}, row {number}: {len(row)} columns, expected "
                f"{NUM_ATTRIBUTES + 1} (the class e/p and {NUM_ATTRIBUTES} attributes)."
            )
        if row[0] not in LABELS:
            raise DataError(
                f"mushroom data {path}, row {number}: class {row[0]!r}, expected 'e' or 'p'."
            )
    if num_rows is not None and len(rows) != num_rows:
        raise DataError(
            f"mushroom data {path} has {len(rows)} rows, expected {num_rows}: it is not the "
            "complete UCI file (truncated or a different file)."
        )
    table = np.asarray(rows)  # [N, 23] strings
    categories = tuple(tuple(sorted(set(table[:, j]))) for j in range(1, NUM_ATTRIBUTES + 1))
    blocks = []
    for j, values in enumerate(categories, start=1):
        codes = np.searchsorted(np.asarray(values), table[:, j])  # [N]
        blocks.append(np.eye(len(values), dtype=np.float32)[codes])
    features = np.concatenate(blocks, axis=1)  # [N, F]
    poisonous = (table[:, 0] == "p").astype(np.int32)
    return Mushrooms(features, poisonous, categories, os.path.abspath(path))
