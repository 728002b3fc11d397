"""Can the tests fail? A catalogue of deliberate bugs (mutants), each of which a test must catch.

A test that cannot fail is a defect. Each mutant of `tests/mutants.json` is one small edit of a
library file that models a bug that would go unnoticed in a research codebase: a flipped sign, a
factor of two, σ for σ², the KL weighted by M or N/B, noise shared where it should be drawn per
example, π swapped with 1 − π. `run` applies them one at a time to a scratch copy of the
project, runs the tests named for each with `pytest -x`, and reports whether the tests failed
(the mutant is *killed*) or passed (it *survived*: the tests miss that bug). The project itself
is never edited.

An entry is {"id", "file", "old", "new", "why", "tests"}: `old` must occur exactly once in
`file` (else the entry is *stale*: the code changed under it and the entry must follow);
`tests` are test files (or pytest node ids). Mutants that change nothing observable
(equivalent mutants) are not catalogued.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from bbb.errors import ConfigError

FIELDS = ("id", "file", "old", "new", "why", "tests")
# Not copied into the scratch project: environments, version control, outputs, caches.
_IGNORED = (".git", ".venv*", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
KILLED, SURVIVED, STALE, TIMEOUT = "killed", "survived", "stale", "timeout"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate bug: replace `old` by `new` in `file`; `tests` must then fail."""

    id: str
    file: str
    old: str
    new: str
    why: str
    tests: tuple[str, ...]


def load_catalogue(path: str) -> list[Mutant]:
    """The mutants of a catalogue file, checked for shape.

    Args:
      path: a JSON list of entries with the fields `FIELDS`.

    Returns:
      The mutants, in file order.

    Raises:
      ConfigError: naming the entry and field that is missing, empty, repeated or of the wrong
        type.
    """
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("catalogue", path, f"a readable JSON file ({e})") from e
    if not isinstance(entries, list) or not entries:
        raise ConfigError("catalogue", path, "a non-empty JSON list of mutants")
    mutants, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"catalogue[{i}]"
        if not isinstance(entry, dict) or set(entry) != set(FIELDS):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ConfigError(where, got, f"an object with exactly the fields {list(FIELDS)}")
        for field in FIELDS[:-1]:
            if not isinstance(entry[field], str) or not entry[field]:
                raise ConfigError(f"{where}.{field}", entry[field], "a non-empty string")
        tests = entry["tests"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ConfigError(f"{where}.tests", tests, "a non-empty list of test paths")
        if entry["old"] == entry["new"]:
            raise ConfigError(f"{where}.new", entry["new"], "a change of `old`")
        if entry["id"] in seen:
            raise ConfigError(f"{where}.id", entry["id"], "an id not used by another entry")
        seen.add(entry["id"])
        mutants.append(Mutant(**{**entry, "tests": tuple(tests)}))
    return mutants


def stale(mutant: Mutant, root: str) -> str | None:
    """Why `mutant` no longer applies to the project at `root`, or None if it does."""
    path = os.path.join(root, mutant.file)
    if not os.path.isfile(path):
        return f"{mutant.file} does not exist"
    with open(path) as f:
        count = f.read().count(mutant.old)
    if count != 1:
        return f"`old` occurs {count} times in {mutant.file}, not once"
    for test in mutant.tests:
        if not os.path.isfile(os.path.join(root, test.split("::")[0])):
            return f"test file {test.split('::')[0]} does not exist"
    return None


def scratch_copy(root: str, into: str) -> str:
    """A copy of the project at `root` (sources, tests, configs; no .git, .venv or runs)."""
    target = os.path.join(into, "project")
    shutil.copytree(root, target, ignore=shutil.ignore_patterns(*_IGNORED), symlinks=True)
    return target


def run_one(mutant: Mutant, project: str, timeout_s: float, python: str) -> dict[str, Any]:
    """Applies `mutant` to the scratch `project`, runs its tests, and puts the file back.

    Returns:
      {"id", "status", "by" (the first failing test), "seconds"}; status is `KILLED`,
      `SURVIVED`, `STALE` (`old` not found once, or a test file missing, or pytest found no
      test to run) or `TIMEOUT`.
    """
    record = {"id": mutant.id, "status": STALE, "by": None, "seconds": 0.0}
    why_stale = stale(mutant, project)
    if why_stale:
        return {**record, "by": why_stale}
    path = os.path.join(project, mutant.file)
    with open(path) as f:
        original = f.read()
    with open(path, "w") as f:
        f.write(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        command = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        result = subprocess.run(
            command, cwd=project, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**record, "status": TIMEOUT, "seconds": time.perf_counter() - start}
    finally:
        with open(path, "w") as f:
            f.write(original)
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return {**record, "status": SURVIVED, "seconds": seconds}
    if result.returncode in (4, 5):  # pytest: usage error, or no tests collected.
        return {**record, "by": f"pytest exit {result.returncode}", "seconds": seconds}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    return {**record, "status": KILLED, "by": failed[0] if failed else "", "seconds": seconds}


def run(
    mutants: Sequence[Mutant],
    root: str,
    timeout_s: float = 900.0,
    python: str = sys.executable,
    after_each: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs every mutant on one scratch copy of `root`; `root` itself is not touched.

    Args:
      mutants: from `load_catalogue`.
      root: the project's folder.
      timeout_s: the limit on one mutant's tests (a mutant that makes them hang is reported).
      python: the interpreter that runs pytest.
      after_each: called with each record as it is made (progress).

    Returns:
      One record per mutant (`run_one`), in order.
    """
    records = []
    with tempfile.TemporaryDirectory(prefix="bbb-mutants-") as scratch:
        project = scratch_copy(root, scratch)
        for mutant in mutants:
            record = run_one(mutant, project, timeout_s, python)
            records.append(record)
            if after_each is not None:
                after_each(record)
    return records


def select(mutants: Sequence[Mutant], ids: Sequence[str], files: Sequence[str]) -> list[Mutant]:
    """The mutants with one of `ids` (all if empty) whose file contains one of `files` (all if
    empty); an id that is not in the catalogue is a `ConfigError`."""
    known = {m.id for m in mutants}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ConfigError("ids", ",".join(unknown), "ids of the catalogue's mutants")
    chosen = [m for m in mutants if (not ids or m.id in ids)]
    return [m for m in chosen if not files or any(f in m.file for f in files)]


def summary(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the records, survivors, stale and timed-out entries first."""
    order = {SURVIVED: 0, TIMEOUT: 1, STALE: 2, KILLED: 3}
    rows = sorted(records, key=lambda r: order[r["status"]])
    counts = {s: sum(r["status"] == s for r in records) for s in order}
    lines = [
        f"{len(records)} mutants: {counts[KILLED]} killed, {counts[SURVIVED]} survived, "
        f"{counts[STALE]} stale, {counts[TIMEOUT]} timed out",
        "",
        "| mutant | status | by | s |",
        "|---|---|---|--:|",
    ]
    lines += [f"| {r['id']} | {r['status']} | {r['by'] or ''} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)
