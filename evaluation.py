"""The --eval and --outlier_detection reports: run the metrics on a model and its test images,
draw the pictures, and lay the figures out as a table and a JSON-ready dict.

Tensors in (uint8 images, labels), files and dicts out; reads no datasets itself."""

import math
import time

import torch

import metrics
from util import save_image_grid

BINARIZE_TEST_SEED = 0  # every model is evaluated on the same binarisation of the test set


def binarize_fixed(images_uint8, seed=BINARIZE_TEST_SEED):
    """A fixed (seeded) binarisation of uint8 images, returned as uint8 in {0, 255}."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images_uint8.float().div(255), generator=generator).mul(255).to(torch.uint8)


def likelihood_kind(recon_loss, binarized):
    """What the model's nats are, in words; None where there is no likelihood."""
    if recon_loss == "mse":
        return None
    if recon_loss == "gaussian":
        return "density of uniformly dequantised 8-bit data (comparable with published bits/dim)"
    if binarized:
        return "Bernoulli likelihood of binarised images (comparable with binarised-MNIST results)"
    return ("Bernoulli cross-entropy on grey [0,1] intensities: NOT a likelihood of 8-bit data, "
            "not comparable with published nats or bits/dim (train with --binarize for that)")


def evaluate(model, images, labels, *, iw_samples, kld_weight, binarized, seed=0,
             fid_samples=0, fid_reference=None, fid_net=None):
    """All figures of --eval on uint8 test `images`; fid_reference is (mu, sigma, description)."""
    config = model.config
    dims = math.prod(config.image_shape)
    seconds = {}
    report = {"dataset": config.dataset, "split": "test", "n_images": int(images.shape[0]),
              "recon_loss": config.recon_loss, "binarized": binarized, "latent_dim": config.latent_dim,
              "dims_per_image": dims, "seed": seed, "likelihood": likelihood_kind(config.recon_loss, binarized)}

    start = time.perf_counter()
    recon, kl = metrics.elbo_per_image(model, images, seed=seed)
    seconds["elbo"] = time.perf_counter() - start
    if config.recon_loss == "mse":
        report.update(objective_per_image=float((recon + kld_weight * kl).mean()), kld_weight=kld_weight,
                      recon_mse_objective_per_pixel=float(recon.mean()), kl_nats_per_image=float(kl.mean()))
    else:
        neg_elbo = float((recon + kl).mean())
        report.update(neg_elbo_nats_per_image=neg_elbo,
                      neg_elbo_bits_per_dim=metrics.bits_per_dim(neg_elbo, dims),
                      recon_nats_per_image=float(recon.mean()), kl_nats_per_image=float(kl.mean()))
        start = time.perf_counter()
        log_px = metrics.iw_log_likelihood(model, images, iw_samples, seed=seed)
        seconds["iw_bound"] = time.perf_counter() - start
        nll = float(-log_px.mean())
        report.update(iw_samples=iw_samples, iw_neg_log_likelihood_nats_per_image=nll,
                      iw_neg_log_likelihood_bits_per_dim=metrics.bits_per_dim(nll, dims))

    start = time.perf_counter()
    report["recon_mse_per_pixel"] = float(metrics.reconstruction_mse(model, images).mean())
    means = metrics.posterior_means(model, images)
    report["active_units"] = metrics.active_units(means)
    report["active_unit_threshold"] = metrics.ACTIVE_UNIT_THRESHOLD
    seconds["reconstruction_and_latents"] = time.perf_counter() - start

    if fid_samples > 0:
        import fid
        start = time.perf_counter()
        samples = metrics.prior_samples_uint8(model, fid_samples, seed=seed)
        mu, sigma = fid.statistics(fid.features(fid_net, samples).numpy())
        ref_mu, ref_sigma, ref_description = fid_reference
        report["fid"] = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
        report["fid_protocol"] = (f"{fid_samples} prior samples (seed {seed}) vs {ref_description}; "
                                  f"{fid.PROTOCOL}")
        seconds["fid"] = time.perf_counter() - start
    else:
        report["fid"], report["fid_protocol"] = None, "skipped (--fid_samples 0)"
    report["seconds"] = seconds
    return report, means


