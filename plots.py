"""Matplotlib figures of a run: loss curves, latent maps, outlier-score histograms.
Knows neither models nor datasets."""

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_loss_curves(history, path):
    """Train and test curves of every per-epoch figure in `history` (a list of row dicts)."""
    if not history:
        return
    epochs = [row["epoch"] for row in history]
    names = [k[len("train_"):] for k in history[0] if k.startswith("train_") and f"test_{k[6:]}" in history[0]]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for split in ("train", "test"):
            ax.plot(epochs, [row[f"{split}_{name}"] for row in history], marker=".", label=split)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latent_map(points, labels, path, title):
    """Scatter of 2-D latent coordinates (N, 2), one colour per label."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    classes = sorted(set(int(v) for v in labels))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        mask = labels == c
        ax.scatter(points[mask, 0], points[mask, 1], s=3, alpha=0.6, color=cmap(i % cmap.N), label=str(c))
    ax.legend(markerscale=4, fontsize=7, title="label", loc="best")
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
