"""TensorFlow Datasets plumbing: lazy imports, the "already prepared?" check, and writing
TFDS's own `mnist` / `fashion_mnist` from local IDX files.

TensorFlow and TFDS are imported only inside these functions, never when `bbb` is imported,
and TensorFlow is hidden from every GPU so that it never takes accelerator memory that JAX
needs. The check for prepared data imports TFDS but not TensorFlow, so it takes about a second.

`local_builder_class(name)` is a subclass of the registered TFDS builder (same name, version
and features, so `tfds.load(name)` reads what it writes as if TFDS had downloaded it) whose
`_split_generators` reads the four IDX files in `DownloadConfig.manual_dir` instead of
downloading the gzipped originals, whose checksums a re-compressed copy would not match.
Examples keep TFDS's keys (their index in the file), so the splits match the official ones.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bbb.data.idx import IDX_FILENAMES, read_image_classification_idx

NETWORK_TIMEOUT_SECONDS = 3.0


def import_tensorflow() -> Any:
    """Imports TensorFlow with every GPU hidden from it, and returns the module.

    Returns:
      The `tensorflow` module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ info lines quiet.
    with _without_native_info_lines():
        import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's devices were already initialised (by the caller): leave them.
        pass
    return tf


# What TensorFlow's C++ code prints on import before its logging is set up, which
# TF_CPP_MIN_LOG_LEVEL does not reach (e.g. "I0000 ... oneDNN custom operations are on" on a
# CPU with AVX-512): absl INFO lines and absl's preamble.
_NATIVE_INFO_LINE = re.compile(
    r"^(I\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog\(\))"
)


@contextlib.contextmanager
def _without_native_info_lines() -> Iterator[None]:
    """Captures file descriptor 2 while the body runs, then passes on all but INFO lines.

    (A Python exception in the body is raised after the captured lines are passed on.)
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # No stderr to capture.
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [s for s in text.splitlines(True) if not _NATIVE_INFO_LINE.match(s)]
            sys.stderr.write("".join(kept))


def import_tfds() -> Any:
    """Imports and returns `tensorflow_datasets` (it imports TensorFlow only when it needs it).

    Returns:
      The `tensorflow_datasets` module.
    """
    import tensorflow_datasets as tfds

    return tfds


def prepared_root(name: str, data_dir: str | os.PathLike | None) -> tuple[bool, str]:
    """Says whether TFDS dataset `name` (registered version) is prepared under `data_dir`.

    Args:
      name: a TFDS dataset name, e.g. "mnist".
      data_dir: a TFDS data folder; None means TFDS's default (`$TFDS_DATA_DIR` or
        ~/tensorflow_datasets).

    Returns:
      (prepared, data_dir) with the data folder TFDS uses for it.
    """
    tfds = import_tfds()
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    # builder.data_dir is <root>/<name>/<version>.
    return builder.is_prepared(), str(Path(builder.data_dir).parent.parent)


@contextlib.contextmanager
def preparation_lock(root: str | os.PathLike, name: str):
    """Holds an exclusive lock on preparing `name` in the TFDS folder `root` (fcntl, POSIX).

    The tasks of a job array, or tests run in parallel, may all find the data unprepared;
    TFDS takes no lock, and each would build it and fail to move it into place after the
    first. Callers check `prepared_root` again once they hold the lock.
    """
    import fcntl

    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f".{name}.bbb-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def local_builder_class(name: str) -> type:
    """Returns a builder for TFDS dataset `name` that reads IDX files from `manual_dir`.

    Args:
      name: "mnist" or "fashion_mnist" (any TFDS builder whose `_generate_examples` yields
        {"image": uint8 [28, 28, 1], "label": int} keyed by index).

    Returns:
      An unregistered subclass of the registered builder class, with the same name and version.
    """
    tfds = import_tfds()
    from etils import epath

    base = tfds.builder_cls(name)
    dataset_name = name

    class LocalIdxBuilder(base, skip_registration=True):
        """The TFDS dataset `name`, written from the IDX files in `DownloadConfig.manual_dir`."""

        name = dataset_name
        # The registered builder's source file, so that TFDS finds the same checksums and
        # metadata; set directly because TFDS 4.9.10 computes it with `importlib_resources`,
        # which it does not declare as a dependency (tensorflow/datasets#11212).
        code_path = epath.Path(inspect.getfile(base))
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Place the four IDX files (" + ", ".join(IDX_FILENAMES.values()) + ", each "
            "optionally .gz) in manual_dir."
        )

        def _split_generators(self, dl_manager: Any) -> list[Any]:
            splits = read_image_classification_idx(dl_manager.manual_dir)
            return [
                tfds.core.SplitGenerator(
                    name=split_name, gen_kwargs=dict(images=images, labels=labels)
                )
                for split_name, (images, labels) in (
                    (tfds.Split.TRAIN, splits["train"]),
                    (tfds.Split.TEST, splits["test"]),
                )
            ]

        def _generate_examples(self, images: Any, labels: Any) -> Any:
            # Keyed by index, like the registered builder, so TFDS orders examples the same.
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield index, {"image": image[:, :, None], "label": int(label)}

    LocalIdxBuilder.__name__ = LocalIdxBuilder.__qualname__ = f"LocalIdx_{name}"
    return LocalIdxBuilder


def prepare_from_idx(
    name: str, idx_dir: str | os.PathLike, data_dir: str | os.PathLike | None
) -> str:
    """Writes TFDS dataset `name` into `data_dir` from the four IDX files in `idx_dir`.

    Args:
      name: "mnist" or "fashion_mnist".
      idx_dir: folder with the four IDX files (plain or .gz).
      data_dir: TFDS data folder; None means TFDS's default.

    Returns:
      The TFDS data folder written into.

    Raises:
      DataError: the IDX files are missing or malformed.
    """
    read_image_classification_idx(idx_dir)  # Fail with a clear message before TF starts.
    import_tensorflow()
    tfds = import_tfds()
    builder = local_builder_class(name)(data_dir=None if data_dir is None else os.fspath(data_dir))
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(Path(idx_dir).resolve()))
    with contextlib.redirect_stdout(sys.stderr):  # TFDS's chatter; stdout keeps one line.
        builder.download_and_prepare(download_config=config)
    return str(Path(builder.data_dir).parent.parent)


def download_and_prepare(name: str, data_dir: str | os.PathLike | None) -> str:
    """Runs TFDS's own download and preparation of `name` (needs the internet).

    Args:
      name: a TFDS dataset name.
      data_dir: TFDS data folder; None means TFDS's default.

    Returns:
      The TFDS data folder written into.
    """
    import_tensorflow()
    tfds = import_tfds()
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare()
    return str(Path(builder.data_dir).parent.parent)


def host_reachable(host: str, port: int = 443, timeout: float = NETWORK_TIMEOUT_SECONDS) -> bool:
    """Says whether a TCP connection to host:port opens within `timeout` seconds.

    Name resolution has no timeout of its own, so the whole check runs in a daemon thread that
    is abandoned after `timeout`: an offline machine answers False in at most `timeout`.

    Args:
      host: host name.
      port: TCP port.
      timeout: seconds to wait in all.

    Returns:
      True if the connection opened.
    """
    result = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])