def format_table(report):
    """The report as aligned 'figure  value  unit' lines."""
    rows = [("images evaluated", f"{report['n_images']}", f"{report['dataset']} test split"
             + (", fixed binarisation" if report["binarized"] else ""))]
    if report["likelihood"] is None:
        rows += [("objective", f"{report['objective_per_image']:.5f}",
                  f"per image: MSE on [-1,1] + {report['kld_weight']:g} x KL (no likelihood: --recon_loss mse)"),
                 ("  MSE term", f"{report['recon_mse_objective_per_pixel']:.5f}", "per pixel, [-1,1] units"),
                 ("  KL", f"{report['kl_nats_per_image']:.2f}", "nats/image")]
    else:
        rows += [("-ELBO", f"{report['neg_elbo_nats_per_image']:.2f}",
                  f"nats/image = {report['neg_elbo_bits_per_dim']:.4f} bits/dim"),
                 ("  reconstruction", f"{report['recon_nats_per_image']:.2f}", "nats/image"),
                 ("  KL", f"{report['kl_nats_per_image']:.2f}", "nats/image"),
                 (f"-log p(x), IW bound K={report['iw_samples']}",
                  f"{report['iw_neg_log_likelihood_nats_per_image']:.2f}",
                  f"nats/image = {report['iw_neg_log_likelihood_bits_per_dim']:.4f} bits/dim (upper bound)")]
    rows += [("reconstruction MSE", f"{report['recon_mse_per_pixel']:.5f}",
              "per pixel, [0,1] units, decoder mean at the posterior mean"),
             ("active units", f"{report['active_units']} / {report['latent_dim']}",
              f"Var_x E[z|x] > {report['active_unit_threshold']}"),
             ("FID", "-" if report["fid"] is None else f"{report['fid']:.2f}", report["fid_protocol"])]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    lines = [f"{name:<{width}}  {value:>{value_width}}  {unit}" for name, value, unit in rows]
    if report["likelihood"] is not None:
        lines.append(f"likelihood: {report['likelihood']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- pictures

@torch.no_grad()
def decode_means(model, z):
    return model.mean_image(model.decode(z.to(next(model.parameters()).device))).cpu()


def save_pictures(model, images, labels, means, stem):
    """The --eval PNGs, written as stem_<name>.png; returns {name: path}."""
    from plots import plot_latent_map
    paths = {}
    k = min(8, images.shape[0])
    x = images[:k].float() / 255
    paths["reconstructions"] = f"{stem}_reconstructions.png"
    save_image_grid(torch.cat([x, decode_means(model, means[:k])]), paths["reconstructions"], nrow=k)

    pairs = min(8, images.shape[0] // 2)
    if pairs:
        steps = torch.linspace(0, 1, 10)[None, :, None]
        z = means[:pairs, None] * (1 - steps) + means[pairs:2 * pairs, None] * steps
        paths["interpolations"] = f"{stem}_interpolations.png"
        save_image_grid(decode_means(model, z.reshape(-1, means.shape[1])), paths["interpolations"], nrow=10)

    points, how = latent_plane(means)
    paths["latent_map"] = f"{stem}_latent_map.png"
    plot_latent_map(points.numpy(), labels.numpy(), paths["latent_map"],
                    f"{model.config.dataset} test set: posterior means, {how}")

    if means.shape[1] == 2:
        # Evenly spaced prior quantiles, so each cell covers equal prior mass (Kingma and Welling 2014, fig. 4).
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 15))
        grid = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1).reshape(-1, 2)[:, [1, 0]]
        paths["latent_grid"] = f"{stem}_latent_grid.png"
        save_image_grid(decode_means(model, grid), paths["latent_grid"], nrow=15)
    return paths


def latent_plane(means):
    """(N, 2) coordinates: the latent plane itself if it is 2-D, else the first two principal
    components of the posterior means (exact SVD), with a caption."""
    if means.shape[1] == 1:
        return torch.cat([means, torch.zeros_like(means)], 1), "1-D latent (y = 0)"
    if means.shape[1] == 2:
        return means, "the latent plane (z1, z2)"
    centred = means.double() - means.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    share = float((s[:2] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    return (centred @ vh[:2].T).float(), f"PCA to 2-D ({share:.0%} of variance)"


# ---------------------------------------------------------------- outlier detection

def outlier_scores(model, images, iw_samples, kld_weight, seed=0):
    """{score name: per-image score, higher meaning more anomalous}."""
    recon, kl = metrics.elbo_per_image(model, images, seed=seed)
    if model.config.recon_loss == "mse":
        return {"objective": recon + kld_weight * kl}
    return {"neg_elbo_nats": recon + kl,
            f"iw_neg_log_likelihood_nats_K{iw_samples}": -metrics.iw_log_likelihood(model, images, iw_samples, seed=seed)}


def outlier_report(scores_in, scores_out):
    return {name: {"auroc": metrics.auroc(scores_in[name].numpy(), scores_out[name].numpy()),
                   "fpr_at_95_tpr": metrics.fpr_at_tpr(scores_in[name].numpy(), scores_out[name].numpy()),
                   "mean_in": float(scores_in[name].mean()), "mean_out": float(scores_out[name].mean())}
            for name in scores_in}
