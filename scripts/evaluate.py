"""Evaluates a trained classifier's uncertainty: calibration, OOD detection, dataset shift.

  python scripts/evaluate.py --workdir=runs/mnist [--num_samples=100]
  python scripts/evaluate.py --compare=runs/mnist,runs/mnist_sgd,runs/mnist_dropout \
      --out=runs/compare.md
  python scripts/evaluate.py --workdir=runs/mnist --val_test --num_samples=100

The first form writes `workdir/eval.json` and plots in `workdir/plots/` (see
`bbb.evaluation.evaluate_run`). The second reads each run's eval.json (evaluating the runs that
have none) and writes a Markdown table. The third only re-scores the run's own validation and
test splits with K samples, and writes nothing. A workdir without a checkpoint (or, for the
first two, with a regression run) exits with code 2 and a message.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A classification run's workdir to evaluate.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 100, "MC samples K of the predictive.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weight samples.")
_COMPARE = flags.DEFINE_list(
    "compare",
    None,
    "Comma-separated workdirs to tabulate (each evaluated unless its eval.json has the same "
    "K, seed and checkpoint).",
)
_OUT = flags.DEFINE_string("out", None, "With --compare: where to write the Markdown table.")
_VAL_TEST = flags.DEFINE_bool(
    "val_test",
    False,
    "Only the run's validation and test error and NLL with K samples (no OOD, no plots).",
)


def main(argv):
    del argv
    from bbb import evaluation
    from bbb.errors import ConfigError

    def work():
        options = dict(num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
        if _COMPARE.value:
            if _WORKDIR.value:
                raise ConfigError("--workdir", _WORKDIR.value, "unset when --compare is given")
            print(evaluation.compare_runs(_COMPARE.value, _OUT.value, **options), end="")
            if _OUT.value:
                print(f"Table written to {_OUT.value}.")
            return
        if not _WORKDIR.value:
            raise ConfigError("--workdir", _WORKDIR.value, "a run's workdir (or use --compare)")
        if _VAL_TEST.value:
            print(evaluation.splits_line(evaluation.evaluate_splits(_WORKDIR.value, **options)))
            return
        summary = evaluation.evaluate_run(_WORKDIR.value, **options)
        print(evaluation.summary_line(summary))

    cli.run_or_exit(work)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
