"""A stop is a stop in every stage: Ctrl-C and SIGTERM end --train after its epochs (the prior
fits, the last pictures), --fit_prior, --sample and --eval at once, with every trained epoch on
disk, one line saying what is left, exit status 130 and no half-written file. Real signals to
real processes, each sent when the stage's own output says it has begun; the stages are made to
last (many mixture components, many samples) rather than slowed by a fake. The epochs' own stops
are tested in test_reliability.py."""

import os
import signal
import subprocess
import sys

import pytest

import checkpoint
import metrics
import training
from fakedata import write_dataset
from helpers import CHECKPOINT, ENV, ROOT, TINY_MODEL, WAIT_S, run_main, snapshot, wait_for_text

# A tiny model whose gmm fit lasts: 600 full-covariance components on 2400 codes of 16
# dimensions take seconds of EM on 2 cores, where the default count takes a fraction of one.
SLOW_FIT = ["--hidden_dims", "8", "16", "--latent_dim", "16", "--batch_size", "64", "--threads", "1"]
SLOW_GMM = ["--prior_components", "600"]


@pytest.fixture(scope="module")
def data_2400(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_2400")
    write_dataset("mnist", folder, n_train=2400, n_test=16)
    return folder


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, data_2400):
    """One epoch of the SLOW_FIT model on data_2400, with the priors --train fits."""
    out = tmp_path_factory.mktemp("trained_once")
    proc = subprocess.run([sys.executable, "VanVAE.py", "--train", "--data_dir", data_2400, "--output_dir", out,
                           "--n_epochs", "1", "--seed", "0", *SLOW_FIT], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    return out


def stop_when(signum, text, *args):
    """Start the CLI, send `signum` once its stdout shows `text`, and return (exit status,
    stdout, stderr) of the stopped process."""
    proc = subprocess.Popen([sys.executable, "VanVAE.py", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shown = wait_for_text(proc, proc.stdout.fileno(), text)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=WAIT_S)
    return proc.returncode, (shown + out).decode(errors="replace"), err.decode(errors="replace")


def assert_stopped_in_one_line(code, err, signum, *words):
    assert code == 130, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("VanVAE.py: --") and f"stopped by {signal.Signals(signum).name}" in lines[0], err
    for word in words:
        assert word in lines[0], err


def no_temporary_files(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def test_a_stop_in_the_last_epochs_test_pass_saves_every_epoch_and_names_the_fits_left(
        capsys, monkeypatch, tmp_path, small_data):
    """Before this stage was held to the rule, the run fitted on for minutes and exited 0."""
    real_evaluate = metrics.mean_elbo_terms

    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's flag, then at the fits' start
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(training.metrics, "mean_elbo_terms", interrupted_evaluate)
    code, out, err = run_main(capsys, "--train", "--data_dir", small_data, "--output_dir", tmp_path,
                              *TINY_MODEL, "--n_epochs", 1, "--seed", 0)
    path = tmp_path / CHECKPOINT
    assert_stopped_in_one_line(code, err, signal.SIGTERM, f"{path} holds all 1 trained epochs",
                               f"--fit_prior gmm --checkpoint {path}", f"--fit_prior riemannian --checkpoint {path}")
    assert "fitting the" not in out and "done:" not in out
    ckpt = checkpoint.load(str(path), "mnist")
    assert checkpoint.resume_state(ckpt).epoch == 1 and ckpt.priors == {}


@pytest.mark.long
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("stage", ["riemannian", "gmm"])
def test_a_stop_while_train_fits_a_prior_keeps_the_trained_epochs_and_names_the_command_that_fits_it(
        tmp_path, data_2400, signum, stage):
    code, out, err = stop_when(signum, f"fitting the {stage} prior", "--train", "--data_dir", data_2400,
                               "--output_dir", tmp_path, "--n_epochs", 1, "--seed", 0, *SLOW_FIT, *SLOW_GMM)
    path = tmp_path / CHECKPOINT
    assert_stopped_in_one_line(code, err, signum, f"{path} holds all 1 trained epochs",
                               "without the riemannian and gmm priors", f"--fit_prior gmm --checkpoint {path}")
    assert "fitted the gmm prior" not in out and "done:" not in out
    ckpt = checkpoint.load(str(path), "mnist")
    assert checkpoint.resume_state(ckpt).epoch == 1 and ckpt.priors == {}
    assert no_temporary_files(tmp_path) == []
    if stage == "gmm":  # the command the line names does the rest
        fit = subprocess.run([sys.executable, "VanVAE.py", "--fit_prior", "gmm", "--checkpoint", path,
                              "--data_dir", data_2400], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=WAIT_S)
        assert fit.returncode == 0, fit.stderr
        assert set(checkpoint.load(str(path), "mnist").priors) == {"gmm"}


@pytest.mark.long
def test_a_stop_in_fit_prior_leaves_the_checkpoint_as_it_was(tmp_path, data_2400, trained_once):
    before = snapshot(trained_once)
    path = trained_once / CHECKPOINT
    code, out, err = stop_when(signal.SIGTERM, "fitting the gmm prior", "--fit_prior", "gmm", "--checkpoint", path,
                               "--data_dir", data_2400, *SLOW_GMM)
    assert_stopped_in_one_line(code, err, signal.SIGTERM, f"{path} is as it was", "run the same command again")
    assert "saved gmm" not in out
    assert snapshot(trained_once) == before


@pytest.mark.long
def test_a_stop_while_sampling_writes_no_partial_files(tmp_path, trained_once):
    path = trained_once / CHECKPOINT
    code, out, err = stop_when(signal.SIGINT, "drawing riemannian prior samples", "--sample", "--checkpoint", path,
                               "--prior", "riemannian", "--num_samples", 200_000, "--seed", 0,
                               "--output_dir", tmp_path)
    assert_stopped_in_one_line(code, err, signal.SIGINT, "the samples were not all written")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.long
def test_a_stop_in_eval_writes_no_report(tmp_path, data_2400, trained_once):
    path = trained_once / CHECKPOINT
    code, out, err = stop_when(signal.SIGTERM, "evaluating", "--eval", "--checkpoint", path, "--data_dir", data_2400,
                               "--iw_samples", 5000, "--fid_samples", 0, "--output_dir", tmp_path)
    assert_stopped_in_one_line(code, err, signal.SIGTERM, "its report was not written")
    assert not list(tmp_path.rglob("eval.json")) and no_temporary_files(tmp_path) == []

