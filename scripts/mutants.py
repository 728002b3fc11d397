"""Checks that the tests can fail: applies each catalogued bug, runs the tests that must catch it.

  python scripts/mutants.py                                  # the whole catalogue (~25 min)
  python scripts/mutants.py --files=estimators,priors        # the mutants of some modules
  python scripts/mutants.py --ids=estimators-E7b,objective-O21 --json=mutants.json

Each mutant of tests/mutants.json (bbb.mutants) is applied to a scratch copy of the project, one
at a time, and its tests are run with `pytest -x`. Prints a table, survivors first. Exit code 0
if every mutant was killed, 1 if one survived or timed out, 2 for a stale entry (the code
changed under it) or a bad flag.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CATALOGUE = flags.DEFINE_string(
    "catalogue", os.path.join(_ROOT, "tests", "mutants.json"), "The mutants (a JSON list)."
)
_PROJECT = flags.DEFINE_string("project", _ROOT, "The project to copy and mutate.")
_IDS = flags.DEFINE_list("ids", [], "Only these mutants (default: all).")
_FILES = flags.DEFINE_list(
    "files", [], "Only mutants of library files whose path contains one of these."
)
_TIMEOUT = flags.DEFINE_float("timeout_s", 900.0, "Limit on one mutant's tests, in seconds.")
_JSON = flags.DEFINE_string("json", None, "Write the records here (optional).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    from tqdm.auto import tqdm

    from bbb import mutants

    def run():
        catalogue = mutants.load_catalogue(_CATALOGUE.value)
        chosen = mutants.select(catalogue, _IDS.value, _FILES.value)
        bar = tqdm(total=len(chosen), unit="mutant", disable=not _PROGRESS.value)

        def after_each(record):
            bar.set_postfix_str(f"{record['id']}: {record['status']}")
            bar.update()

        records = mutants.run(chosen, _PROJECT.value, _TIMEOUT.value, after_each=after_each)
        bar.close()
        print(mutants.summary(records))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(records, f, indent=1)
        statuses = {r["status"] for r in records}
        if mutants.STALE in statuses:
            sys.exit(cli.EXIT_BAD_INPUT)
        if statuses & {mutants.SURVIVED, mutants.TIMEOUT}:
            sys.exit(1)

    cli.run_or_exit(run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
