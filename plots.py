"""Matplotlib figures of a run: loss curves. Knows neither models nor datasets."""

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
