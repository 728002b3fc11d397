"""Shared command-line behaviour of the scripts: clear errors and the exit codes they promise.

Exit code 2: a bad flag or config (the message names the field and what is allowed), raised
before any compute and before anything in the workdir is touched. Exit code 3: training
diverged (NaN or Inf). Exit code 1: anything else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from typing import Any

from absl import flags
from absl import logging as absl_logging

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a bad flag or config override exits with code 2.

    Args:
      argv: the command line.

    Returns:
      The remaining arguments.
    """
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for unknown fields and wrong types in --config.x=y.
        # ml_collections defines a flag for each override of an existing field: those are valid.
        known = set(flags.FLAGS)
        print(f"error: {describe_bad_override(argv, e, known)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    # absl's INFO lines (Orbax's per-checkpoint reports, TFDS, JAX's platform probe: over a
    # hundred per run) would bury the progress bar; warnings still show, `--verbosity=0`
    # brings the rest back.
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    # Before any compute: the process re-executes itself once so that glibc backs its heap with
    # huge pages, and every top-level XLA:CPU call reuses the memory of the last instead of
    # page-faulting fresh pages (bbb.hostmem). Bad flags have exited above, before it.
    from bbb import hostmem

    if hostmem.jax_computes_on_cpu():  # Host memory is XLA:CPU's working memory only there.
        hostmem.restart_with_huge_pages()
        hostmem.keep_freed_memory()
    return remaining


def describe_bad_override(argv: list[str], error: Exception, known: Collection[str] = ()) -> str:
    """A readable message for an override that ml_collections refused.

    An unknown field (a KeyError) is named with the override that caused it, and with
    ml_collections' own "Did you mean" where it has one.

    Args:
      argv: the command line.
      error: what ml_collections raised.
      known: the names of the flags defined, among them "config.a.b" for each override of an
        existing field: such an override is not the bad one, even where a field of its path
        has the missing name (--config.model.dropout_rate beside a bad
        --config.posterior.dropout_rate).

    Returns:
      The message.
    """
    # ml_collections wraps the KeyError in an AttributeError on the way out.
    cause = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
    if not isinstance(cause, KeyError) or not cause.args:
        return f"bad config override: {error}"
    text = str(cause.args[0])
    missing = text.splitlines()[0].strip("'\"")
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        parts = name.split(".")
        if len(parts) < 2 or missing not in parts[1:]:
            continue
        if name in known:
            continue
        path = ".".join(parts[1 : parts.index(missing, 1) + 1])
        hint = " ".join(text.splitlines()[1:])
        return f"config field {path} does not exist (from {arg})" + (f". {hint}" if hint else "")
    return f"bad config override: unknown config field {missing!r}"


def run_or_exit(fn: Callable[[], Any]) -> Any:
    """Runs `fn`, turning the errors that bbb promises to explain into clean exits.

    Args:
      fn: the work.

    Returns:
      What `fn` returns.
    """
    from bbb.data import DataError
    from bbb.errors import ConfigError
    from bbb.train import TrainingDivergedError
    from bbb.workdir import WorkdirError

    try:
        return fn()
    except (ConfigError, WorkdirError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
