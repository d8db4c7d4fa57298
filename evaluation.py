"""The --eval and --outlier_detection reports: run the metrics on a model and its test images,
draw the pictures, and lay the figures out as a JSON file and a printed table, both reports
built alike (a dict with its `files`, then a format_* function for the table).

Tensors in (uint8 images, labels), files and dicts out; reads no datasets itself."""

import json
import math
import os
import time

import torch

import metrics
import sampling
import vae
from progress import Progress
from util import save_image_grid, written_atomically


def write_json(report, path):
    with written_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)


def eval_report(model, images, labels, *, raw_images, iw_samples, kld_weight, binarized, seed,
                fid_samples, cache_dir, out_dir, checkpoint_path, priors, class_names=None,
                fid_precision="fp32", train_images=None):
    """Every --eval figure, the pictures and eval.json in out_dir; returns the report.

    `images` are what the model is scored on (binarised if it was trained so); sample quality
    compares each prior's samples (priors: {name: state}, None for N(0, I)) with `raw_images`,
    whose Inception features (computed in fid_precision) are cached in cache_dir, and, where
    `train_images` (as the encoder saw them in training) are given, so does the decoder's
    floor (decoder_floor). class_names[label] names the latent map's classes."""
    reference = None
    if fid_samples > 0:
        print(f"FID reference: the Inception features of the {raw_images.shape[0]} {model.config.dataset} "
              "test images (cached in --data_dir after the first run)", flush=True)
        reference = inception_reference(model, raw_images, cache_dir, fid_precision)
    print(f"evaluating {checkpoint_path} on {images.shape[0]} {model.config.dataset} test images "
          f"(K={iw_samples}, seed {seed})", flush=True)
    report, means = eval_figures(model, images, iw_samples=iw_samples, kld_weight=kld_weight,
                                 binarized=binarized, seed=seed)
    print("pictures: reconstructions, interpolations, latent traversals, latent map", flush=True)
    report["checkpoint"] = checkpoint_path
    report["files"] = save_pictures(model, images, labels, means, os.path.join(out_dir, "eval"), class_names)
    quality, grids = sample_quality_by_prior(model, priors, fid_samples, seed, reference,
                                             os.path.join(out_dir, "eval"))
    report["files"].update(grids)
    report["sample_quality"] = quality
    if fid_samples > 0 and train_images is not None:
        report["decoder_floor"] = decoder_floor(model, train_images, fid_samples, seed, reference)
    report["fid_prior"] = next(iter(quality))  # the prior --sample would use, listed first
    report["fid"] = quality[report["fid_prior"]]["fid"]
    others = f"; the {report['fid_prior']} prior only (--prior all: every prior)" if len(quality) == 1 else ""
    report["fid_protocol"] = (f"{fid_samples} prior samples (seed {seed}) vs the {raw_images.shape[0]} "
                              f"{model.config.dataset} test images; {protocol_note(fid_precision)}"
                              + ("" if fid_samples >= 10_000 and fid_samples == raw_images.shape[0] else
                                 "; the literature's FID-10k is --fid_samples 10000 against all 10,000 test "
                                 "images (smaller counts bias FID upward)") + others
                              if fid_samples > 0 else "skipped (--fid_samples 0)")
    report["files"]["json"] = os.path.join(out_dir, "eval.json")
    write_json(report, report["files"]["json"])
    return report


def protocol_note(precision):
    import fid  # only when FID ran: its package is slow to import
    return f"{fid.protocol(precision)}; {fid.SAMPLE_QUALITY_PROTOCOL}"


def inception_device(model):
    """The Inception network runs on the model's GPU, or else on the CPU (its TorchScript
    file is not known to run on MPS)."""
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")


