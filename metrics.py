"""What a trained VAE is worth on held-out images: ELBO, the importance-weighted bound on
log p(x), reconstruction error, active units, and outlier-detection scores (AUROC, FPR@95%TPR).

Tensors in, numbers out; images come in as uint8 (N, C, H, W) and every routine is batched.
This file knows no datasets and draws no pictures."""

import contextlib
import copy
import math

import numpy as np
import torch

import vae
from util import MMAP_THRESHOLD, to_float

LOG_2PI = math.log(2 * math.pi)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, section 5.2


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (BatchNorm on its running statistics) for the block, then back."""
    was_training = model.training
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def bits_per_dim(nats_per_image, dims):
    """Nats per image over D = C*H*W dimensions, in bits per dimension: nats / (D ln 2)."""
    return nats_per_image / (dims * math.log(2))


@torch.no_grad()
def elbo_per_image(model, images, batch_size=500, seed=0):
    """Per-image reconstruction term and KL (nats; GenerativeZoo's MSE for --recon_loss mse),
    as float64 CPU tensors: the one test-set ELBO, of the training loop and of --eval. One
    posterior sample per image from a fixed seed, so the figure is a function of the weights."""
    with eval_mode(model) as device:
        generator = torch.Generator(device).manual_seed(seed)
        recon, kl = [], []
        for part in _batches(images.shape[0], batch_size):
            terms = model.loss(to_float(images[part], device), 1.0, generator)
            recon.append(terms["recon"].double())  # on the device: one copy to the host at the end
            kl.append(terms["kl"].double())
    return torch.cat(recon).cpu(), torch.cat(kl).cpu()


def mean_elbo_terms(model, images, kld_weight=1.0, batch_size=500, seed=0):
    """Per-image means of the reconstruction term, KL and objective (recon + kld_weight KL)."""
    recon, kl = elbo_per_image(model, images, batch_size, seed)
    return {"recon": float(recon.mean()), "kl": float(kl.mean()),
            "loss": float((recon + kld_weight * kl).mean())}


def _log_normal(z, mean, logvar):
    """log N(z; mean, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def decodings_per_chunk(model):
    """How many samples the IW bound decodes per call: as many as keep the largest activation
    (the last transposed convolution's output, hidden_dims[0] x H x W floats per sample) within
    48 MiB, under util.MMAP_THRESHOLD, so every chunk reuses heap blocks instead of faulting in
    fresh pages. 501 for 28 x 28 images: 5% faster than 256, and 1000 (over the threshold) was
    25% slower (Fashion-MNIST, K=1000, fp32, 2-core AMD EPYC)."""
    _, h, w = model.config.image_shape
    return max(1, (3 * MMAP_THRESHOLD // 4) // (4 * model.config.hidden_dims[0] * h * w))


@torch.no_grad()
def iw_log_likelihood(model, images, k, seed=0, max_decoded=None, on_progress=None):
    """Per-image importance-weighted lower bound on log p(x) in nats (Burda et al. 2016, eq. 8):
    log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). Float64 CPU tensor.

    Batched over images and samples: each decoder call sees at most `max_decoded` (image,
    sample) pairs (default decodings_per_chunk), so memory stays bounded whatever K is. For the
    Gaussian decoder each image gets one dequantisation draw, so the figure bounds the
    probability of the 8-bit image. on_progress(images done) is called after each batch."""
    max_decoded = max_decoded or decodings_per_chunk(model)
    with eval_mode(model) as device:
        return _iw_log_likelihood(model, images, k, seed, max_decoded, device, on_progress)


def decoding_copy(model):
    """A copy of eval-mode `model` for long decoding passes (the IW bound decodes 10^7 samples):
    each BatchNorm folded into the convolution before it (torch's fuse_conv_bn_eval: the same
    function to float rounding, one pass over memory fewer per layer) and channels-last
    activations, oneDNN's fast layout, and LeakyReLU in place (no gradients here, so no
    autograd needs the input it overwrites; 3-5% of the IW bound's time, measured). The caller's
    model is left as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    fast = copy.deepcopy(model).eval()
    for block in list(fast.decoder) + list(fast.final_layer):
        if (isinstance(block, torch.nn.Sequential) and len(block) == 3
                and isinstance(block[0], (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                and isinstance(block[1], torch.nn.BatchNorm2d)):
            block[0] = fuse_conv_bn_eval(block[0], block[1], transpose=isinstance(block[0], torch.nn.ConvTranspose2d))
            block[1] = torch.nn.Identity()
    for module in fast.modules():
        if isinstance(module, torch.nn.LeakyReLU):
            module.inplace = True
    return fast.to(memory_format=torch.channels_last)


def _iw_log_likelihood(model, images, k, seed, max_decoded, device, on_progress):
    generator = torch.Generator(device).manual_seed(seed)
    decoder = decoding_copy(model)
    images_per_batch = max(1, max_decoded // k)
    samples_per_chunk = max(1, min(k, max_decoded // images_per_batch))
    out = []
    for part in _batches(images.shape[0], images_per_batch):
        x = model.model_input(to_float(images[part], device), generator)
        mu, logvar = model.encode(x)
        log_w = []
        for start in range(0, k, samples_per_chunk):
            kc = min(samples_per_chunk, k - start)
            eps = torch.randn((x.shape[0], kc, mu.shape[1]), generator=generator, device=device)
            z = mu[:, None] + eps * torch.exp(0.5 * logvar)[:, None]
            decoded = decoder.decode(z.reshape(-1, mu.shape[1])).float().view(x.shape[0], kc, *x.shape[1:])
            log_px_z = -model.recon_nll(decoded, x[:, None])  # each image against its kc decodings, uncopied
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = _log_normal(z, mu[:, None], logvar[:, None])
            log_w.append((log_px_z + log_pz - log_qz).double())
        log_w = torch.cat(log_w, dim=1)
        out.append((torch.logsumexp(log_w, dim=1) - math.log(k)).cpu())
        if on_progress is not None:
            on_progress(part.stop)
    return torch.cat(out)


def posterior_means(model, images, batch_size=500):
    """E[z|x] of every image, (N, latent_dim) float32 CPU."""
    return posterior_moments(model, images, batch_size)[0]


@torch.no_grad()
def posterior_moments(model, images, batch_size=500):
    """(E[z|x], the standard deviations of q(z|x)) of every image, each (N, latent_dim) float32
    CPU, in one encoder pass."""
    means, sds = [], []
    with eval_mode(model) as device:
        for part in _batches(images.shape[0], batch_size):
            mu, logvar = model.encode(model.model_input(to_float(images[part], device), u=0.5))
            means.append(mu.float().cpu())
            sds.append((0.5 * logvar.float()).exp().cpu())
    return torch.cat(means), torch.cat(sds)


@torch.no_grad()
def kl_per_dimension_and_means(model, images, batch_size=500):
    """In one encoder pass: the mean KL(q(z_j|x) || N(0, 1)) of each latent dimension over the
    images, nats, (D,) float64 (which coordinates carry information; they sum to the ELBO's KL
    term), and the posterior means E[z|x], (N, D) float32 CPU, as posterior_means gives them."""
    total, means = None, []
    with eval_mode(model) as device:
        for part in _batches(images.shape[0], batch_size):
            mu, logvar = model.encode(model.model_input(to_float(images[part], device), u=0.5))
            kl = vae.kl_terms(mu.double(), logvar.double()).sum(0)
            total = kl if total is None else total + kl
            means.append(mu.cpu())
    return (total / images.shape[0]).cpu(), torch.cat(means)


@torch.no_grad()
def reconstruction_mse(model, images, batch_size=500):
    """Per-image mean squared error in [0, 1] pixel units between each image and the decoder
    mean at its posterior mean. Float64 CPU tensor."""
    errors = []
    with eval_mode(model) as device:
        for part in _batches(images.shape[0], batch_size):
            x = to_float(images[part], device)
            mu, _ = model.encode(model.model_input(x, u=0.5))
            errors.append((model.mean_image(model.decode(mu)) - x).pow(2).flatten(1).mean(1).double().cpu())
    return torch.cat(errors)


def active_units(means, threshold=ACTIVE_UNIT_THRESHOLD):
    """Latent dimensions whose E[z|x] varies over the data by more than `threshold`."""
    return int((means.double().var(dim=0) > threshold).sum())


# ---------------------------------------------------------------- outlier detection

def _mid_ranks(values):
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def auroc(scores_in, scores_out):
    """Area under the ROC curve for telling outliers by a higher score: the probability that
    an outlier scores above an inlier, ties counting half (Mann-Whitney U / (n_in n_out))."""
    scores_in, scores_out = np.asarray(scores_in, float), np.asarray(scores_out, float)
    ranks = _mid_ranks(np.concatenate([scores_in, scores_out]))
    n_in, n_out = len(scores_in), len(scores_out)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    """Fraction of outliers accepted as inliers when the threshold accepts `tpr` of the inliers
    (in-distribution is the positive class, as in Liang et al. 2018): an image is accepted when
    its score is at most the ceil(tpr * n_in)-th smallest inlier score."""
    scores_in, scores_out = np.sort(np.asarray(scores_in, float)), np.asarray(scores_out, float)
    threshold = scores_in[max(0, math.ceil(tpr * len(scores_in)) - 1)]
    return float((scores_out <= threshold).mean())
