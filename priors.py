"""Latent priors fitted after training: where z comes from when sampling, and nothing else.

The trained VAE stays exactly as it is; only the distribution of z changes. A prior state is a
plain dict of tensors, numbers and strings (it loads with torch.load(weights_only=True)) that
records how and on what it was fitted. Three kinds:
  standard   N(0, I), the prior the VAE was trained with.
  gmm        ex-post density estimation (Ghosh et al. 2020, "From variational to deterministic
             autoencoders"): a full-covariance Gaussian mixture fitted by EM to the
             training set's posterior means.
  two_stage  the two-stage VAE (Dai and Wipf 2019, "Diagnosing and enhancing VAE models"):
             a small second VAE trained on the codes, each batch a fresh draw
             mu + sigma * eps from their posteriors as Dai and Wipf train it (measured
             better than the means, docs/RESULTS.md); u ~ N(0, I) -> its decoder's mean -> z.
  flow       a masked autoregressive flow (Papamakarios et al. 2017, MAF) fitted by maximum
             likelihood to the standardised posterior means; u ~ N(0, I) -> the flow's
             inverse -> z.
  riemannian Chadebec and Allassonnière 2022's sampler: HMC on a Riemannian metric built from
             the posterior means and standard deviations (riemannian.py).
Codes in, states and latents out: this file never touches images, datasets or files (the
caller encodes the codes, e.g. with metrics.posterior_means, and saves the state). Errors are
ValueErrors, one line each, for the command line to word."""

import math
import warnings

import torch
import torch.nn.functional as F

import riemannian
from settings import GMM_COMPONENTS, PRIORS  # noqa: F401 (priors.PRIORS; torch-free for the command line)

# Ghosh et al.'s published code: sklearn's GaussianMixture, full covariances, 10 components,
# tol 1e-3 on the mean log-likelihood, at most 2000 EM iterations.
GMM_TOLERANCE = 1e-3
GMM_MAX_ITERATIONS = 2000
GMM_COVARIANCE_RIDGE = 1e-6  # sklearn's reg_covar: keeps every covariance positive definite

# Dai and Wipf use width 1024, depth 3, batch 64, Adam lr 1e-4 for 800 epochs: days of CPU.
# Here a few minutes on 2 cores for 60,000 128-d codes (measured on a shared 2-core machine):
# width 512 at batch 256 takes ~4 s per epoch on 2 threads, ~6 s on 1, so 40 epochs are
# 9,400 steps in 3-4 minutes. Width 1024 gets 12 epochs in that time, and its stage-2 loss
# ended at -105 nats per code against -175 for 512 x 40: steps matter more than width here.
# lr 1e-3, 10x theirs, makes up for the shorter run.
TWO_STAGE_WIDTH = 512
TWO_STAGE_DEPTH = 3
TWO_STAGE_EPOCHS = 40
TWO_STAGE_BATCH_SIZE = 256
TWO_STAGE_LEARNING_RATE = 1e-3
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# The flow: zuko's MAF (maintained, torch only), not a flow of our own. Its size and length were
# chosen by the held-out log-likelihood of the test codes and then FID-10k (docs/RESULTS.md).
FLOW_TRANSFORMS = 8
FLOW_HIDDEN = (256, 256)
FLOW_EPOCHS = 10
FLOW_BATCH_SIZE = 256
FLOW_LEARNING_RATE = 1e-3  # Adam, cosine-annealed to 0 over the fit
FLOW_MIN_SCALE = 1e-3  # floor of the per-dimension standard deviation the codes are divided by


# ---------------------------------------------------------------- codes

def _checked_codes(codes, name="codes"):
    """(N, d) codes (or another such array, called `name` in errors) as a float64 CPU tensor,
    or a ValueError."""
    codes = torch.as_tensor(codes).detach().cpu()
    if codes.dim() != 2 or codes.shape[0] < 2 or codes.shape[1] < 1:
        raise ValueError(f"{name} must be an (N, latent_dim) array with N >= 2, "
                         f"not shape {tuple(codes.shape)}")
    if not codes.is_floating_point():
        raise ValueError(f"{name} must be floating point, not {codes.dtype}")
    codes = codes.double()
    if not torch.isfinite(codes).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return codes


