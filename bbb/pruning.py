"""Weight pruning by signal-to-noise ratio |μ|/σ (Blundell et al. 2015, §5.1, Table 2).

Every weight of the network (kernels and biases alike, ranked together in one global list) is
scored by its signal-to-noise ratio |μ_i| / σ_i; the fraction f with the lowest scores, exactly
⌊f·n⌋ of the n weights, is removed. The baseline criterion scores by |μ_i| alone, which shows
what dividing by σ adds. Ties are broken by position (a stable sort of the flattened weights,
leaves in `jax.tree_util` order).

A removed weight is exactly 0 in every posterior sample: `PrunedGaussian` sets its μ to 0 and its
ρ to `PRUNED_RHO` (so that σ = softplus(ρ) is exactly 0 in float32 and float64) and also
multiplies each sample by a 0/1 mask.

The compact export (`save_compact`) keeps a bit-packed mask and the kept μ and ρ, compressed;
`load_compact` restores the `PrunedGaussian` bit for bit.
"""

from __future__ import annotations

import fractions
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bbb.errors import ConfigError, check_choice, check_probability
from bbb.posterior import MeanFieldGaussian, PointEstimate, count_params
from bbb.special import HALF_LOG_2PI

PyTree = Any
CRITERIA = ("snr", "magnitude")
# softplus(−1e4) = log1p(exp(−1e4)) underflows to exactly 0 in float32 and float64.
PRUNED_RHO = -1.0e4


@flax.struct.dataclass
class PrunedGaussian(MeanFieldGaussian):
    """A mean-field Gaussian with some weights removed: those are exactly 0 in every sample.

    Attributes:
      mask: 1.0 for kept weights and 0.0 for removed ones, a pytree like `mu` (float32).
    """

    mask: PyTree = None

    def mean(self) -> PyTree:
        """μ ∘ mask."""
        return jax.tree_util.tree_map(lambda m, k: m * k, self.mu, self.mask)

    def stddev(self) -> PyTree:
        """σ ∘ mask: exactly 0 for the removed weights."""
        return jax.tree_util.tree_map(lambda s, k: s * k, MeanFieldGaussian.stddev(self), self.mask)

    def signal_to_noise(self) -> PyTree:
        """|μ| / σ for the kept weights, 0 for the removed ones (no signal; not 0/0 = NaN).

        So pruning a pruned posterior again ranks the removed weights first: f removes
        ⌊f·n⌋ weights in all, the earlier ones among them.
        """
        return jax.tree_util.tree_map(
            lambda m, s, k: jnp.where(k > 0, jnp.abs(m) / jnp.where(k > 0, s, 1.0), 0.0),
            self.mu,
            MeanFieldGaussian.stddev(self),
            self.mask,
        )

    def _kept_sigma(self) -> PyTree:
        """σ of the kept weights, 1 at the removed ones (whose σ is 0), so that log σ and 1/σ
        stay finite, with finite gradients, in the branch that `jnp.where` discards."""
        return jax.tree_util.tree_map(
            lambda s, k: jnp.where(k > 0, s, 1.0), MeanFieldGaussian.stddev(self), self.mask
        )

    def _sum_kept(self, tree: PyTree) -> jax.Array:
        """Σ over the kept weights of a pytree like `mu`."""
        kept = jax.tree_util.tree_map(lambda x, k: jnp.where(k > 0, x, 0.0), tree, self.mask)
        return sum((jnp.sum(x) for x in jax.tree_util.tree_leaves(kept)), jnp.float32(0.0))

    def reparameterize(self, eps: PyTree) -> tuple[PyTree, jax.Array]:
        """(w = (μ + σ ∘ ε) ∘ mask, log q(w)) for given noise ε.

        A removed weight is a point mass at 0, left out of the density: log q sums the
        Gaussian log densities of the kept weights only (the inherited form would add
        log σ = log 0 for each removed one, so log q = +inf).

        Args:
          eps: standard normal noise like `mu` (from `sample_noise`).

        Returns:
          (w, log q(w)).
        """
        sigma = self._kept_sigma()
        w = jax.tree_util.tree_map(
            lambda m, s, e, k: (m + s * e) * k, self.mu, sigma, eps, self.mask
        )
        log_q = jax.tree_util.tree_map(
            lambda s, e: -0.5 * jnp.square(e) - jnp.log(s) - HALF_LOG_2PI,
            sigma,
            eps,
        )
        return w, self._sum_kept(log_q)

    def sample_and_log_prob(self, key: jax.Array) -> tuple[PyTree, jax.Array]:
        """A sample (μ + σ ∘ ε) ∘ mask, and log q summed over the kept weights only.

        Args:
          key: a PRNG key (the noise is drawn as for the unpruned posterior).

        Returns:
          (w, log q(w)).
        """
        return self.reparameterize(self.sample_noise(key))

    def log_prob(self, w: PyTree) -> jax.Array:
        """log q(w) of the kept weights (the removed ones, a point mass at 0, are left out).

        Args:
          w: a parameter pytree like `mu`.

        Returns:
          A float32 scalar.
        """
        log_q = jax.tree_util.tree_map(
            lambda x, m, s: -0.5 * jnp.square((x - m) / s) - jnp.log(s) - HALF_LOG_2PI,
            w,
            self.mu,
            self._kept_sigma(),
        )
        return self._sum_kept(log_q)

    def entropy(self) -> jax.Array:
        """H[q] of the kept weights, Σ_kept (½ log 2πe + log σ_i), in nats."""
        per_weight = jax.tree_util.tree_map(
            lambda s: jnp.log(s) + HALF_LOG_2PI + 0.5, self._kept_sigma()
        )
        return self._sum_kept(per_weight)

    def num_kept(self) -> int:
        """The number of weights left."""
        return int(sum(np.sum(np.asarray(k)) for k in jax.tree_util.tree_leaves(self.mask)))


