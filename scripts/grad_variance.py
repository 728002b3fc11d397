"""Gradient variance of each estimator at a run's checkpoint (Kingma et al. 2015, Table 1 style).

  python scripts/grad_variance.py --workdir=runs/mnist --num_draws=100

For the free energy's gradient and for the expected log-likelihood's alone (--terms), the
estimators differing only in the second. Writes workdir/grad_variance.md and
workdir/grad_variance.json ({"step", "num_draws", "fixed_batch", "terms": {term: {estimator:
{layer: var}}}}).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from absl import app, flags

from bbb import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir (its latest checkpoint).")
_NUM_DRAWS = flags.DEFINE_integer("num_draws", 100, "Draws of (minibatch, noise).")
_ESTIMATORS = flags.DEFINE_list(
    "estimators", ["reparam", "per_example", "local_reparam", "flipout"], "Estimators."
)
_TERMS = flags.DEFINE_list(
    "terms",
    ["free_energy", "likelihood"],
    "Gradients measured: the free energy's, and/or the expected log-likelihood's alone.",
)
_FIXED_BATCH = flags.DEFINE_boolean(
    "fixed_batch",
    False,
    "Draw the noise only, on one fixed minibatch: the estimator's own variance, without the "
    "minibatch's.",
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    from bbb import grad_variance, train

    def run():
        from bbb.errors import check_choice

        for estimator in _ESTIMATORS.value:  # before loading anything
            check_choice("estimators", estimator, grad_variance.ESTIMATORS)
        for term in _TERMS.value:
            check_choice("terms", term, grad_variance.TERMS)
        grad_variance.check_num_draws(_NUM_DRAWS.value)
        experiment, state = train.load_run(_WORKDIR.value)
        x, y = train.load_data(experiment.config)["train"]
        data = (jnp.asarray(x), jnp.asarray(y))
        results = {term: {} for term in _TERMS.value}
        for term in _TERMS.value:
            for estimator in _ESTIMATORS.value:
                results[term][estimator] = grad_variance.gradient_variance(
                    experiment.free_energy,
                    state.params,
                    data,
                    jax.random.key(0),
                    estimator=estimator,
                    batch_size=experiment.config.batch_size,
                    num_draws=_NUM_DRAWS.value,
                    term=term,
                    fixed_batch=_FIXED_BATCH.value,
                )
                print(term, estimator, results[term][estimator], flush=True)
        step = int(state.step)
        report = grad_variance.variance_report(
            results, _NUM_DRAWS.value, step, _WORKDIR.value, _FIXED_BATCH.value
        )
        with open(os.path.join(_WORKDIR.value, "grad_variance.md"), "w") as f:
            f.write(report)
        with open(os.path.join(_WORKDIR.value, "grad_variance.json"), "w") as f:
            json.dump(
                {
                    "step": step,
                    "num_draws": _NUM_DRAWS.value,
                    "fixed_batch": _FIXED_BATCH.value,
                    "terms": results,
                },
                f,
            )
        print(report)

    cli.run_or_exit(run)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags_or_exit)