def _checked_sds(code_sds, codes, strictly_positive=False):
    """Posterior standard deviations (N, d) for `codes` as a float64 CPU tensor, or a ValueError."""
    code_sds = _checked_codes(code_sds, "code_sds")
    if code_sds.shape != codes.shape:
        raise ValueError(f"code_sds must have the codes' shape {tuple(codes.shape)}, not {tuple(code_sds.shape)}")
    if strictly_positive and (code_sds <= 0).any():
        raise ValueError("code_sds must be positive")
    if (code_sds < 0).any():
        raise ValueError("code_sds must be non-negative standard deviations")
    return code_sds


def _checked_record(seed, fitted_on):
    """The seed and description a state records, or a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:  # numpy's range
        raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, not {seed!r}")
    if not isinstance(fitted_on, str):
        raise ValueError(f"fitted_on must be a string, not {type(fitted_on).__name__}")


def standard_prior(latent_dim):
    """The VAE's own prior N(0, I) as a state, for callers that always pass one."""
    return {"kind": "standard", "latent_dim": int(latent_dim)}


# ---------------------------------------------------------------- Gaussian mixture

def fit_gmm(codes, n_components=GMM_COMPONENTS, seed=0, fitted_on="", max_codes=None, progress=None):
    """Ghosh et al. 2020's ex-post density: a full-covariance Gaussian mixture fitted by EM
    (k-means start, seeded) to posterior means `codes` (N, d), or to `max_codes` of them drawn
    at random (seeded) where there are more. Refitting with the same seed gives the same state.
    `progress`, if given, is called after each EM iteration as progress(iteration, status).

    sklearn's GaussianMixture rather than a torch EM: on 60,000 x 128 codes with 10 components
    (2 shared CPU cores) it took 1.2-1.4 s per iteration in float64 against 1.6-2.4 s for a
    batched torch EM in float64 (same log-likelihood to 1e-4 nats). torch in float32 was ~2x
    faster, but float64 stays: a VAE's inactive units make covariances near-singular, with
    eigenvalues near the 1e-6 ridge beside ones near 1, at the edge of float32's precision."""
    from sklearn.exceptions import ConvergenceWarning  # imported here: sklearn costs a second at startup
    from sklearn.mixture import GaussianMixture

    codes = _checked_codes(codes)
    _checked_record(seed, fitted_on)
    if max_codes is not None and (isinstance(max_codes, bool) or not isinstance(max_codes, int)
                                  or max_codes < 2):
        raise ValueError(f"max_codes must be an integer of at least 2, not {max_codes!r}")
    if max_codes is not None and codes.shape[0] > max_codes:
        codes = codes[torch.randperm(codes.shape[0], generator=torch.Generator().manual_seed(seed))[:max_codes]]
    n_codes, latent_dim = codes.shape
    if isinstance(n_components, bool) or not isinstance(n_components, int) \
            or not 1 <= n_components <= n_codes:
        raise ValueError(f"n_components must be an integer from 1 to the number of codes "
                         f"({n_codes}), not {n_components!r}")
    mixture = GaussianMixture(n_components, covariance_type="full", tol=GMM_TOLERANCE,
                              reg_covar=GMM_COVARIANCE_RIDGE, max_iter=GMM_MAX_ITERATIONS,
                              random_state=seed)
    if progress is not None:
        # sklearn offers no callback, only its verbose printing; this hook is what that printing
        # calls after every EM iteration (sklearn.mixture._base, unchanged since 0.18).
        mixture._print_verbose_msg_iter_end = lambda iteration, change: progress(
            iteration, f"mean log-likelihood change {change:.2g} nats (stops below {GMM_TOLERANCE:g})")
    with warnings.catch_warnings():  # the state records em_converged; callers word it themselves
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture.fit(codes.numpy())
    return {"kind": "gmm", "latent_dim": latent_dim, "n_components": n_components,
            "n_codes": n_codes, "seed": seed, "fitted_on": fitted_on,
            "em_iterations": int(mixture.n_iter_), "em_converged": bool(mixture.converged_),
            "mean_log_likelihood_nats": float(mixture.lower_bound_),
            "weights": torch.from_numpy(mixture.weights_.copy()),
            "means": torch.from_numpy(mixture.means_.copy()),
            "covariances": torch.from_numpy(mixture.covariances_.copy())}