def _flat(tree: PyTree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _unflat(flat: np.ndarray, like: PyTree) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start : start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)


def scores(posterior: MeanFieldGaussian | PointEstimate, criterion: str) -> np.ndarray:
    """Each weight's score, flattened in leaf order: a low score is removed first.

    Args:
      posterior: the trained posterior.
      criterion: "snr" (|μ|/σ, the paper's) or "magnitude" (|μ|, the baseline).

    Returns:
      float32 [n].

    Raises:
      ValueError: an unknown criterion, or "snr" for a point estimate (it has no σ).
    """
    if criterion == "magnitude":
        return np.abs(_flat(posterior.mu))
    if criterion != "snr":
        raise ValueError(f"criterion {criterion!r}: expected one of {CRITERIA}")
    if not isinstance(posterior, MeanFieldGaussian):
        raise ValueError("the 'snr' criterion needs a mean-field posterior (σ > 0)")
    return _flat(posterior.signal_to_noise())


def num_removed(fraction: float, num_weights: int) -> int:
    """⌊f·n⌋, with f read as the decimal it was written as (so 0.29 × 100 gives 29, not 28).

    Args:
      fraction: f in [0, 1].
      num_weights: n.

    Returns:
      The number of weights to remove.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction}: expected a number in [0, 1]")
    return math.floor(fractions.Fraction(repr(float(fraction))) * num_weights)


def prune_mask(posterior: MeanFieldGaussian | PointEstimate, fraction: float, criterion: str):
    """The 0/1 mask that removes the ⌊f·n⌋ lowest-scoring weights (global ranking).

    Args:
      posterior: the trained posterior.
      fraction: f, the share of weights to remove.
      criterion: "snr" or "magnitude".

    Returns:
      A float32 pytree like `posterior.mu`.
    """
    score = scores(posterior, criterion)
    mask = np.ones(score.shape, np.float32)
    mask[np.argsort(score, kind="stable")[: num_removed(fraction, score.size)]] = 0.0
    return _unflat(mask, posterior.mu)


def prune(
    posterior: MeanFieldGaussian | PointEstimate, fraction: float, criterion: str = "snr"
) -> PrunedGaussian | PointEstimate:
    """Removes the fraction f of the weights with the lowest score.

    Args:
      posterior: the trained posterior.
      fraction: f in [0, 1].
      criterion: "snr" (|μ|/σ) or "magnitude" (|μ|).

    Returns:
      A `PrunedGaussian` (μ = 0, ρ = PRUNED_RHO, mask = 0 at the removed weights; the others
      unchanged, so f = 0 changes nothing), or for a point estimate a `PointEstimate` with the
      removed weights set to 0.

    Raises:
      ValueError: `posterior` is already pruned by more than ⌊f·n⌋ weights (a removed weight
        cannot come back: its μ and ρ are gone).
    """
    mask = prune_mask(posterior, fraction, criterion)
    if isinstance(posterior, PrunedGaussian):
        n = count_params(posterior.mu)
        already = n - posterior.num_kept()
        if already > num_removed(fraction, n):
            raise ValueError(
                f"the posterior already has {already} of its {n} weights removed; a fraction "
                f"of at least {already / n:.6g} is needed, not {fraction}."
            )
        # The removed weights score 0 and go first; keep the old mask as well, whatever ties.
        mask = jax.tree_util.tree_map(lambda new, old: new * np.asarray(old), mask, posterior.mask)
    mu = jax.tree_util.tree_map(
        lambda m, k: jnp.where(k > 0, m, jnp.zeros_like(m)), posterior.mu, mask
    )
    if not isinstance(posterior, MeanFieldGaussian):
        return PointEstimate(mu=mu)
    rho = jax.tree_util.tree_map(
        lambda r, k: jnp.where(k > 0, r, jnp.full_like(r, PRUNED_RHO)), posterior.rho, mask
    )
    mask = jax.tree_util.tree_map(jnp.asarray, mask)
    return PrunedGaussian(mu=mu, rho=rho, noise=posterior.noise, mask=mask)


# The compact export -----------------------------------------------------------------------


def _names(tree: PyTree) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in paths]


def save_compact(path: str, posterior: PrunedGaussian) -> int:
    """Writes the kept weights only: a bit-packed mask and the kept μ and ρ, compressed npz.

    The file holds six arrays: the leaf names and shapes, one bit per weight (`np.packbits` of
    the mask, all leaves end to end), and μ and ρ of the kept weights in that order.

    Args:
      path: the .npz file.
      posterior: a pruned posterior whose `mu` is a nested dict (Flax parameters).

    Returns:
      The file's size in bytes.
    """
    leaves = jax.tree_util.tree_leaves(posterior.mu)
    keep = _flat(posterior.mask) > 0
    np.savez_compressed(
        path,
        names=np.asarray(_names(posterior.mu)),
        ndims=np.asarray([np.ndim(x) for x in leaves], np.int64),
        dims=np.asarray([d for x in leaves for d in np.shape(x)], np.int64),
        noise=np.asarray(posterior.noise),
        mask=np.packbits(keep),
        mu=_flat(posterior.mu)[keep],
        rho=_flat(posterior.rho)[keep],
    )
    return os.path.getsize(path)


def _dense_arrays(posterior: MeanFieldGaussian | PointEstimate) -> dict[str, np.ndarray]:
    """Every μ and ρ (μ only for a point estimate), named "<leaf path>:mu" / ":rho"."""
    names = _names(posterior.mu)
    arrays = {
        f"{name}:mu": np.asarray(mu)
        for name, mu in zip(names, jax.tree_util.tree_leaves(posterior.mu), strict=True)
    }
    if isinstance(posterior, MeanFieldGaussian):
        for name, rho in zip(names, jax.tree_util.tree_leaves(posterior.rho), strict=True):
            arrays[f"{name}:rho"] = np.asarray(rho)
    return arrays


def save_dense(path: str, posterior: MeanFieldGaussian | PointEstimate) -> int:
    """Writes every μ and ρ (μ only for a point estimate), uncompressed npz: the dense
    reference for `save_compact`.

    Args:
      path: the .npz file.
      posterior: the posterior.

    Returns:
      The file's size in bytes.
    """
    np.savez(path, **_dense_arrays(posterior))
    return os.path.getsize(path)


def compressed_size(posterior: MeanFieldGaussian | PointEstimate) -> int:
    """Bytes of `save_dense`'s arrays as a compressed npz (in memory): what compression alone
    saves."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **_dense_arrays(posterior))
    return buffer.getbuffer().nbytes


