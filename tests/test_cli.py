"""End to end through the command line, as a user runs it."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import metrics
import training
import vae
from fakedata import write_dataset
from helpers import TINY_MODEL, run_cli
from settings import RunChoices, TrainingRecord, TrainSettings

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "--seed", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of training on a tiny MNIST written in its real IDX format."""
    tmp = tmp_path_factory.mktemp("run")
    write_dataset("mnist", tmp / "data", n_train=40, n_test=12)
    result = run_cli("--train", "--dataset", "mnist", "--n_epochs", "1", "--num_samples", "9",
                     "--data_dir", tmp / "data", "--output_dir", tmp / "out", *TINY)
    assert result.returncode == 0, result.stderr
    return tmp, result


def help_entries(help_text):
    """{flag: its help text, whitespace folded} from the options section of --help."""
    entries, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current:
            entries[current] += " " + line
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_help_lists_every_flag_with_its_default():
    entries = help_entries(run_cli("--help").stdout)
    for flag, default in [("--batch_size", "128"), ("--n_epochs", "100"), ("--lr", "0.0002"),
                          ("--latent_dim", "128"), ("--hidden_dims", "none given, meaning 32 64 128 256 512"),
                          ("--checkpoint", "none"), ("--num_samples", "16"),
                          ("--sample_and_save_frequency", "5"), ("--dataset", "mnist"),
                          ("--data_dir", "./data"), ("--seed", "none"), ("--device", "auto"),
                          ("--recon_loss", "gaussian"), ("--kld_weight", "1.0"),
                          ("--image_size", "none"), ("--output_dir", ".")]:
        assert f"(default: {default}" in entries[flag], entries[flag]
    assert "--sample_and_save_freq" in entries["--sample_and_save_frequency"]
    for name in data.DATASETS:
        assert name in entries["--dataset"]
    assert "--train" in entries and "--sample" in entries


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --train --sample --eval --outlier_detection --fit_prior is required"),
    (["--train", "--sample"], "not allowed with"),
    (["--train", "--batch_size", "0"], "--batch_size"),
    (["--train", "--lr", "-1"], "--lr"),
    (["--train", "--dataset", "imagenet"], "--dataset"),
])
def test_bad_flags_give_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_writes_checkpoint_images_and_csv(trained):
    tmp, result = trained
    run = tmp / "out" / "runs" / "VanillaVAE_mnist"
    for name in ("samples_epoch_0001.png", "reconstructions_epoch_0001.png", "loss_curves.png"):
        assert (run / name).stat().st_size > 0
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert float(rows[0]["test_neg_elbo_nats"]) > 0
    assert "test -ELBO" in result.stdout and "nats/image" in result.stdout