def _float64_flops_per_second(latent_dim):
    """The rate this machine multiplies float64 matrices of `latent_dim` columns (timed here,
    a few milliseconds): what the fits below spend their time on."""
    import time

    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, latent_dim))
    b = a[:latent_dim].T.copy()
    start, repeats = time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - start < 0.02:
        a @ b
        repeats += 1
    return 2 * 2048 * latent_dim * latent_dim * repeats / (time.perf_counter() - start)


def gmm_fit_seconds(n_codes, latent_dim, n_components=GMM_COMPONENTS, iterations=4):
    """An estimate of fit_gmm's seconds on this machine, for a run's time left: each EM
    iteration costs about 4 n k d^2 float64 operations (a triangular solve per component in the
    E-step, a covariance per component in the M-step); `iterations` counts the k-means start too.
    The default's 400 components on 20,000 Fashion-MNIST codes converged in 2 EM iterations,
    38.8-47.9 s on a 2-core AVX2-only EPYC (2026-12-02), where the 20 assumed before (30
    components took 14) overstated a run's time left by about 1.5 minutes."""
    return iterations * 4 * n_codes * n_components * latent_dim ** 2 / _float64_flops_per_second(latent_dim)


def riemannian_fit_seconds(n_codes, latent_dim, n_centroids=riemannian.CENTROIDS, iterations=200):
    """An estimate of fit_riemannian's seconds: k-means' distances, 2 n k d float64 operations
    an iteration (its k-means took 170 and 173 iterations on 60,000 Fashion-MNIST codes of
    2026-12-02's seed-1 model, the whole fit 4.2 s on a 2-core AVX2 EPYC)."""
    return iterations * 2 * n_codes * n_centroids * latent_dim / _float64_flops_per_second(latent_dim)


def _sample_gmm(state, n, generator, device):
    weights, means = state["weights"].to(device), state["means"].to(device)
    scale_tril = torch.linalg.cholesky(state["covariances"].to(device))
    component = torch.multinomial(weights, n, replacement=True, generator=generator)
    eps = torch.randn((n, means.shape[1]), generator=generator, device=device, dtype=torch.float64)
    z = torch.empty_like(eps)
    # One component at a time: gathering an (n, d, d) stack of factors would not fit for large n.
    for k in range(weights.shape[0]):
        rows = component == k
        z[rows] = means[k] + eps[rows] @ scale_tril[k].T
    return z


# ---------------------------------------------------------------- two-stage VAE

def _dense_shapes(prefix, d_in, d_out, width, depth):
    """Parameter shapes of Dai and Wipf's stage-2 network: `depth` ReLU layers of `width`,
    then one linear layer that sees the last hidden layer and the input itself (their skip)."""
    shapes, fan_in = {}, d_in
    for i in range(depth):
        shapes[f"{prefix}hidden.{i}.weight"], shapes[f"{prefix}hidden.{i}.bias"] = (width, fan_in), (width,)
        fan_in = width
    shapes[f"{prefix}out.weight"], shapes[f"{prefix}out.bias"] = (d_out, width + d_in), (d_out,)
    return shapes


def _decoder_shapes(latent_dim, width, depth):
    shapes = _dense_shapes("", latent_dim, latent_dim, width, depth)
    shapes["log_gamma"] = ()  # log of the decoder's one learned standard deviation, gamma
    return shapes


def _init_params(codes, width, depth, generator):
    """Encoder ("enc." names; its output is [mean, log sd] of u) and decoder, initialised as
    nn.Linear would be, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), but from `generator`.

    gamma starts at the codes' RMS deviation from their mean, the best scale for a decoder that
    knows only the mean (as vae.init_decoder_scale does), not at Dai and Wipf's 1: Adam moves
    log gamma by about one learning rate per step, and a short run has few steps to spare."""
    latent_dim = codes.shape[1]
    shapes = _dense_shapes("enc.", latent_dim, 2 * latent_dim, width, depth)
    shapes.update(_decoder_shapes(latent_dim, width, depth))
    params = {}
    for name, shape in shapes.items():
        fan_in = shapes[name.replace(".bias", ".weight")][-1] if shape else 1
        params[name] = (torch.rand(shape, generator=generator) * 2 - 1).mul_(1 / math.sqrt(fan_in))
    rms = (codes - codes.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6)
    params["log_gamma"] = rms.log().float()
    return {name: value.requires_grad_() for name, value in params.items()}


