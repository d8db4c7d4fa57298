"""The accelerator's paths, marked `device`: what benchmarks/device_check.py runs first on a GPU
machine (every precision's step with the data held on the device, exact resume there, the
priors' samplers, the compiled step). They run on the device VANVAE_TEST_DEVICE names (default
cuda, so skipped where there is none); the device check's dry run sets it to cpu, which proves
them, and the script, on a machine without a GPU."""

import os

import pytest
import torch

import checkpoint
import priors
import sampling
import training
import vae
import VanVAE
from fakedata import write_dataset
from helpers import CHECKPOINT, TINY_MODEL
from settings import RunChoices, TrainingRecord, TrainSettings

DEVICE = torch.device(os.environ.get("VANVAE_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.device, pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (VANVAE_TEST_DEVICE=cpu runs these on the CPU)")]
PRECISIONS_HERE = ["fp32", "bf16"] + (["fp16"] if DEVICE.type == "cuda" else [])


def tiny_model():
    return vae.VanillaVAE(vae.VAEConfig("mnist", (1, 28, 28), latent_dim=8, hidden_dims=(8, 16))).to(DEVICE)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_each_precision_trains_from_images_held_on_the_device(precision, channels_last):
    model = tiny_model()
    run = TrainSettings(TrainingRecord("mnist", seed=0, batch_size=32),
                        RunChoices(precision=precision, channels_last=channels_last, device=DEVICE.type))
    step = training.TrainStep(model, run, DEVICE)
    images = training.images_on_device(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), DEVICE)
    assert images.device.type == DEVICE.type  # the whole set on the device: no copy per step
    before = [p.detach().clone() for p in model.parameters()]
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).to(images.device)
    for i in range(3):
        sums = step(images, order[i * 16:i * 16 + 32], 32, slice(None), 2e-4, 1.0)
    assert torch.isfinite(sums).all() and sums.device.type == DEVICE.type
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if b.requires_grad)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CPU's compiled step: tests/test_fast_training.py")
def test_the_compiled_step_trains_on_the_device():
    model = tiny_model()
    run = TrainSettings(TrainingRecord("mnist", seed=0, batch_size=32), RunChoices(compile=True, device="cuda"))
    step = training.TrainStep(model, run, DEVICE)
    images = training.images_on_device(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), DEVICE)
    sums = [step(images, torch.arange(32, device=DEVICE), 32, slice(None), 2e-4, 1.0) for _ in range(3)]
    assert all(torch.isfinite(s).all() for s in sums)


def test_a_run_resumed_on_the_device_ends_where_the_uninterrupted_one_does(tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=64, n_test=16)
    flags = ["--train", "--data_dir", tmp_path / "data", *TINY_MODEL, "--seed", 0, "--device", DEVICE.type]
    assert VanVAE.main([str(f) for f in [*flags, "--output_dir", tmp_path / "a", "--n_epochs", 2]]) == 0
    assert VanVAE.main([str(f) for f in [*flags, "--output_dir", tmp_path / "b", "--n_epochs", 1]]) == 0
    assert VanVAE.main([str(f) for f in [*flags, "--output_dir", tmp_path / "b", "--n_epochs", 2, "--resume"]]) == 0
    a, b = (checkpoint.load(str(tmp_path / run / CHECKPOINT), "mnist") for run in ("a", "b"))
    # Bit for bit on a CPU; a GPU's convolution kernels may sum in another order from run to run.
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("kind", ["gmm", "riemannian", "standard"])
def test_each_prior_samples_on_the_device_the_same_for_the_same_seed(kind):
    model = tiny_model()
    codes, sds = torch.randn(400, 8), torch.rand(400, 8) * 0.5 + 0.1
    state = {"gmm": lambda: priors.fit_gmm(codes, 4, 0, "test codes"),
             "riemannian": lambda: priors.fit_riemannian(codes, sds, 0, "test codes"),
             "standard": lambda: None}[kind]()
    draws = [sampling.prior_samples_uint8(model, 300, torch.Generator(DEVICE).manual_seed(5), state, chunk=128)
             for _ in range(2)]
    assert draws[0].shape == (300, 1, 28, 28) and draws[0].dtype == torch.uint8
    assert torch.equal(draws[0], draws[1])
