"""Pools finished bandit runs by agent and seed, and compares each agent with Bayes by Backprop.

  python scripts/bandit_pool.py --workdirs=runs/bandit,runs/bandit_seed1,runs/bandit_seed2 \
      --out=runs/bandit_pooled

Runs of the same configuration on different `--config.seed` (and, written `path:greedy`, the
ε-greedy agents of a run whose Bayes by Backprop had other settings) pool into one table: every
agent over every seed it ran, and, seed by seed on the same mushrooms, how often Bayes by
Backprop had the lower regret, with the sign test's p-value (bbb.bandit.pool_runs,
pooled_table). The config fields in which the runs differ are listed under the table. Writes
out/pooled.md, out/pooled.json and out/pooled.png (each agent's cumulative regret, mean ± std
over the seeds it ran).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_WORKDIRS = flags.DEFINE_list(
    "workdirs",
    None,
    "Finished bandit runs (scripts/bandit.py); path:greedy or path:thompson takes those agents "
    "only.",
)
_OUT = flags.DEFINE_string("out", None, "Folder for pooled.md and pooled.json (optional).")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
    del argv
    from bbb import bandit

    def run():
        pooled = bandit.pool_runs(_WORKDIRS.value)
        table = bandit.pooled_table(pooled)
        print(table)
        if _OUT.value:
            os.makedirs(_OUT.value, exist_ok=True)
            with open(os.path.join(_OUT.value, "pooled.md"), "w") as f:
                f.write(table)
            rows = {
                name: {f"{k[0]}/{k[1]}": r for k, r in by_seed.items()}
                for name, by_seed in pooled["agents"].items()
            }
            bandit.plot_pooled(os.path.join(_OUT.value, "pooled.png"), pooled)
            del pooled["curves"]  # Per-step arrays, kept in the runs' regret.npz, not the JSON.
            with open(os.path.join(_OUT.value, "pooled.json"), "w") as f:
                json.dump({**pooled, "agents": rows}, f, indent=2)

    cli.run_or_exit(run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
