"""Times a training step of Bayes by Backprop against the plain MLP floor (and a peer).

  python scripts/benchmark.py                                # the whole grid, ~1 h on 2 cores
  python scripts/benchmark.py --quick                        # H=400, K=1, no epoch: minutes
  python scripts/benchmark.py --hidden=400 --num_samples=1,8 --estimators=reparam,flipout
  python scripts/benchmark.py --ablation                     # where the time of a step goes
  python scripts/benchmark.py --peer --peer_python=.venv-peer/bin/python --json=bench.json

The MLP 784-H-H-10, batch 128, Adam, on random MNIST-shaped data: the real jitted train_step
(state donated; compilation timed apart; configurations interleaved in --repeats rounds, each
running a configuration's step back to back --calls_per_round times after one untimed call;
the median) and the real epoch
loop (390 steps of 128); every time also as a ratio to the deterministic MLP of the same H in
the same run. What each number means is in bbb/benchmark.py. The peer's environment:

  python3 -m venv .venv-peer && .venv-peer/bin/pip install torch==2.13.0 bayesian-torch==0.5.0

Run it on a quiet machine: other load changes absolute times by ±30% (ratios much less).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bbb import cli

_HIDDEN = flags.DEFINE_list("hidden", ["400", "1200"], "Hidden widths H.")
_NUM_SAMPLES = flags.DEFINE_list("num_samples", ["1", "2", "8"], "MC samples per step K.")
_ESTIMATORS = flags.DEFINE_list(
    "estimators", ["reparam", "local_reparam", "flipout"], "Gradient estimators."
)
_PRIORS = flags.DEFINE_list(
    "priors",
    ["scale_mixture", "gaussian"],
    "Priors: scale_mixture (with the MC KL) and/or gaussian (with the closed-form KL).",
)
_NOISES = flags.DEFINE_list(
    "noises",
    ["jax", "hash"],
    "Noise generators of the Bayesian cases: hash (bbb's counter-based hash); jax (threefry) is "
    "always timed too, as the reference.",
)
_DTYPES = flags.DEFINE_list(
    "dtypes", ["float32"], "Compute dtypes of the hidden layers (model.dtype): float32, bfloat16."
)
_REPEATS = flags.DEFINE_integer(
    "repeats", 20, "Timed rounds per configuration, the configurations interleaved."
)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed rounds after compilation.")
_CALLS_PER_ROUND = flags.DEFINE_integer(
    "calls_per_round",
    4,
    "Timed steps of a configuration per round, back to back after one untimed call (warm "
    "caches, as in training); 0 times one cold call per round.",
)
_EPOCH_REPEATS = flags.DEFINE_integer(
    "epoch_repeats", 1, "Timed epochs (390 steps) per configuration; 0 skips the epoch."
)
_EPOCH_EXAMPLES = flags.DEFINE_integer(
    "epoch_examples", 50_000, "Random examples of a timed epoch (the paper's 50,000)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Minibatch size B.")
_QUICK = flags.DEFINE_boolean(
    "quick", False, "H=400, K=1 and no epoch, unless --hidden/--num_samples/--epoch_repeats say."
)
_ABLATION = flags.DEFINE_boolean(
    "ablation",
    False,
    "Break the step down (the paper's reparam, and local_reparam with the Gaussian prior and "
    "closed-form KL; K=1) instead of the grid.",
)
_PEER = flags.DEFINE_boolean("peer", False, "Also time bayesian-torch (see --peer_python).")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", ".venv-peer/bin/python", "Python of an environment with bayesian-torch."
)
_PEER_THREADS = flags.DEFINE_integer("peer_threads", 2, "Torch threads of the peer.")
_PEER_HOST_MEMORY = flags.DEFINE_list(
    "peer_host_memory",
    ["kept", "default"],
    "The peer's malloc: 'kept' (bbb's own policies, bbb.hostmem: freed memory kept, huge pages) "
    "and/or glibc's 'default'.",
)
_JSON = flags.DEFINE_string("json", None, "Write the records to this JSON file.")
_LIST = flags.DEFINE_boolean("list", False, "Print the configurations as JSON lines; time nothing.")
_PROGRESS = flags.DEFINE_boolean(
    "progress", True, "Show a progress bar with ETA over compilations and timed rounds (stderr)."
)


def _value(flag, quick_value):
    """The flag's value, or `quick_value` under --quick when the flag was not given."""
    return quick_value if _QUICK.value and not flags.FLAGS[flag.name].present else flag.value


def _integers(name, values):
    from bbb.errors import ConfigError

    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(name, ",".join(values), "comma-separated integers") from None


def main(argv):
    del argv
    from bbb import benchmark
    from configs import mnist

    def log(line):
        print(line, file=sys.stderr, flush=True)

    cli.run_or_exit(
        lambda: benchmark.run(
            mnist.get_config(),
            hidden=_integers("hidden", _value(_HIDDEN, ["400"])),
            num_samples=_integers("num_samples", _value(_NUM_SAMPLES, ["1"])),
            estimators=_ESTIMATORS.value,
            priors=_PRIORS.value,
            noises=_NOISES.value,
            dtypes=_DTYPES.value,
            repeats=_REPEATS.value,
            warmup=_WARMUP.value,
            calls_per_round=_CALLS_PER_ROUND.value,
            epoch_repeats=_value(_EPOCH_REPEATS, 0),
            epoch_examples=_EPOCH_EXAMPLES.value,
            batch_size=_BATCH_SIZE.value,
            ablation=_ABLATION.value,
            peer_python=_PEER_PYTHON.value if _PEER.value else None,
            peer_threads=_PEER_THREADS.value,
            peer_host_memory=_PEER_HOST_MEMORY.value,
            json_path=_JSON.value,
            list_only=_LIST.value,
            log=log,
            progress=_PROGRESS.value,
        )
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
