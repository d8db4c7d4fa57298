"""The model: shapes for every supported image size, the KL term, and that it learns."""

import math

import pytest
import torch

import metrics
import vae
from settings import RunChoices, TrainSettings
from util import UserError


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32), (1, 64, 64), (3, 64, 64)])
@pytest.mark.parametrize("hidden_dims", [vae.DEFAULT_HIDDEN_DIMS, (8, 16, 24)])
@pytest.mark.parametrize("architecture", vae.ARCHITECTURES)
def test_decoder_returns_the_input_shape(shape, hidden_dims, architecture):
    model = vae.VanillaVAE(vae.VAEConfig("test", shape, latent_dim=8, hidden_dims=hidden_dims,
                                         architecture=architecture))
    x = torch.rand(2, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 8)
    assert model.decode(mu).shape == x.shape
    assert model.sample(3).shape == (3, *shape)


@pytest.mark.parametrize("recon_loss", vae.RECON_LOSSES)
def test_every_likelihood_gives_finite_per_image_terms(recon_loss):
    model = vae.VanillaVAE(vae.VAEConfig("test", (3, 32, 32), 8, (8, 16), recon_loss))
    terms = model.loss(torch.rand(4, 3, 32, 32))
    assert terms["recon"].shape == terms["kl"].shape == (4,)
    assert torch.isfinite(terms["loss"]) and (terms["kl"] >= 0).all()
    samples = model.sample(2)
    assert samples.min() >= 0 and samples.max() <= 1


def test_resnet_adds_residual_blocks_to_the_decoder_only_and_keeps_hidden_dims_meaning():
    plain, resnet = (vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), architecture=a)) for a in vae.ARCHITECTURES)
    assert str(plain.encoder) == str(resnet.encoder)  # the same encoder
    blocks = [m for m in resnet.decoder.modules() if isinstance(m, vae.ResidualBlock)]
    assert [b.body[0].in_channels for b in blocks] == list(reversed(vae.DEFAULT_HIDDEN_DIMS[:-1]))
    assert not any(isinstance(m, vae.ResidualBlock) for m in plain.modules())


def test_hidden_dims_too_deep_for_the_image_is_a_user_error():
    with pytest.raises(UserError, match="too deep"):
        vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8,) * 6))
    vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8,) * 5))  # 28 -> 1 px still fits


def test_closed_form_kl_matches_a_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 6), torch.randn(5, 6) * 0.5
    closed = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(6), torch.ones(6))
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(closed, monte_carlo, atol=0.03, rtol=0.01)


def test_loss_kl_is_the_closed_form_of_the_encoder_output():
    # bernoulli: the encoder sees x itself (a Gaussian decoder's loss dequantises it first)
    model = vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8, 16), "bernoulli"))
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = model.encode(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()),
        torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    assert torch.allclose(model.loss(x)["kl"], expected, atol=1e-5)


def test_gaussian_recon_is_in_nats_of_8_bit_data():
    """A decoder that puts a narrow Gaussian on the right pixel values approaches
    0 nats per dimension of 8-bit data, never below (it is a bound on a probability)."""
    model = vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8, 16), "gaussian"))
    x = torch.randint(0, 256, (2, 1, 28, 28)).float() / 255
    y = model.model_input(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.log_scale.fill_(math.log(1 / 256 / math.sqrt(12)))  # the std of the dequantisation noise
        nats_per_dim = model.recon_nll((x * 255 + 0.5) / 256, y) / x[0].numel()
    assert (nats_per_dim > 0).all() and (nats_per_dim < 0.5).all()


@pytest.mark.parametrize("recon_loss", vae.RECON_LOSSES)
def test_loss_falls_over_a_few_steps_on_a_fixed_batch(recon_loss):
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (16, 32), recon_loss))
    x = (torch.rand(16, 1, 28, 28) > 0.7).float()
    model.init_decoder_scale((x * 255).to(torch.uint8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    # The Gaussian's nats include the constant D log 256 of 8-bit data; compare what can fall.
    constant = x[0].numel() * vae.LOG_256 if recon_loss == "gaussian" else 0.0
    losses = []
    for _ in range(30):
        loss = model.loss(x, generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item() - constant)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_samples_do_not_depend_on_the_rest_of_the_batch():
    """GenerativeZoo samples with BatchNorm in train mode, so a sample depends on its batch."""
    model = vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8, 16)))
    model.train()
    z = torch.randn(6, 8)
    model.eval()
    with torch.no_grad():
        alone = model.mean_image(model.decode(z[:1]))
        in_batch = model.mean_image(model.decode(z))[:1]
    assert torch.allclose(alone, in_batch, atol=1e-6)


def test_evaluate_is_a_function_of_the_weights():
    model = vae.VanillaVAE(vae.VAEConfig("test", (1, 28, 28), 8, (8, 16)))
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    first, second = (metrics.mean_elbo_terms(model, images, batch_size=4),
                     metrics.mean_elbo_terms(model, images, batch_size=4))
    assert first == second
    assert first["loss"] == pytest.approx(first["recon"] + first["kl"])


def test_gaussian_decoder_scale_is_calibrated_to_each_batchs_error_not_learned():
    """The sigma-VAE (Rybkin et al. 2021): after a training step the Gaussian decoder's shared
    scale is the root mean squared error of that step's batch (dequantised pixels against the
    decoded means, before the step), so it follows the reconstructions instead of staying near
    its start as a learned scale did; Adam never moves it."""
    import copy

    import training
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("t", (1, 12, 12), latent_dim=4, hidden_dims=(4, 8),
                                         recon_loss="gaussian"))
    images = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8)
    model.init_decoder_scale(images)
    step = training.TrainStep(model, TrainSettings(run=RunChoices(precision="fp32", channels_last=False)),
                              torch.device("cpu"))
    for i in range(3):
        before, noise_state = copy.deepcopy(model), step.noise_gen.get_state()
        noise = before.draw_noise(8, torch.Generator().set_state(noise_state))
        x = images[8 * (i % 2):8 * (i % 2) + 8].float() / 255
        mean_squared_error = before.loss(x, noise=noise)["squared_error"].sum() / x.numel()
        step(images, torch.arange(8 * (i % 2), 8 * (i % 2) + 8), 8, slice(None), 1e-2, 1.0)
        assert model.log_scale.item() == pytest.approx(0.5 * math.log(mean_squared_error.item()), rel=1e-5)
    assert not model.log_scale.requires_grad and model.log_scale.grad is None