def _dense(params, prefix, x, depth):
    h = x
    for i in range(depth):
        h = F.relu(F.linear(h, params[f"{prefix}hidden.{i}.weight"], params[f"{prefix}hidden.{i}.bias"]))
    return F.linear(torch.cat([x, h], 1), params[f"{prefix}out.weight"], params[f"{prefix}out.bias"])


def _two_stage_loss(params, z, depth, generator):
    """Batch mean of the stage-2 negative ELBO in nats per code: Dai and Wipf's loss2 (their
    network/two_stage_vae_model.py), a Gaussian decoder N(z_hat, gamma^2 I) with learned gamma."""
    mean_u, log_sd_u = _dense(params, "enc.", z, depth).chunk(2, dim=1)
    u = mean_u + log_sd_u.exp() * torch.randn(mean_u.shape, generator=generator)
    z_hat, log_gamma = _dense(params, "", u, depth), params["log_gamma"]
    # KL(N(mean, sd^2) || N(0, I)) in closed form (Kingma and Welling 2014, appendix B).
    kl = 0.5 * (mean_u.pow(2) + (2 * log_sd_u).exp() - 2 * log_sd_u - 1).sum(1)
    nll = (0.5 * ((z - z_hat) / log_gamma.exp()).pow(2) + log_gamma + HALF_LOG_2PI).sum(1)
    return (kl + nll).mean()


def _learning_rate(base, epoch, epochs):
    """Dai and Wipf halve the rate at epochs 300 and 600 of 800; the same fractions here."""
    return base * 0.5 ** sum(epoch >= epochs * f for f in (3 / 8, 6 / 8))


