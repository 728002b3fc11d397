"""The toy regression of Blundell et al. (2015), Figure 5: Bayes by Backprop and a plain network.

  python scripts/regression.py --workdir=runs/regression
  python scripts/regression.py --workdir=runs/reg_s002 --config=configs/regression.py \
      --config.likelihood.noise_std=0.02

Trains configs/regression.py (or --config, with its overrides) and configs/regression.py:plain into
workdir/bbb and workdir/plain (resuming them if they exist), then writes
workdir/plots/regression.png (predictive median and interquartile range over x ∈ [−0.2, 1.2])
and workdir/regression.json. Overrides apply to Bayes by Backprop only; the plain network is
always configs/regression.py:plain.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from bbb import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Bayes by Backprop's config (default: configs/regression.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 200, "Posterior samples for the band.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from bbb import regression
    from configs import regression as regression_config

    results = cli.run_or_exit(
        lambda: regression.regression_experiment(
            _WORKDIR.value,
            _CONFIG.value or regression_config.get_config(),
            regression_config.get_config("plain"),
            num_samples=_NUM_SAMPLES.value,
        )
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
