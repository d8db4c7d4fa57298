"""Watching a run: progress lines in a log, TensorBoard event files that match history.csv,
latent traversals, the animation of the samples, and readable pictures."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # TensorBoard's own reader

import checkpoint
import data
import pictures
import plots
import sampling
import util
from helpers import TINY_MODEL, run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "--seed", "3"]


def train(data_dir, out, *flags):
    result = run_cli("--train", "--dataset", "mnist", "--data_dir", data_dir, "--output_dir", out, *TINY, *flags)
    assert result.returncode == 0, result.stderr
    return result


def history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def run_folder(out):
    return Path(checkpoint.run_dir(out, checkpoint.default_path(out, "mnist")))


@pytest.mark.long
def test_a_log_file_shows_progress_lines_before_the_first_epoch_ends(long_data, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # a file, not a terminal: no progress bar can be drawn
        result = subprocess.run([sys.executable, str(REPO / "VanVAE.py"), "--train", "--dataset", "mnist",
                                 "--data_dir", long_data, "--output_dir", tmp_path / "out", "--n_epochs", "1",
                                 "--progress_seconds", "0", *TINY], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                timeout=300)
    assert result.returncode == 0
    lines = log.read_text().splitlines()
    epoch_end = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1 "))
    progress = [line for line in lines[:epoch_end] if line.startswith("  epoch 1/1: ")]
    assert progress, lines
    assert "/2400 images (" in progress[0] and "images/s" in progress[0]
    assert " left" in progress[0] and "run " in progress[0] and "step " in progress[-1]
    assert "\r" not in log.read_text()  # no bar redrawn into the file


def scalars(run):
    """{tag: [(step, value)]} read back by TensorBoard's reader, with its purging of the steps
    a resumed run rewrote."""
    reader = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}, \
        {tag: [e.step for e in reader.Images(tag)] for tag in reader.Tags()["images"]}


def test_tensorboard_scalars_equal_history_csv_at_the_global_step(small_data, tmp_path):
    train(small_data, tmp_path / "out", "--n_epochs", "2", "--tensorboard", "--lr", "0.001")
    run = run_folder(tmp_path / "out")
    values, images = scalars(run)
    rows = history(run)
    steps_per_epoch = 64 // 8
    for column in rows[0]:
        if column == "epoch":
            continue
        assert [step for step, _ in values[column]] == [steps_per_epoch, 2 * steps_per_epoch], column
        assert [v for _, v in values[column]] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)
    assert [v for _, v in values["lr"]] == pytest.approx([0.001, 0.001])
    running = values["step/train_loss_running"]
    assert [s for s, _ in running] == [1, 8, 9, 16]  # step 0 and the last step of each epoch
    assert set(images) == {"samples", "reconstructions", "traversals"}
    assert images["samples"] == [2 * steps_per_epoch]  # the one save, after the last epoch


@pytest.mark.long
def test_a_resumed_run_has_one_value_per_step_on_every_curve(small_data, tmp_path):
    out = tmp_path / "out"
    train(small_data, out, "--n_epochs", "2", "--tensorboard")
    ckpt = checkpoint.default_path(out, "mnist")
    shutil.copy(ckpt, tmp_path / "after_epoch_2.pt")
    train(small_data, out, "--n_epochs", "3", "--tensorboard", "--resume")
    # What a run killed after logging epoch 3 but before saving it leaves: epoch 3 on the
    # curves, epoch 2 in the checkpoint. Resuming must not draw epoch 3 twice.
    shutil.copy(tmp_path / "after_epoch_2.pt", ckpt)
    train(small_data, out, "--n_epochs", "3", "--tensorboard", "--resume")
    run = run_folder(out)
    values, _ = scalars(run)
    rows = history(run)
    assert len(rows) == 3
    for tag, points in values.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [s for s, _ in values["test_neg_elbo_nats"]] == [8, 16, 24]
    assert [v for _, v in values["test_neg_elbo_nats"]] == pytest.approx(
        [float(r["test_neg_elbo_nats"]) for r in rows], rel=1e-6)


def test_traversal_png_has_one_labelled_row_per_chosen_dimension(small_data, tmp_path):
    train(small_data, tmp_path / "out", "--n_epochs", "1")
    model = checkpoint.load(checkpoint.default_path(tmp_path / "out", "mnist")).model
    images, _ = data.load_test_images("mnist", small_data)
    grid, rows, scale = pictures.traversal(model, images)
    assert 1 <= len(rows) <= min(pictures.TRAVERSAL_DIMS, 4)
    assert [kl for _, kl in rows] == sorted((kl for _, kl in rows), reverse=True)
    path, _ = pictures.save_traversal(model, images, str(tmp_path / "t.png"), "test")
    cell = 28 * scale + 2
    with Image.open(path) as picture:
        assert picture.size == (pictures.LABEL_PX + pictures.TRAVERSAL_STEPS * cell + 2,
                                pictures.HEADER_PX + len(rows) * cell + 2)
    # The picture saved at each save of the run is the same kind of picture.
    with Image.open(run_folder(tmp_path / "out") / "traversals_epoch_0001.png") as saved:
        assert saved.height == pictures.HEADER_PX + len(rows) * cell + 2


def test_traversal_rows_are_the_active_dimensions_most_kl_first():
    kl = torch.tensor([0.5, 3.0, 0.01, 2.0, 9.0], dtype=torch.float64)
    means = torch.zeros(100, 5)
    means[:, [0, 1, 3]] = torch.randn(100, 3)  # dimension 4 has the most KL but never varies
    assert pictures.traversal_dimensions(kl, means) == [1, 3, 0]
    assert pictures.traversal_dimensions(kl, torch.zeros(100, 5)) == [4, 1, 3, 0, 2]  # none active


def test_the_samples_animation_has_one_frame_per_save(small_data, tmp_path):
    train(small_data, tmp_path / "out", "--n_epochs", "3", "--sample_and_save_frequency", "1")
    run = run_folder(tmp_path / "out")
    with Image.open(run / "samples_over_training.gif") as gif:
        assert gif.n_frames == 3
    with Image.open(run / "samples_epoch_0001.png") as grid:  # 16 samples of 28 px, enlarged 4x
        assert grid.size == (4 * 114 + 2, 4 * 114 + 2)


def test_the_grids_a_run_saves_come_from_a_fitted_mixture_and_the_last_from_the_prior_sample_uses(
        small_data, tmp_path):
    """A user watching training sees samples like those --sample will give, not N(0, I)'s."""
    out = train(small_data, tmp_path / "out", "--n_epochs", "2", "--sample_and_save_frequency", "1").stdout
    assert "samples_epoch_0001.png (samples from a 1-component gmm fitted to 64 training codes)" in out
    assert "samples_epoch_0002.png (samples from the gmm prior, as --sample draws)" in out
    ckpt = checkpoint.load(str(checkpoint.default_path(tmp_path / "out", "mnist")))
    drawn = sampling.prior_samples_uint8(ckpt.model, 16, torch.Generator().manual_seed(3 + 2), ckpt.priors["gmm"])
    util.save_image_grid(drawn.float() / 255, str(tmp_path / "expected.png"))
    with Image.open(run_folder(tmp_path / "out") / "samples_epoch_0002.png") as saved, \
            Image.open(tmp_path / "expected.png") as expected:
        difference = (torch.tensor(np.array(saved), dtype=torch.float) - torch.tensor(np.array(expected))).abs()
    assert difference.mean() < 0.5  # the same images, up to a rounding of the decoder's last bit


