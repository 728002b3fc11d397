"""Trains Bayes by Backprop from a config file.

  python scripts/train.py --config=configs/mnist.py --workdir=runs/mnist
  python scripts/train.py --config=configs/mnist.py:1200 --config.prior.pi=0.5 --workdir=runs/x
  python scripts/train.py --config=configs/mnist.py --config.mesh.samples=2 --workdir=runs/x
  srun python scripts/train.py --multihost --config=configs/mnist.py --workdir=/shared/runs/x

Bad configs and flags exit with code 2 and a message naming the field, before any compute.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from bbb import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumed if it has checkpoints).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Run one process per host of a multi-host job: jax.distributed.initialize() joins them, the "
    "mesh spans every host's devices, and process 0 writes the logs.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from bbb import parallel, train

    if _MULTIHOST.value:  # Before anything touches a device.
        cli.run_or_exit(parallel.initialize_multihost)
    cli.run_or_exit(lambda: train.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
