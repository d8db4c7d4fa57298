"""Matplotlib figures of a run: loss curves, latent maps, outlier-score histograms.
Knows neither models nor datasets."""

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from util import written_atomically  # noqa: E402

PANELS = {  # history.csv's column (less its train_/test_ prefix): the panel's title with its unit
    "neg_elbo_nats": "-ELBO, nats/image (lower is better)",
    "recon_nats": "reconstruction -log p(x|z), nats/image",
    "kl_nats": "KL(q(z|x) || p(z)), nats/image",
    "recon_mse_per_pixel": "reconstruction MSE per pixel ([-1, 1] units)",
    "loss": "training objective per image",
}
LOG_SCALE_RATIO = 3.0  # a panel whose largest value is this many times its smallest gets a log axis


def loss_panels(history, kld_weight=1.0):
    """[(column, title)] of the panels to draw: every train/test pair of history.csv, without the
    objective when it equals the -ELBO (kld_weight 1)."""
    first = history[0]
    names = [k[len("train_"):] for k in first if k.startswith("train_") and f"test_{k[6:]}" in first]
    if kld_weight == 1.0 and "neg_elbo_nats" in names and "loss" in names:
        names.remove("loss")
    objective = ("objective: recon + {w:g} x KL" if "neg_elbo_nats" in names else
                 "objective: MSE + {w:g} x KL (GenerativeZoo's)").format(w=kld_weight)
    return [(name, objective if name == "loss" else PANELS.get(name, name.replace("_", " ")))
            for name in names]


def plot_loss_curves(history, path, kld_weight=1.0):
    """Train and test curves of every per-epoch figure in `history` (a list of row dicts), one
    panel each, titled with its unit; a log axis where the first epochs dwarf the rest."""
    if not history:
        return
    epochs = [row["epoch"] for row in history]
    panels = loss_panels(history, kld_weight)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, title) in zip(axes[0], panels):
        values = []
        for split in ("train", "test"):
            ys = [row[f"{split}_{name}"] for row in history]
            values += ys
            ax.plot(epochs, ys, marker="o" if len(epochs) < 20 else ".", label=split)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one point: a window around it, not matplotlib's +-0.05 epoch
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        if min(values) > 0 and max(values) > LOG_SCALE_RATIO * min(values):
            ax.set_yscale("log")
        ax.legend()
    _save(fig, path)


def plot_latent_map(points, labels, path, title, class_names=None, axis_names=("z1", "z2")):
    """Scatter of 2-D latent coordinates (N, 2), one colour per label, named by
    class_names[label] where given."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    classes = sorted(set(int(v) for v in labels))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        mask = labels == c
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        ax.scatter(points[mask, 0], points[mask, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=name)
    ax.legend(markerscale=4, fontsize=7, title="class", loc="best")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_score_histograms(scores_in, scores_out, name_in, name_out, xlabel, path, title):
    """Overlaid histograms of two score sets on shared bins."""
    fig, ax = plt.subplots(figsize=(6, 4))
    both = [float(v) for v in list(scores_in) + list(scores_out)]
    bins = 60 if max(both) > min(both) else 1
    ax.hist(scores_in, bins=bins, range=(min(both), max(both)), alpha=0.55, density=True, label=name_in)
    ax.hist(scores_out, bins=bins, range=(min(both), max(both)), alpha=0.55, density=True, label=name_out)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend()
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    with written_atomically(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
