"""The mushroom contextual bandit (Blundell et al. 2015, §5.3, Figure 6).

  python scripts/bandit.py --config=configs/bandit_mushroom.py \
      --config.data.path=/path/to/mushroom --workdir=runs/bandit

Writes workdir/plots/regret.png, workdir/results.md, workdir/results.json and
workdir/config.json (see bbb.bandit.bandit_experiment), and Orbax checkpoints in
workdir/checkpoints: the same command on the same workdir resumes an interrupted run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from bbb import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The bandit config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from bbb import bandit

    bandit.request_cpu_devices(_CONFIG.value)  # A CPU device per core, the agents split over them.
    cli.run_or_exit(lambda: bandit.bandit_experiment(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
