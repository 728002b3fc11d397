"""Plots the learning curves of several runs side by side, with a table of their results.

  python scripts/curves.py --workdirs=runs/mnist_reparam,runs/mnist,runs/mnist_flipout \
      --labels=reparam,local_reparam,flipout --out=runs/estimators.png

Writes the PNG and, next to it, the Markdown table (also printed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated run workdirs.")
_LABELS = flags.DEFINE_list("labels", None, "A label per workdir (default: their names).")
_OUT = flags.DEFINE_string("out", "curves.png", "The PNG to write (the table goes to .md).")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
    del argv
    from bbb import curves
    from bbb.errors import ConfigError

    def run():
        labels = _LABELS.value
        if labels and len(labels) != len(_WORKDIRS.value):
            raise ConfigError("--labels", ",".join(labels), "one label per workdir")
        print(curves.plot_runs(_WORKDIRS.value, labels, _OUT.value), end="")

    cli.run_or_exit(run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
