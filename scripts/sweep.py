"""Runs a config file's sweep (`get_sweep()`): every member in its own sub-workdir, then a table.

  python scripts/sweep.py --config=configs/mnist.py --workdir=runs/sweep
  python scripts/sweep.py --config=configs/mnist.py --workdir=runs/sweep --list
  python scripts/sweep.py --config=configs/mnist.py --workdir=runs/sweep --member=3
  sbatch --array=0-26 --wrap="python scripts/sweep.py --config=configs/mnist.py \
      --workdir=runs/sweep"     # each task reads $SLURM_ARRAY_TASK_ID
  python scripts/sweep.py --config=configs/mnist.py --workdir=runs/sweep --collect
  python scripts/sweep.py --config=configs/regression.py --workdir=runs/rsweep --vectorize
  python scripts/sweep.py --config=configs/regression.py --workdir=/tmp/b --vectorize --benchmark

`--config.x=...` overrides the base config of every member. Bad sweeps, configs and flags exit
with code 2 and a message naming the member and field, before any compute.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from bbb import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_sweep.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder; one sub-folder per member.")
_LIST = flags.DEFINE_bool("list", False, "Print the members and their sub-workdirs, and exit.")
_COLLECT = flags.DEFINE_bool("collect", False, "Build the table from the finished members.")
_MEMBER = flags.DEFINE_integer(
    "member", None, "Run only this member (default: $SLURM_ARRAY_TASK_ID if set, else all)."
)
_VECTORIZE = flags.DEFINE_bool(
    "vectorize", False, "Train members that differ only in numeric hyperparameters as one vmap."
)
_BENCHMARK = flags.DEFINE_bool(
    "benchmark", False, "Time the sweep vectorised against one member after another."
)
_REPEATS = flags.DEFINE_integer("benchmark_repeats", 1, "Repetitions of each way (medians).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from bbb import sweep

    def work():
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        members = sweep.load_get_sweep(path)()
        if _BENCHMARK.value:
            from bbb.errors import ConfigError

            for name, value in (("--list", _LIST.value), ("--collect", _COLLECT.value)):
                if value:
                    raise ConfigError(
                        name, value, "False with --benchmark (it trains every member)"
                    )
            if _MEMBER.value is not None:
                raise ConfigError("--member", _MEMBER.value, "unset with --benchmark")
            return sweep.benchmark(_CONFIG.value, members, _WORKDIR.value, repeats=_REPEATS.value)
        return sweep.run_sweep(
            _CONFIG.value,
            members,
            _WORKDIR.value,
            list_only=_LIST.value,
            collect=_COLLECT.value,
            member=_MEMBER.value,
            vectorize=_VECTORIZE.value,
        )

    cli.run_or_exit(work)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
