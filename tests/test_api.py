"""The Python API (api.py), used as a notebook user would: a fresh interpreter in the repository
folder loads a trained checkpoint, samples from each prior it holds, encodes, decodes and
reconstructs, and gets exactly what the command line writes for the same seed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import api
import settings
import VanVAE
from helpers import (
    train_tiny,
)

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch checkpoint with its automatic gmm and riemannian priors and a two-stage one,
    and its data."""
    tmp = tmp_path_factory.mktemp("api")
    path = train_tiny(tmp, "--seed", 2, "--recon_loss", "bernoulli")  # its samples vary with z already
    assert VanVAE.main(["--fit_prior", "two_stage", "--checkpoint", str(path), "--data_dir",
                        str(tmp / "data"), "--threads", "1"]) == 0
    return tmp, path


NOTEBOOK = """
import json, sys, torch
import api, data
vae = api.load(sys.argv[1])
out = {"best": vae.best_prior, "priors": sorted(vae.priors)}
for name in vae.priors:
    torch.save(vae.sample(6, prior=name, seed=5), f"{sys.argv[2]}/{name}.pt")
test, _ = data.load_test_images("mnist", sys.argv[3], n_images=8)
posterior = vae.encode(test)
torch.save({"mean": posterior.mean, "variance": posterior.variance, "decoded": vae.decode(posterior.mean),
            "reconstructed": vae.reconstruct(test), "test": test}, f"{sys.argv[2]}/coded.pt")
print(json.dumps(out))
"""


def test_a_notebook_loads_samples_encodes_and_decodes_as_the_command_line_does(trained, tmp_path):
    tmp, path = trained
    result = subprocess.run([sys.executable, "-c", NOTEBOOK, str(path), str(tmp_path), str(tmp / "data")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    told = json.loads(result.stdout.splitlines()[-1])
    assert told == {"best": "gmm", "priors": ["gmm", "riemannian", "standard", "two_stage"]}
    for name in told["priors"]:
        from_api = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert from_api.dtype == torch.uint8 and from_api.shape == (6, 1, 28, 28)
        assert VanVAE.main(["--sample", "--checkpoint", str(path), "--prior", name, "--seed", "5",
                            "--num_samples", "6", "--output_dir", str(tmp_path / name)]) == 0
        written = next((tmp_path / name).rglob("*prior_samples_n6_seed5.pt"))
        assert torch.equal(from_api, torch.load(written, weights_only=True)), name
    coded = torch.load(tmp_path / "coded.pt", weights_only=True)
    assert coded["mean"].shape == coded["variance"].shape == (8, 4)
    assert (coded["variance"] > 0).all()
    assert torch.equal(coded["decoded"], coded["reconstructed"])
    assert coded["reconstructed"].shape == coded["test"].shape and coded["reconstructed"].dtype == torch.uint8


def test_the_default_prior_is_the_best_held_and_a_missing_one_is_one_line(trained, tmp_path):
    _, path = trained
    vae = api.load(path)
    assert vae.epochs_trained == 1 and vae.best_prior == "gmm"  # the best measured after a short run
    long_run = api.TrainedVAE.__new__(api.TrainedVAE)
    long_run.priors, long_run.epochs_trained = vae.priors, settings.SHORT_RUN_EPOCHS
    assert long_run.best_prior == "riemannian"  # and after a long one
    long_run.epochs_trained = None  # a weights-only file: no epochs stored, the default run's order
    assert long_run.best_prior == "riemannian"
    without = api.TrainedVAE.__new__(api.TrainedVAE)
    without.priors, without.epochs_trained = {"standard": None}, 1
    assert without.best_prior == "standard"
    with pytest.raises(api.UserError, match="has no flow prior; it holds standard, riemannian, gmm, two_stage"):
        vae.sample(2, prior="flow")
    with pytest.raises(api.UserError, match=r"images must be uint8 of shape \(N, 1, 28, 28\)"):
        vae.encode(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(api.UserError, match=r"z must be \(N, 4\)"):
        vae.decode(torch.zeros(2, 5))


def test_a_long_draw_reports_its_progress_and_draws_the_same_images(trained):
    _, path = trained
    vae = api.load(path)
    told = []
    reported = vae.sample(2500, prior="gmm", seed=3, on_progress=told.append)
    assert told == [1024, 2048, 2500]
    assert torch.equal(reported, vae.sample(2500, prior="gmm", seed=3))