def fit_two_stage(codes, seed=0, fitted_on="", progress=None, width=TWO_STAGE_WIDTH,
                  depth=TWO_STAGE_DEPTH, epochs=TWO_STAGE_EPOCHS, batch_size=TWO_STAGE_BATCH_SIZE,
                  learning_rate=TWO_STAGE_LEARNING_RATE, code_sds=None):
    """Train Dai and Wipf 2019's second-stage VAE on `codes` (N, d): u has d dimensions, both
    networks are `depth` dense ReLU layers of `width` with a skip from the input to the output
    layer, and the decoder's variance gamma^2 is learned. Seeded: same seed, same state.
    `code_sds` (N, d), the posterior standard deviations of the codes, if given: every batch is
    a fresh draw codes + code_sds * eps from the stage-1 posteriors, as Dai and Wipf train it
    (their demo.py), rather than the means themselves.
    `progress`, if given, is called after each epoch as progress(epochs done, status)."""
    codes = _checked_codes(codes).float()
    if code_sds is not None:
        code_sds = _checked_sds(code_sds, codes).float()
    _checked_record(seed, fitted_on)
    for name, value in (("width", width), ("depth", depth), ("epochs", epochs),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, not {learning_rate!r}")
    n_codes, latent_dim = codes.shape
    generator = torch.Generator().manual_seed(seed)
    params = _init_params(codes, width, depth, generator)
    optimizer = torch.optim.Adam(list(params.values()), lr=learning_rate)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(learning_rate, epoch, epochs)
        order, loss_sum = torch.randperm(n_codes, generator=generator), 0.0
        for start in range(0, n_codes, batch_size):
            rows = order[start:start + batch_size]
            batch = codes[rows]
            if code_sds is not None:
                batch = batch + code_sds[rows] * torch.randn(batch.shape, generator=generator)
            loss = _two_stage_loss(params, batch, depth, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * batch.shape[0]
        epoch_loss = loss_sum / n_codes
        if not math.isfinite(epoch_loss):
            raise ValueError(f"two-stage prior training diverged (loss {epoch_loss}) in epoch {epoch + 1}")
        if progress is not None:
            progress(epoch + 1, f"{epoch_loss:.3f} nats per code, gamma {params['log_gamma'].exp().item():.4g}")
    decoder = {name: params[name].detach().clone() for name in _decoder_shapes(latent_dim, width, depth)}
    return {"kind": "two_stage", "latent_dim": latent_dim, "width": width, "depth": depth,
            "n_codes": n_codes, "seed": seed, "fitted_on": fitted_on, "epochs": epochs,
            "batch_size": batch_size, "learning_rate": float(learning_rate),
            "final_loss_nats_per_code": epoch_loss,
            "decoder_gamma": float(decoder["log_gamma"].exp()), "decoder": decoder}


def _sample_two_stage(state, n, generator, device):
    decoder = {name: t.to(device) for name, t in state["decoder"].items()}
    u = torch.randn((n, state["latent_dim"]), generator=generator, device=device)
    with torch.no_grad():
        # The decoder's mean, as the first stage's images are; gamma only scored training.
        return _dense(decoder, "", u, state["depth"])


# ---------------------------------------------------------------- normalizing flow

def _flow_module(latent_dim, transforms, hidden):
    """zuko's MAF of this size. Built under a forked RNG: its random initial weights are
    overwritten by a fit or a state, and must not move the caller's random stream."""
    import zuko  # imported here: only a flow prior needs it

    with torch.random.fork_rng(devices=[]):
        return zuko.flows.MAF(features=latent_dim, transforms=transforms,
                              hidden_features=tuple(hidden))


def fit_flow(codes, seed=0, fitted_on="", progress=None, transforms=FLOW_TRANSFORMS,
             hidden=FLOW_HIDDEN, epochs=FLOW_EPOCHS, batch_size=FLOW_BATCH_SIZE,
             learning_rate=FLOW_LEARNING_RATE):
    """A masked autoregressive flow (zuko.flows.MAF: `transforms` affine MADE layers of
    `hidden` widths, alternating orders) fitted by maximum likelihood to `codes` (N, d), each
    dimension first standardised by the codes' mean and standard deviation (a VAE's inactive
    units have nearly constant means; the floor keeps them from dominating the likelihood).
    Seeded: same seed, same state. `progress`, if given, is called after each epoch as
    progress(epochs done, status)."""
    codes = _checked_codes(codes).float()
    _checked_record(seed, fitted_on)
    for name, value in (("transforms", transforms), ("epochs", epochs), ("batch_size", batch_size),
                        *((f"hidden width {i + 1}", w) for i, w in enumerate(hidden))):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, not {learning_rate!r}")
    n_codes, latent_dim = codes.shape
    shift, scale = codes.mean(0), codes.std(0).clamp_min(FLOW_MIN_SCALE)
    x_all = (codes - shift) / scale
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = _flow_module(latent_dim, transforms, hidden)
    batch_size = min(batch_size, n_codes)
    steps_per_epoch = n_codes // batch_size
    optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for epoch in range(epochs):
        order, loss_sum = torch.randperm(n_codes, generator=generator), 0.0
        for step in range(steps_per_epoch):  # whole batches only: same-size steps
            loss = -flow().log_prob(x_all[order[step * batch_size:(step + 1) * batch_size]]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
        # Nats per code of z itself: the standardisation's log-determinant added back.
        epoch_nll = loss_sum / steps_per_epoch + scale.log().sum().item()
        if not math.isfinite(epoch_nll):
            raise ValueError(f"flow prior training diverged (loss {epoch_nll}) in epoch {epoch + 1}")
        if progress is not None:
            progress(epoch + 1, f"{-epoch_nll:.2f} nats mean log-likelihood per code")
    return {"kind": "flow", "latent_dim": latent_dim, "transforms": transforms,
            "hidden": list(hidden), "n_codes": n_codes, "seed": seed, "fitted_on": fitted_on,
            "epochs": epochs, "batch_size": batch_size, "learning_rate": float(learning_rate),
            "mean_log_likelihood_nats": -epoch_nll, "shift": shift, "scale": scale,
            "flow": {name: t.detach().clone() for name, t in flow.state_dict().items()}}


def _loaded_flow(state):
    flow = _flow_module(state["latent_dim"], state["transforms"], state["hidden"])
    flow.load_state_dict(state["flow"])
    return flow


def _sample_flow(state, n, generator, device):
    flow = _loaded_flow(state).to(device)
    u = torch.randn((n, state["latent_dim"]), generator=generator, device=device)
    with torch.no_grad():
        x = flow().transform.inv(u)  # zuko's transform maps z to u; its inverse samples
    return x * state["scale"].to(device) + state["shift"].to(device)


# ---------------------------------------------------------------- Riemannian sampler

def fit_riemannian(codes, code_sds, seed=0, fitted_on="", n_centroids=riemannian.CENTROIDS):
    """Chadebec and Allassonnière 2022's sampler (riemannian.py) for posterior means `codes`
    (N, d) and their posterior standard deviations `code_sds` (N, d), seeded."""
    codes = _checked_codes(codes)
    code_sds = _checked_sds(code_sds, codes, strictly_positive=True)
    _checked_record(seed, fitted_on)
    if isinstance(n_centroids, bool) or not isinstance(n_centroids, int) or n_centroids < 2:
        raise ValueError(f"n_centroids must be an integer of at least 2, not {n_centroids!r}")
    return {"kind": "riemannian", "latent_dim": codes.shape[1], "n_codes": codes.shape[0], "seed": seed,
            "fitted_on": fitted_on, **riemannian.fit(codes, code_sds, seed, n_centroids)}


# ---------------------------------------------------------------- checking and sampling

_REQUIRED_KEYS = {"standard": ("latent_dim",),
                  "gmm": ("latent_dim", "n_components", "weights", "means", "covariances"),
                  "two_stage": ("latent_dim", "width", "depth", "decoder"),
                  "flow": ("latent_dim", "transforms", "hidden", "shift", "scale", "flow"),
                  "riemannian": ("latent_dim", "centroids", "inverse_variances", "start_codes",
                                 *riemannian.NUMBERS)}


def _check_tensor(state, key, shape):
    value = state[key]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"prior {key} must be a tensor of shape {tuple(shape)}, not {got}")
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise ValueError(f"prior {key} must hold finite floating-point values")


def _check_positive_int(state, key, most=None):
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"prior {key} must be a positive integer, not {value!r}")
    if most is not None and value > most:
        raise ValueError(f"prior {key} must be at most {most}, not {value!r}")


def _check_gmm(state, d):
    _check_positive_int(state, "n_components")
    k = state["n_components"]
    _check_tensor(state, "weights", (k,))
    _check_tensor(state, "means", (k, d))
    _check_tensor(state, "covariances", (k, d, d))
    weights, covariances = state["weights"].double(), state["covariances"].double()
    if (weights < 0).any() or abs(weights.sum().item() - 1) > 1e-6:
        raise ValueError(f"prior weights must be non-negative and sum to 1, not {weights.sum().item():.6g}")
    if not torch.allclose(covariances, covariances.mT, rtol=1e-8, atol=1e-12):
        raise ValueError("prior covariances must be symmetric")
    if (torch.linalg.cholesky_ex(covariances).info != 0).any():
        raise ValueError("prior covariances must be positive definite")


def _check_two_stage(state, d):
    _check_positive_int(state, "width")
    _check_positive_int(state, "depth")
    decoder = state["decoder"]
    shapes = _decoder_shapes(d, state["width"], state["depth"])
    if not isinstance(decoder, dict) or set(decoder) != set(shapes):
        raise ValueError(f"prior decoder must hold exactly {', '.join(shapes)}")
    for name, shape in shapes.items():
        _check_tensor(decoder, name, shape)


def _check_flow(state, d):
    _check_positive_int(state, "transforms")
    hidden = state["hidden"]
    if not isinstance(hidden, list) or not hidden or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden):
        raise ValueError(f"prior hidden must be a list of positive integers, not {hidden!r}")
    _check_tensor(state, "shift", (d,))
    _check_tensor(state, "scale", (d,))
    if (state["scale"] <= 0).any():
        raise ValueError("prior scale must be positive")
    flow = state["flow"]
    expected = _flow_module(d, state["transforms"], hidden).state_dict()
    if not isinstance(flow, dict) or set(flow) != set(expected):
        raise ValueError(f"prior flow must hold exactly the {len(expected)} tensors of a "
                         f"{state['transforms']}-transform MAF")
    for name, tensor in expected.items():
        if not tensor.is_floating_point():  # zuko's masks and orders: must equal the structure's
            if not isinstance(flow[name], torch.Tensor) or not torch.equal(flow[name], tensor):
                raise ValueError(f"prior flow {name} must be the MAF's own {tuple(tensor.shape)} buffer")
        else:
            _check_tensor(flow, name, tensor.shape)