def load_compact(path: str) -> PrunedGaussian:
    """Reads a `save_compact` file back into the `PrunedGaussian` it was written from.

    Args:
      path: the .npz file.

    Returns:
      The pruned posterior, with nested-dict parameters.
    """
    with np.load(path) as data:
        dims = iter(data["dims"].tolist())
        shapes = [tuple(next(dims) for _ in range(k)) for k in data["ndims"].tolist()]
        total = sum(math.prod(shape) for shape in shapes)
        keep = np.unpackbits(data["mask"], count=total).astype(bool)
        mu = np.zeros(total, data["mu"].dtype)
        rho = np.full(total, PRUNED_RHO, data["rho"].dtype)
        mu[keep], rho[keep] = data["mu"], data["rho"]
        names, noise = data["names"].tolist(), str(data["noise"])
    trees: dict[str, dict] = {"mu": {}, "rho": {}, "mask": {}}
    start = 0
    for name, shape in zip(names, shapes, strict=True):
        stop = start + math.prod(shape)
        for field, values in (("mu", mu), ("rho", rho), ("mask", keep.astype(np.float32))):
            node = trees[field]
            *parents, leaf = name.split("/")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = jnp.asarray(values[start:stop].reshape(shape))
        start = stop
    return PrunedGaussian(mu=trees["mu"], rho=trees["rho"], noise=noise, mask=trees["mask"])