def test_checkpoint_loads_weights_only_and_holds_the_configuration(trained):
    tmp, _ = trained
    ckpt = torch.load(tmp / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt", weights_only=True)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt["config"] == {"dataset": "mnist", "image_shape": [1, 28, 28], "latent_dim": 4,
                              "hidden_dims": [8, 16], "recon_loss": "gaussian", "architecture": "plain"}
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert ckpt["args"]["seed"] == 3 and "optimizer" in ckpt
    checkpoint.load(tmp / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt")


def test_sample_needs_only_the_checkpoint(trained):
    tmp, _ = trained
    ckpt = tmp / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
    result = run_cli("--sample", "--checkpoint", ckpt, "--num_samples", "5", "--seed", "1", cwd=tmp)
    assert result.returncode == 0, result.stderr
    png, tensor = (line.split()[1] for line in result.stdout.splitlines()[1:3])
    assert os.path.getsize(tmp / png) > 0
    samples = torch.load(tmp / tensor, weights_only=True)
    assert samples.shape == (5, 1, 28, 28) and samples.dtype == torch.uint8
    again = run_cli("--sample", "--checkpoint", ckpt, "--num_samples", "5", "--seed", "1", cwd=tmp)
    assert again.returncode == 0, again.stderr
    assert torch.equal(torch.load(tmp / tensor, weights_only=True), samples), "--seed must repeat"


def test_sample_writes_each_image_as_a_png_that_reads_back_as_the_tensor(trained):
    tmp, _ = trained
    ckpt = tmp / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
    runs = {}
    for seed in ("1", "2"):
        result = run_cli("--sample", "--checkpoint", ckpt, "--num_samples", "12", "--seed", seed, cwd=tmp)
        assert result.returncode == 0, result.stderr
        tensor, folder = (line.split()[1] for line in result.stdout.splitlines()[2:4])
        runs[seed] = tmp / tensor, tmp / folder
    assert runs["1"][1] != runs["2"][1], "a second call must not overwrite the first's images"
    for tensor, folder in runs.values():
        files = sorted(os.listdir(folder))
        assert files == [f"{i:06d}.png" for i in range(12)]
        read_back = torch.stack([torch.from_numpy(np.array(Image.open(folder / f)))[None] for f in files])
        assert torch.equal(read_back, torch.load(tensor, weights_only=True))


def test_sample_rejects_a_checkpoint_of_another_dataset(trained):
    tmp, _ = trained
    ckpt = tmp / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
    result = run_cli("--sample", "--checkpoint", ckpt, "--dataset", "cifar10")
    assert result.returncode == 2 and "trained on mnist" in result.stderr


def test_training_again_does_not_silently_overwrite(trained):
    tmp, _ = trained
    result = run_cli("--train", "--dataset", "mnist", "--n_epochs", "1", "--data_dir", tmp / "data",
                     "--output_dir", tmp / "out", *TINY)
    assert result.returncode == 2 and "--resume" in result.stderr


def test_old_flag_spelling_and_custom_checkpoint_path(tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=16, n_test=8)
    ckpt = tmp_path / "elsewhere" / "mine.pt"
    result = run_cli("--train", "--n_epochs", "2", "--sample_and_save_freq", "1", "--checkpoint", ckpt,
                     "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out", *TINY)
    assert result.returncode == 0, result.stderr
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    # Its own run folder, named after it, so another checkpoint's pictures are never replaced.
    run = Path(checkpoint.run_dir(tmp_path / "out", ckpt))
    assert run.name.startswith("mine-") and (run / "samples_epoch_0001.png").exists()


@pytest.mark.skipif(not os.path.isdir(data.DEBIAN_FASHION_MNIST),
                    reason="needs Debian's dataset-fashion-mnist (CI installs it)")
@pytest.mark.parametrize("recon_loss, least_drop_bits_per_dim", [("gaussian", 1.0), ("bernoulli", 0.2)])
def test_one_epoch_on_real_fashion_mnist_learns(tmp_path, recon_loss, least_drop_bits_per_dim):
    """A few thousand real images: one epoch takes the test -ELBO far below its start (in bits
    per dimension, as the Gaussian's nats include the constant D log 256 of 8-bit data)."""
    torch.manual_seed(0)
    train_images, _ = data.load_split("fashionmnist", "train", tmp_path, download=False)
    test_images, _ = data.load_split("fashionmnist", "test", tmp_path, download=False)
    train_images, test_images = train_images[:4000], test_images[:1000]
    model = vae.VanillaVAE(vae.VAEConfig("fashionmnist", (1, 28, 28), recon_loss=recon_loss))
    before = metrics.mean_elbo_terms(model, test_images, batch_size=500)
    settings = TrainSettings(TrainingRecord("fashionmnist", seed=0, lr=1e-3, batch_size=64), RunChoices(n_epochs=1),
                             checkpoint_path=str(tmp_path / "c.pt"), run_dir=str(tmp_path / "run"), progress=False)
    training.train(model, train_images, test_images, settings)
    after = metrics.mean_elbo_terms(model, test_images, batch_size=500)
    neg_elbo_before, neg_elbo_after = before["recon"] + before["kl"], after["recon"] + after["kl"]
    drop_bits_per_dim = metrics.bits_per_dim(neg_elbo_before - neg_elbo_after, 784)
    assert drop_bits_per_dim > least_drop_bits_per_dim, (neg_elbo_before, neg_elbo_after)
