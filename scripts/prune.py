"""Prunes a trained run by signal-to-noise |μ|/σ and by |μ|, and evaluates each on the test set.

  python scripts/prune.py --workdir=runs/mnist --fractions=0,0.5,0.75,0.95,0.98

Writes workdir/pruning.md, workdir/pruning.json, workdir/plots/pruning.png and the compact
exports in workdir/pruned/ (Blundell et al. 2015, Table 2).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run's workdir.")
_FRACTIONS = flags.DEFINE_list(
    "fractions", ["0", "0.5", "0.75", "0.95", "0.98"], "Fractions of the weights to remove."
)
_CRITERIA = flags.DEFINE_list("criteria", ["snr", "magnitude"], "Ranking criteria.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from bbb import pruning
    from bbb.errors import ConfigError

    def run():
        fractions = []
        for text in _FRACTIONS.value:
            try:
                fractions.append(float(text))
            except ValueError:
                raise ConfigError("--fractions", text, "a number in [0, 1]") from None
        pruning.pruning_experiment(_WORKDIR.value, tuple(fractions), tuple(_CRITERIA.value))

    cli.run_or_exit(run)
    with open(os.path.join(_WORKDIR.value, "pruning.md")) as f:
        print(f.read())


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