# The most HMC iterations and leapfrog steps a stored state may ask for (fit writes 100 and 10):
# a corrupt count such as 2**70 would otherwise make --sample run for ever instead of failing.
MAX_HMC_ITERATIONS, MAX_LEAPFROG_STEPS = 100_000, 10_000


def _check_riemannian(state, d):
    _check_positive_int(state, "n_centroids")
    _check_positive_int(state, "hmc_iterations", MAX_HMC_ITERATIONS)
    _check_positive_int(state, "leapfrog_steps", MAX_LEAPFROG_STEPS)
    _check_tensor(state, "centroids", (state["n_centroids"], d))
    _check_tensor(state, "inverse_variances", (state["n_centroids"], d))
    if (state["inverse_variances"] <= 0).any():
        raise ValueError("prior inverse_variances must be positive")
    starts = state["start_codes"]
    if not isinstance(starts, torch.Tensor) or starts.dim() != 2 or starts.shape[0] < 1:
        raise ValueError("prior start_codes must be an (N, latent_dim) tensor with N >= 1")
    _check_tensor(state, "start_codes", (starts.shape[0], d))
    for key in ("temperature", "ridge", "step_size", "momentum_sd"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, float) or not 0 < value < math.inf:
            raise ValueError(f"prior {key} must be a positive finite float, not {value!r}")


