"""The mutant catalogue (bbb.mutants, scripts/mutants.py): every entry still applies to the code,
and the runner tells killed, surviving and stale mutants apart without touching the project."""

import json
import os
import subprocess
import sys

import pytest

from bbb import mutants
from bbb.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "tests", "mutants.json")


def test_every_catalogued_mutant_still_applies_to_the_code():
    """Each `old` occurs exactly once in its file, and its tests exist: a change to the library
    that moves a catalogued line must bring its mutant along (edit tests/mutants.json), or the
    bug it models would go unchecked without anyone noticing."""
    catalogue = mutants.load_catalogue(CATALOGUE)
    assert len(catalogue) > 100
    problems = {m.id: mutants.stale(m, ROOT) for m in catalogue}
    assert not {k: v for k, v in problems.items() if v}
    assert all(m.file.startswith("bbb/") for m in catalogue)
    assert all(t.startswith("tests/test_") for m in catalogue for t in m.tests)


def _entry(**fields):
    base = {"id": "a", "file": "pkg/mod.py", "old": "2 * x", "new": "3 * x", "why": "w"}
    return {**base, "tests": ["tests/test_mod.py"], **fields}


def _mutant(**fields):
    entry = _entry(**fields)
    return mutants.Mutant(**{**entry, "tests": tuple(entry["tests"])})


@pytest.mark.parametrize(
    "entries, field",
    [
        ([], "catalogue"),
        ([{k: v for k, v in _entry().items() if k != "why"}], "catalogue[0]"),
        ([_entry(), _entry()], "catalogue[1].id"),
        ([_entry(new="2 * x")], "catalogue[0].new"),
        ([_entry(tests=[])], "catalogue[0].tests"),
        ([_entry(old="")], "catalogue[0].old"),
    ],
)
def test_a_bad_catalogue_names_the_entry_and_field(tmp_path, entries, field):
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError) as info:
        mutants.load_catalogue(str(path))
    assert info.value.field == field


@pytest.fixture
def project(tmp_path):
    """A two-function project whose test checks `double` only: a bug in `half` goes unseen."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text(
        "def double(x):\n    return 2 * x\n\n\ndef half(x):\n    return x / 2\n"
    )
    (root / "tests" / "test_mod.py").write_text(
        "from pkg.mod import double\n\n\ndef test_double():\n    assert double(3) == 6\n"
    )
    return root


def _snapshot(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
        for d, _, files in os.walk(root)
        for f in files
        if "__pycache__" not in d
    }


def test_killed_survived_and_stale_on_a_scratch_copy(project):
    before = _snapshot(project)
    catalogue = [
        _mutant(id="doubled"),
        _mutant(id="halved", old="x / 2", new="x / 3"),
        _mutant(id="moved", old="4 * x", new="5 * x"),
        _mutant(id="no_test", tests=["tests/test_gone.py"]),
    ]
    seen = []
    records = mutants.run(catalogue, str(project), timeout_s=120, after_each=seen.append)
    assert seen == records
    by_id = {r["id"]: r for r in records}
    assert by_id["doubled"]["status"] == mutants.KILLED
    assert by_id["doubled"]["by"] == "tests/test_mod.py::test_double"
    assert by_id["halved"]["status"] == mutants.SURVIVED
    assert by_id["moved"]["status"] == mutants.STALE
    assert "0 times" in by_id["moved"]["by"]
    assert by_id["no_test"]["status"] == mutants.STALE
    assert _snapshot(project) == before  # The project itself is never edited.
    table = mutants.summary(records)
    assert table.startswith("4 mutants: 1 killed, 1 survived, 2 stale, 0 timed out")
    assert table.index("| halved | survived") < table.index("| doubled | killed")


def test_select_by_id_and_file():
    catalogue = [
        mutants.Mutant("a", "bbb/priors.py", "x", "y", "w", ("t",)),
        mutants.Mutant("b", "bbb/metrics.py", "x", "y", "w", ("t",)),
    ]
    assert [m.id for m in mutants.select(catalogue, [], ["priors"])] == ["a"]
    assert [m.id for m in mutants.select(catalogue, ["b"], [])] == ["b"]
    with pytest.raises(ConfigError, match="ids"):
        mutants.select(catalogue, ["c"], [])


def test_script_exits_1_when_a_mutant_survives_and_writes_the_records(project, tmp_path):
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps([_entry(id="doubled"), _entry(id="halved", old="x / 2")]))
    out = tmp_path / "records.json"
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "mutants.py"),
        f"--catalogue={catalogue}",
        f"--project={project}",
        f"--json={out}",
        "--noprogress",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert [r["status"] for r in json.loads(out.read_text())] == ["killed", "survived"]
    assert "2 mutants: 1 killed, 1 survived" in result.stdout
