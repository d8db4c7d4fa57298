"""The checkpoint format: a format-1 file written by VanVAE before format 2 (tests/data, made
with the command in its test below) still loads, samples, evaluates and resumes; a weights-only
file is evaluated at its own image size."""

import json
import shutil
from pathlib import Path

import torch

import checkpoint
import vae
import VanVAE
from fakedata import write_dataset
from settings import TrainingRecord
from util import load_torch_file

# Written by VanVAE format 1 (commit 598e0f1) as:
#   VanVAE.py --train --dataset mnist --data_dir D --checkpoint v1_mnist_binarize.pt --n_epochs 1
#     --hidden_dims 8 16 --latent_dim 4 --batch_size 8 --seed 3 --binarize --lr 0.001
#     --kld_weight 0.5 --threads 1 --precision fp32
# where D holds fakedata.write_dataset("mnist", D, n_train=32, n_test=20).
V1_FILE = Path(__file__).parent / "data" / "v1_mnist_binarize.pt"


def v1_copy(tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=32, n_test=20)
    path = tmp_path / "v1.pt"
    shutil.copyfile(V1_FILE, path)
    return path


def test_a_format_1_file_reads_back_its_training_record():
    assert load_torch_file(V1_FILE)["format_version"] == 1
    ckpt = checkpoint.load(V1_FILE, "mnist", (1, 28, 28))
    assert ckpt.training == TrainingRecord("mnist", seed=3, batch_size=8, lr=0.001,
                                                      kld_weight=0.5, binarize=True)
    assert ckpt.model.config.latent_dim == 4 and checkpoint.resume_state(ckpt).epoch == 1
    assert ckpt.model.config.architecture == "plain"  # written before --architecture: the seed's network
    checkpoint.resume_state(ckpt)  # whole: --resume can continue it


def test_a_format_1_file_samples_and_evaluates(tmp_path):
    path = v1_copy(tmp_path)
    assert VanVAE.main(["--sample", "--checkpoint", str(path), "--output_dir", str(tmp_path),
                        "--num_samples", "3", "--seed", "1"]) == 0
    run = Path(checkpoint.run_dir(tmp_path, path))
    samples = load_torch_file(run / "prior_samples_n3_seed1.pt", "sample file")
    assert samples.shape == (3, 1, 28, 28) and samples.dtype == torch.uint8
    assert VanVAE.main(["--eval", "--checkpoint", str(path), "--data_dir", str(tmp_path / "data"),
                        "--output_dir", str(tmp_path), "--iw_samples", "3", "--fid_samples", "0"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["binarized"] is True and report["n_images"] == 20  # binarize came from the file


def test_a_format_1_file_resumes_and_is_saved_as_format_2(tmp_path):
    path = v1_copy(tmp_path)
    before = load_torch_file(path)
    assert VanVAE.main(["--train", "--resume", "--dataset", "mnist", "--checkpoint", str(path),
                        "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path),
                        "--n_epochs", "2", "--threads", "1", "--precision", "fp32"]) == 0
    after = load_torch_file(path)
    assert after["format_version"] == checkpoint.FORMAT_VERSION and after["epoch"] == 2
    assert after["training"] == {"dataset": "mnist", "seed": 3, "batch_size": 8, "lr": 0.001,
                                 "kld_weight": 0.5, "binarize": True, "data_source": None,
                                 "n_train": None, "n_test": None,  # format 1 did not count them
                                 "lr_schedule": "constant", "kl_warmup_epochs": 0}
    assert after["history"][0] == before["history"][0] and len(after["history"]) == 2
    assert not all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_a_weights_only_64px_medmnist_file_is_evaluated_at_64px(tmp_path):
    write_dataset("octmnist", tmp_path / "data", n_train=4, n_test=6, image_size=64)
    model = vae.VanillaVAE(vae.VAEConfig("octmnist", (1, 64, 64), latent_dim=4, hidden_dims=(8, 16)))
    path = tmp_path / "weights.pt"
    torch.save({"format_version": 1, "config": model.config.as_dict(), "model": model.state_dict()}, path)
    assert VanVAE.main(["--eval", "--checkpoint", str(path), "--data_dir", str(tmp_path / "data"),
                        "--output_dir", str(tmp_path), "--iw_samples", "2", "--fid_samples", "0"]) == 0
    report = json.loads((Path(checkpoint.run_dir(tmp_path, path)) / "eval.json").read_text())
    assert report["n_images"] == 6 and report["dims_per_image"] == 64 * 64