def inception_reference(model, raw_images, cache_dir, precision="fp32"):
    """(network, precision, reference_features()) of the test images sample quality is measured
    against."""
    import fid  # loads the Inception network's package only when FID is asked for
    device = inception_device(model)
    net = fid.load_network(device)
    key = f"{model.config.dataset}_{model.config.image_shape[-1]}px_test"
    with Progress("FID reference features", raw_images.shape[0], "image", estimate=True,
                  shorter="--eval_images N (fewer test images) or --fid_samples 0 (no FID)") as bar:
        return net, precision, fid.reference_features(net, raw_images, cache_dir, key, device=device,
                                                      on_progress=bar.update, precision=precision)


GRID_SAMPLES = 64  # images in each prior's sample grid


def sample_quality_by_prior(model, priors, n_samples, seed, reference, stem):
    """({prior: FID, KID, precision, recall, seconds}, {file name: grid path}): the same seed
    for every prior, one Inception pass per prior's samples."""
    quality, grids = {}, {}
    device = next(model.parameters()).device
    for name, state in priors.items():
        start = time.perf_counter()
        grid = sampling.prior_samples_uint8(model, GRID_SAMPLES, torch.Generator(device).manual_seed(seed), state)
        grids[f"samples_{name}"] = f"{stem}_samples_{name}.png"
        save_image_grid(grid.float() / 255, grids[f"samples_{name}"], nrow=8)
        figures = {"fid": None, "kid": None, "kid_std": None, "precision": None, "recall": None}
        if n_samples > 0:
            print(f"sample quality of the {name} prior: {n_samples} samples through the Inception "
                  "network", flush=True)
            with Progress(f"drawing {name} prior samples", n_samples, "image") as bar:
                samples = sampling.prior_samples_uint8(model, n_samples, torch.Generator(device).manual_seed(seed),
                                                       state, on_progress=bar.update)
            figures = quality_of(samples, model, reference, f"{name} prior", "" if len(priors) == 1 else
                                 " or leaving out --prior all (one prior)")
        quality[name] = {**figures, "n_samples": n_samples, "seconds": time.perf_counter() - start}
    return quality, grids


def decoder_floor(model, train_images, n_samples, seed, reference):
    """FID, KID, precision and recall of the decoded posterior means of n_samples training
    images drawn at random (seeded): samples from the training codes themselves, so the best
    that any prior drawing near them can reach with this decoder. What a prior's figure lies
    above it is the prior's; the floor itself is the decoder's."""
    n = min(n_samples, train_images.shape[0])
    rows = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    print(f"the decoder's floor: the posterior means of {n} random training images, decoded, through "
          "the Inception network", flush=True)
    start = time.perf_counter()
    decoded = sampling.codes_uint8(model, metrics.posterior_means(model, train_images[rows]))
    return {**quality_of(decoded, model, reference, "training codes decoded"), "n_samples": n,
            "seconds": time.perf_counter() - start}


def quality_of(samples, model, reference, what, shorter=""):
    """FID, KID, precision and recall of uint8 `samples` against reference = (network, precision,
    the test images' features), the Inception pass shown as progress."""
    import fid
    net, precision, ref = reference
    with Progress(f"Inception features, {what}", samples.shape[0], "image", estimate=True,
                  shorter="--fid_samples 2000 (a noisier FID)" + shorter) as bar:
        feats = fid.features(net, samples, device=inception_device(model), on_progress=bar.update,
                             precision=precision)
    return fid.sample_quality(ref, feats)


def eval_figures(model, images, *, iw_samples, kld_weight, binarized, seed=0):
    """The likelihood, reconstruction and latent figures of --eval on uint8 test `images`.
    Returns (report, posterior means)."""
    config = model.config
    dims = math.prod(config.image_shape)
    seconds = {}
    report = {"dataset": config.dataset, "split": "test", "n_images": int(images.shape[0]),
              "recon_loss": config.recon_loss, "binarized": binarized, "latent_dim": config.latent_dim,
              "dims_per_image": dims, "seed": seed, "likelihood": vae.likelihood_kind(config, binarized)}

    start = time.perf_counter()
    recon, kl = metrics.elbo_per_image(model, images, seed=seed)
    seconds["elbo"] = time.perf_counter() - start
    if not vae.is_likelihood(config):
        report.update(objective_per_image=float((recon + kld_weight * kl).mean()), kld_weight=kld_weight,
                      recon_mse_objective_per_pixel=float(recon.mean()), kl_nats_per_image=float(kl.mean()))
    else:
        neg_elbo = float((recon + kl).mean())
        report.update(neg_elbo_nats_per_image=neg_elbo,
                      neg_elbo_bits_per_dim=metrics.bits_per_dim(neg_elbo, dims),
                      recon_nats_per_image=float(recon.mean()), kl_nats_per_image=float(kl.mean()))
        start = time.perf_counter()
        log_px = iw_bound_with_progress(model, images, iw_samples, seed)
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

    report["seconds"] = seconds
    return report, means