def check_prior(state, latent_dim):
    """Raise ValueError (one line) unless `state` is a well-formed prior for latent_dim codes."""
    if not isinstance(state, dict) or state.get("kind") not in PRIORS:
        kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"prior kind must be one of {', '.join(PRIORS)}, not {kind!r}")
    missing = [key for key in _REQUIRED_KEYS[state["kind"]] if key not in state]
    if missing:
        raise ValueError(f"{state['kind']} prior is missing {', '.join(missing)}")
    _check_positive_int(state, "latent_dim")
    if state["latent_dim"] != latent_dim:
        raise ValueError(f"prior was fitted to {state['latent_dim']}-dimensional codes, "
                         f"not the model's {latent_dim}")
    if state["kind"] == "gmm":
        _check_gmm(state, latent_dim)
    elif state["kind"] == "two_stage":
        _check_two_stage(state, latent_dim)
    elif state["kind"] == "flow":
        _check_flow(state, latent_dim)
    elif state["kind"] == "riemannian":
        _check_riemannian(state, latent_dim)


def sample_latents(state, n, generator=None, device="cpu", latent_dim=None):
    """n latents z, (n, d) float32 on `device`, from a prior state; None means N(0, I) and then
    needs latent_dim (if given with a state, it must match). The draws happen where `generator`
    lives (else on `device`), so the same generator seed gives the same z; for N(0, I) they are
    exactly the draws of VanillaVAE.sample with that generator."""
    if state is None:
        if latent_dim is None:
            raise ValueError("sampling N(0, I) without a prior state needs latent_dim")
        state = standard_prior(latent_dim)
    if latent_dim is None and isinstance(state, dict):
        latent_dim = state.get("latent_dim")
    check_prior(state, latent_dim)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of latents must be a positive integer, not {n!r}")
    draw_device = generator.device if generator is not None else torch.device(device)
    if state["kind"] == "gmm":
        z = _sample_gmm(state, n, generator, draw_device)
    elif state["kind"] == "two_stage":
        z = _sample_two_stage(state, n, generator, draw_device)
    elif state["kind"] == "flow":
        z = _sample_flow(state, n, generator, draw_device)
    elif state["kind"] == "riemannian":
        z = riemannian.sample(state, n, generator, draw_device)
    else:
        z = torch.randn((n, state["latent_dim"]), generator=generator, device=draw_device)
    return z.to(device=device, dtype=torch.float32)