# The experiment ---------------------------------------------------------------------------

# Blundell et al. (2015), Table 2 (2×1200 units), as REFERENCE.md quotes it: % removed → error.
PAPER_TABLE_2 = {0.0: 0.0124, 0.5: 0.0124, 0.75: 0.0124, 0.95: 0.0129, 0.98: 0.0139}


def check_fractions_and_criteria(fractions: Sequence[Any], criteria: Sequence[str]) -> None:
    """Raises ConfigError naming `--fractions` or `--criteria` unless each value is allowed."""
    for fraction in fractions:
        check_probability("--fractions", fraction)
    for criterion in criteria:
        check_choice("--criteria", criterion, CRITERIA)


def pruning_experiment(
    workdir: str,
    fractions_removed: tuple[float, ...] = (0.0, 0.5, 0.75, 0.95, 0.98),
    criteria: tuple[str, ...] = CRITERIA,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prunes a trained run by each criterion and fraction, and evaluates on the test split.

    Writes `workdir/pruning.json`, `workdir/pruning.md`, `workdir/plots/pruning.png`, and the
    compact exports `workdir/pruned/{criterion}_{fraction}.npz` next to `pruned/dense.npz`.

    Args:
      workdir: a finished run's workdir (restored with `bbb.train.load_run`).
      fractions_removed: the fractions f to remove.
      criteria: any of "snr" and "magnitude" ("snr" is skipped for a point estimate).
      seed: the seed of the evaluation's posterior samples (the same for every row).

    Returns:
      The rows of the table: criterion, fraction, weights kept, test error (MC predictive and
      mean weights), test NLL, and compact size in bytes.

    Raises:
      ConfigError: a fraction outside [0, 1] or an unknown criterion, before anything is
        loaded or written.
    """
    from bbb import train

    check_fractions_and_criteria(fractions_removed, criteria)
    experiment, state = train.load_run(workdir)
    if not experiment.free_energy.likelihood.is_classification:
        raise ConfigError("--workdir", workdir, "a classification run (pruning reports test error)")
    splits = train.load_data(experiment.config)
    test = tuple(jnp.asarray(a) for a in splits["test"])
    posterior = state.params["posterior"]
    if not isinstance(posterior, MeanFieldGaussian):
        criteria = tuple(c for c in criteria if c != "snr")
    evaluate = train.compile_evaluate(experiment)
    key = jax.random.key(seed)
    out_dir = os.path.join(workdir, "pruned")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    dense_bytes = save_dense(os.path.join(out_dir, "dense.npz"), posterior)
    dense_compressed_bytes = compressed_size(posterior)
    n = count_params(posterior.mu)
    rows = []
    for criterion in criteria:
        for fraction in fractions_removed:
            pruned = prune(posterior, fraction, criterion)
            params = {**state.params, "posterior": pruned}
            result = jax.device_get(evaluate(params, test, key))
            row = {
                "criterion": criterion,
                "fraction_removed": float(fraction),
                "weights_kept": n - num_removed(fraction, n),
                "test_error": float(result["error"]),
                "test_error_mean_weights": float(result["error_mean_weights"]),
                "test_nll": float(result["nll"]),
            }
            if isinstance(pruned, PrunedGaussian):
                path = os.path.join(out_dir, f"{criterion}_{fraction:g}.npz")
                row["compact_bytes"] = save_compact(path, pruned)
            rows.append(row)
    with open(os.path.join(workdir, "pruning.json"), "w") as f:
        json.dump(
            {
                "num_weights": n,
                "dense_bytes": dense_bytes,
                "dense_compressed_bytes": dense_compressed_bytes,
                "rows": rows,
            },
            f,
            indent=2,
        )
    with open(os.path.join(workdir, "pruning.md"), "w") as f:
        f.write(pruning_table(rows, n, dense_bytes, dense_compressed_bytes))
    plot_pruning(rows, os.path.join(workdir, "plots", "pruning.png"))
    return rows


def pruning_table(
    rows: list[dict[str, Any]],
    num_weights: int,
    dense_bytes: int,
    dense_compressed_bytes: int | None = None,
) -> str:
    """The rows as a Markdown table, with the paper's Table 2 error beside each fraction.

    Args:
      rows: from `pruning_experiment`.
      num_weights: n.
      dense_bytes: the size of the dense μ, ρ export (uncompressed npz).
      dense_compressed_bytes: the same arrays compressed, as the compact export is.

    Returns:
      Markdown text. Compact sizes are given as a share of the dense export; the compact files
      are compressed, so even 0% removed is smaller, by what compression alone saves (the
      compressed dense size is in the first line).
    """
    compressed = (
        f", {dense_compressed_bytes / 1e6:.2f} MB compressed as the compact files are"
        if dense_compressed_bytes
        else ""
    )
    lines = [
        f"Pruning {num_weights} weights (kernels and biases ranked together); dense μ, ρ: "
        f"{dense_bytes / 1e6:.2f} MB (uncompressed npz{compressed}).",
        "",
        "| criterion | removed | weights left | test error (MC) | test error (mean weights) "
        "| test NLL | compact size (% of dense) | paper, SNR (Table 2, 2×1200) |",
        "|--|--|--|--|--|--|--|--|",
    ]
    for r in rows:
        paper = PAPER_TABLE_2.get(round(r["fraction_removed"], 4))
        size = r.get("compact_bytes")
        lines.append(
            f"| {r['criterion']} | {100 * r['fraction_removed']:g}% | {r['weights_kept']} "
            f"| {100 * r['test_error']:.2f}% | {100 * r['test_error_mean_weights']:.2f}% "
            f"| {r['test_nll']:.4f} | "
            + (f"{size / 1e6:.3f} MB ({100 * size / dense_bytes:.1f}%)" if size else "–")
            + " | "
            + (f"{100 * paper:.2f}%" if paper is not None else "–")
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_pruning(rows: list[dict[str, Any]], path: str) -> None:
    """Test error against the fraction removed, for each criterion, beside the paper's Table 2.

    Args:
      rows: from `pruning_experiment`.
      path: the PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"snr": "signal-to-noise |μ|/σ", "magnitude": "magnitude |μ|"}
    for criterion, color in (("snr", "C0"), ("magnitude", "C3")):
        chosen = [r for r in rows if r["criterion"] == criterion]
        if not chosen:
            continue
        x = [100 * r["fraction_removed"] for r in chosen]
        ax.plot(
            x,
            [100 * r["test_error"] for r in chosen],
            "o-",
            color=color,
            label=f"{labels[criterion]}, MC predictive",
        )
        ax.plot(
            x,
            [100 * r["test_error_mean_weights"] for r in chosen],
            "s--",
            color=color,
            label=f"{labels[criterion]}, mean weights",
        )
    ax.plot(
        [100 * f for f in PAPER_TABLE_2],
        [100 * e for e in PAPER_TABLE_2.values()],
        "k*:",
        label="paper, Table 2 (2×1200, SNR)",
    )
    ax.set_xlabel("weights removed (%)")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title("Pruning by signal-to-noise vs by magnitude")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