def iw_bound_with_progress(model, images, iw_samples, seed):
    """metrics.iw_log_likelihood, announced with its size and estimated time, and shown as it goes."""
    print(f"importance-weighted bound: {images.shape[0]} images x K={iw_samples} decoder passes",
          flush=True)
    with Progress(f"IW bound K={iw_samples}", images.shape[0], "image", estimate=True,
                  shorter="--iw_samples 100 or --eval_images 1000") as bar:
        return metrics.iw_log_likelihood(model, images, iw_samples, seed=seed, on_progress=bar.update)


def format_eval_table(report):
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
              f"Var_x E[z|x] > {report['active_unit_threshold']}")]
    rows += quality_rows(report)
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    lines = [f"{name:<{width}}  {value:>{value_width}}  {unit}" for name, value, unit in rows]
    if report["likelihood"] is not None:
        lines.append(f"likelihood: {report['likelihood']}")
    lines.append(f"sample quality: {report['fid_protocol']}")
    return "\n".join(lines)


def quality_rows(report):
    """One row per prior, then the decoder's floor: FID (lower is better), KID x 1000 with its
    std, precision (fidelity) and recall (coverage), both higher is better."""
    rows = []
    for name, q in report["sample_quality"].items():
        if q["fid"] is None:
            rows.append((f"FID, {name} prior", "-", "skipped (--fid_samples 0)"))
            continue
        rows.append((f"FID, {name} prior", f"{q['fid']:.2f}", quality_text(q)))
    floor = report.get("decoder_floor")
    if floor is not None:
        rows.append(("FID, training codes decoded", f"{floor['fid']:.2f}", quality_text(floor) +
                     f"; the decoder's floor: {floor['n_samples']} training images' posterior means, "
                     "decoded (no prior can do better with this decoder)"))
    return rows


def quality_text(q):
    pr = "" if q["precision"] is None else f"; precision {q['precision']:.3f}, recall {q['recall']:.3f}"
    return f"KID x 1000 {1000 * q['kid']:.2f} +- {1000 * q['kid_std']:.2f}{pr}"


# ---------------------------------------------------------------- pictures

@torch.no_grad()
def decode_means(model, z):
    return model.mean_image(model.decode(z.to(next(model.parameters()).device))).cpu()


def save_pictures(model, images, labels, means, stem, class_names=None):
    """The --eval PNGs, written as stem_<name>.png; returns {name: path}."""
    from pictures import save_traversal
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

    paths["traversals"], _ = save_traversal(model, images, f"{stem}_traversals.png",
                                            f"{model.config.dataset} test image 0")
    points, how, axes = latent_plane(means)
    paths["latent_map"] = f"{stem}_latent_map.png"
    plot_latent_map(points.numpy(), labels.numpy(), paths["latent_map"],
                    f"{model.config.dataset} test set: posterior means, {how}", class_names, axes)

    if means.shape[1] == 2:
        # Evenly spaced prior quantiles, so each cell covers equal prior mass (Kingma and Welling 2014, fig. 4).
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 15))
        grid = torch.stack(torch.meshgrid(q.flip(0), q, indexing="ij"), -1).reshape(-1, 2)[:, [1, 0]]
        paths["latent_grid"] = f"{stem}_latent_grid.png"
        save_image_grid(decode_means(model, grid), paths["latent_grid"], nrow=15)
    return paths