def test_a_long_run_animates_at_most_max_frames_saves_evenly_first_and_last_kept(tmp_path):
    for epoch in range(1, 2 * pictures.MAX_FRAMES + 6):
        util.save_image_grid(torch.full((1, 1, 4, 4), epoch / 200), str(tmp_path / f"samples_epoch_{epoch:04d}.png"))
    frames = pictures.sample_frames(str(tmp_path), last_epoch=2 * pictures.MAX_FRAMES + 4)
    epochs = [epoch for epoch, _ in frames]
    assert len(epochs) == pictures.MAX_FRAMES and epochs[0] == 1 and epochs[-1] == 2 * pictures.MAX_FRAMES + 4
    gaps = {b - a for a, b in zip(epochs, epochs[1:])}
    assert gaps <= {2, 3}  # evenly spaced
    assert pictures.save_animation(str(tmp_path), 10, str(tmp_path / "a.gif")) == 10  # up to epoch 10 only


def test_loss_curves_drop_the_objective_panel_when_it_is_the_elbo():
    row = {"epoch": 1, "train_loss": 5.0, "train_recon_nats": 4.0, "train_kl_nats": 1.0,
           "train_neg_elbo_nats": 5.0, "test_loss": 5.0, "test_recon_nats": 4.0, "test_kl_nats": 1.0,
           "test_neg_elbo_nats": 5.0, "seconds": 1.0, "train_images_per_second": 10.0}
    names = [name for name, _ in plots.loss_panels([row], kld_weight=1.0)]
    assert names == ["recon_nats", "kl_nats", "neg_elbo_nats"]
    panels = dict(plots.loss_panels([row], kld_weight=0.5))
    assert "loss" in panels and "0.5 x KL" in panels["loss"] and "nats/image" in panels["kl_nats"]


def test_latent_map_classes_have_names():
    assert data.class_names("fashionmnist")[:2] == ["T-shirt/top", "Trouser"]
    assert data.class_names("octmnist")[3] == "normal"
    assert data.class_names("chestmnist") == ["no finding", "any finding"]
    assert data.class_names("/some/folder", {"classes": ["cats", "dogs"]}) == ["cats", "dogs"]
    assert data.class_names("/some/file.npy", {}) is None


def test_small_images_are_enlarged_in_grids_by_whole_pixels():
    images = torch.rand(16, 1, 28, 28)
    grid = util.image_grid(images, nrow=4)
    assert grid.shape[-1] == 4 * (28 * 4 + 2) + 2
    # Nearest neighbour: each source pixel becomes a 4 x 4 block of one value.
    tile = grid[0, 2:2 + 112, 2:2 + 112]
    assert torch.equal(tile, images[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1))