def latent_plane(means):
    """(N, 2) coordinates: the latent plane itself if it is 2-D, else the first two principal
    components of the posterior means (exact SVD), with a caption and the axes' names."""
    if means.shape[1] == 1:
        return torch.cat([means, torch.zeros_like(means)], 1), "1-D latent (y = 0)", ("z0", "")
    if means.shape[1] == 2:
        return means, "the latent plane (z0, z1)", ("z0", "z1")
    centred = means.double() - means.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    share = float((s[:2] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    return ((centred @ vh[:2].T).float(), f"PCA to 2-D ({share:.0%} of variance)",
            ("principal component 1", "principal component 2"))


# ---------------------------------------------------------------- outlier detection

def outlier_report(model, images_in, images_out, *, out_name, iw_samples, kld_weight, binarized,
                   seed, out_dir, checkpoint_path):
    """Score both test sets, draw the histograms and write the JSON; returns the report."""
    from plots import plot_score_histograms  # matplotlib is slow to import; only needed here
    in_name = model.config.dataset
    print(f"scoring {images_in.shape[0]} {in_name} and {images_out.shape[0]} {out_name} "
          f"test images with {checkpoint_path} (K={iw_samples})", flush=True)
    scores_in = outlier_scores(model, images_in, iw_samples, kld_weight, seed)
    scores_out = outlier_scores(model, images_out, iw_samples, kld_weight, seed + 1)
    report = {"checkpoint": checkpoint_path, "in_dataset": in_name, "out_dataset": out_name,
              "n_in": int(images_in.shape[0]), "n_out": int(images_out.shape[0]), "binarized": binarized,
              "out_images": f"{out_name} test images brought to {model.config.image_shape}: RGB->grey by "
                            "channel mean, grey->RGB by repetition, bilinear resize",
              "positive_class_for_fpr": "in-distribution (FPR = outliers accepted at 95% of inliers accepted)",
              "scores": score_figures(scores_in, scores_out), "files": {}}
    for name in scores_in:
        png = os.path.join(out_dir, f"outliers_{out_name}_{name}.png")
        plot_score_histograms(scores_in[name].numpy(), scores_out[name].numpy(), in_name, out_name,
                              name.replace("_", " "), png,
                              f"{name}: AUROC {report['scores'][name]['auroc']:.3f}")
        report["files"][name] = png
    report["files"]["json"] = os.path.join(out_dir, f"outliers_{out_name}.json")
    write_json(report, report["files"]["json"])
    return report


def format_outlier_table(report):
    lines = [f"{'score':<40} {'AUROC':>7} {'FPR@95%TPR':>11} {'mean in':>10} {'mean out':>10}"]
    for name, r in report["scores"].items():
        lines.append(f"{name:<40} {r['auroc']:>7.4f} {r['fpr_at_95_tpr']:>11.4f} "
                     f"{r['mean_in']:>10.2f} {r['mean_out']:>10.2f}")
    lines.append(f"({report['out_images']}; higher score = more anomalous)")
    return "\n".join(lines)


def outlier_scores(model, images, iw_samples, kld_weight, seed=0):
    """{score name: per-image score, higher meaning more anomalous}."""
    recon, kl = metrics.elbo_per_image(model, images, seed=seed)
    if not vae.is_likelihood(model.config):
        return {"objective": recon + kld_weight * kl}
    neg_log_px = -iw_bound_with_progress(model, images, iw_samples, seed)
    return {"neg_elbo_nats": recon + kl, f"iw_neg_log_likelihood_nats_K{iw_samples}": neg_log_px}


def score_figures(scores_in, scores_out):
    return {name: {"auroc": metrics.auroc(scores_in[name].numpy(), scores_out[name].numpy()),
                   "fpr_at_95_tpr": metrics.fpr_at_tpr(scores_in[name].numpy(), scores_out[name].numpy()),
                   "mean_in": float(scores_in[name].mean()), "mean_out": float(scores_out[name].mean())}
            for name in scores_in}
