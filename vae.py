"""The Vanilla VAE (Kingma and Welling 2014): the network, its decoder likelihoods and its ELBO.

The one place that knows which decoder likelihood is in use (`recon_loss`): the rest of the
code asks the model or the functions at the end of this file. Tensors in, tensors out: this file
does no file I/O (checkpoint.py saves and loads models; training.py trains them)."""

import math

import torch
import torch.nn as nn

from kernels import BernoulliNLL, Conv2d, ConvTranspose2d
from settings import ARCHITECTURES, DEFAULT_HIDDEN_DIMS, RECON_LOSSES, VAEConfig  # noqa: F401 (vae.VAEConfig)
from util import BadValue

LOG_256 = math.log(256.0)


def encoder_sizes(size, n_layers):
    """Spatial size after each stride-2, pad-1, 3x3 convolution: ceil(size / 2) per layer."""
    sizes = [size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def check_config(config):
    """Raise BadValue for a configuration that cannot make a working network."""
    if config.architecture not in ARCHITECTURES:
        raise BadValue("architecture", f"must be one of {', '.join(ARCHITECTURES)}, not {config.architecture!r}")
    if config.recon_loss not in RECON_LOSSES:
        raise BadValue("recon_loss", f"must be one of {', '.join(RECON_LOSSES)}, not {config.recon_loss!r}")
    if config.latent_dim < 1:
        raise BadValue("latent_dim", f"must be at least 1, not {config.latent_dim}")
    if not config.hidden_dims or min(config.hidden_dims) < 1:
        raise BadValue("hidden_dims", "needs one or more positive channel counts")
    _, h, w = config.image_shape
    n = len(config.hidden_dims)
    # Every layer but the last must still have more than one pixel to halve.
    if min(encoder_sizes(h, n)[n - 1], encoder_sizes(w, n)[n - 1]) < 2:
        max_layers = max(1, math.ceil(math.log2(min(h, w))))
        raise BadValue("hidden_dims", f"has {n} layers, too deep for {h}x{w} images "
                                      f"(at most {max_layers} stride-2 layers fit)")


# No bias before BatchNorm: it subtracts the batch mean, so such a bias has no true gradient and
# Adam would only turn rounding noise into drift (which also made processes disagree).
def conv_block(c_in, c_out):
    return nn.Sequential(Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU())


def deconv_block(c_in, c_out, output_padding):
    return nn.Sequential(ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1,
                                         output_padding=output_padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU())


class ResidualBlock(nn.Module):
    """x + two 3x3 convolutions of x at its own size (He et al. 2016), then LeakyReLU: more
    decoder capacity at each scale without changing its sizes or channel counts."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.LeakyReLU(),
                                  Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels))
        self.act = nn.LeakyReLU()

    def forward(self, x):
        return self.act(x + self.body(x))


def upsampling_block(c_in, c_out, output_padding, architecture):
    """One decoder stage: a deconv block that doubles the size, and under "resnet" a residual
    block at the new size."""
    block = deconv_block(c_in, c_out, output_padding)
    return nn.Sequential(*block, ResidualBlock(c_out)) if architecture == "resnet" else block


def at_least_fp32(t):
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def kl_terms(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) of each latent coordinate, in closed form (Kingma and
    Welling 2014, appendix B); summed over the last dimension it is the ELBO's KL term."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


class VanillaVAE(nn.Module):
    """Convolutional encoder to a diagonal Gaussian q(z|x); a mirrored decoder back to the
    input's exact shape, whatever its size, so no image is ever resized."""

    def __init__(self, config):
        super().__init__()
        check_config(config)
        self.config = config
        channels, h, w = config.image_shape
        dims = config.hidden_dims
        hs, ws = encoder_sizes(h, len(dims)), encoder_sizes(w, len(dims))
        self.bottleneck_shape = (dims[-1], hs[-1], ws[-1])
        flat = dims[-1] * hs[-1] * ws[-1]

        self.encoder = nn.Sequential(*[conv_block(c_in, c_out)
                                       for c_in, c_out in zip((channels,) + dims[:-1], dims)])
        self.fc_mu = nn.Linear(flat, config.latent_dim)
        self.fc_logvar = nn.Linear(flat, config.latent_dim)

        # A transposed conv doubles size to 2s-1; output_padding adds the lost pixel back
        # wherever the encoder rounded an odd size up.
        def pad(i):
            return (hs[i] - (2 * hs[i + 1] - 1), ws[i] - (2 * ws[i + 1] - 1))

        self.decoder_input = nn.Linear(config.latent_dim, flat)
        self.decoder = nn.Sequential(*[upsampling_block(dims[i + 1], dims[i], pad(i + 1), config.architecture)
                                       for i in reversed(range(len(dims) - 1))])
        self.final_layer = nn.Sequential(deconv_block(dims[0], dims[0], pad(0)),
                                         Conv2d(dims[0], channels, 3, padding=1))
        if config.recon_loss == "gaussian":
            # One decoder scale shared by all pixels, calibrated rather than learned (Rybkin et
            # al. 2021, the sigma-VAE): set in closed form (calibrate_decoder_scale), never by
            # Adam, which moved it by about its learning rate per step and so hardly at all. A
            # parameter still, so its state_dict key and older checkpoints stay as they were.
            self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=False)

    @torch.no_grad()
    def init_decoder_scale(self, images_uint8):
        """Start the Gaussian's scale at the pixels' standard deviation, the best scale for a
        decoder that knows only the mean; from sigma = 1 Adam would need thousands of steps."""
        if self.config.recon_loss == "gaussian":
            std = images_uint8[:10_000].float().div(255).std().clamp_min(1 / 256)
            self.log_scale.fill_(std.log().item())

    @torch.no_grad()
    def calibrate_decoder_scale(self, mean_squared_error):
        """Set the Gaussian decoder's shared variance to `mean_squared_error`, the mean over a
        batch's pixels of (x - decoded mean)^2: the variance that maximises that batch's
        likelihood (Rybkin et al. 2021, section 4). With sigma at its optimum the gradient of
        the ELBO in the network's weights is that of the sigma-optimised ELBO, so this balances
        reconstruction against KL with no hand-set weight, and the ELBO stays a likelihood
        bound. Floored at the dequantisation noise's own standard deviation, 1 / (256 sqrt 12)."""
        if self.config.recon_loss == "gaussian":
            floor = (1 / 256) ** 2 / 12
            self.log_scale.copy_(mean_squared_error.to(self.log_scale).clamp_min(floor).log() / 2)

    def encode(self, x):
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu, logvar, generator=None, eps=None):
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z):
        """Decoder output before the likelihood's link: logits, means or pre-tanh values."""
        h = self.decoder_input(z).view(-1, *self.bottleneck_shape)
        return self.final_layer(self.decoder(h))

    def mean_image(self, out):
        """The decoder distribution's mean as an image in [0, 1]."""
        if self.config.recon_loss == "bernoulli":
            return torch.sigmoid(out)
        if self.config.recon_loss == "mse":
            return (torch.tanh(out) + 1) / 2
        return out.clamp(0, 1)

    def model_input(self, x, generator=None, u=None):
        """What the encoder sees and the decoder must explain, from images in [0, 1].

        The Gaussian decoder models uniformly dequantised 8-bit data (Theis et al. 2016), so
        its likelihood is a bound on the discrete data's probability. `u` is the dequantisation
        noise in [0, 1): drawn from `generator` if None; u=0.5 gives the centre of each 8-bit
        bin, what the encoder sees when no noise is wanted."""
        if self.config.recon_loss == "gaussian":
            if u is None:
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x * 255 + u) / 256
        return x

    def recon_nll(self, out, x):
        """Per-image reconstruction term: nats of -log p(x|z), or GenerativeZoo's mean MSE.

        out and x are (..., C, H, W), x broadcast against out (the IW bound scores K decodings
        of one image without copying it K times); the result has out's leading shape."""
        if self.config.recon_loss == "bernoulli":
            return BernoulliNLL.apply(out, x).flatten(-3).sum(-1)
        if self.config.recon_loss == "mse":
            # GenerativeZoo's objective: per-pixel mean squared error on [-1, 1] images, Tanh output.
            return (torch.tanh(out) - (2 * x - 1)).pow(2).flatten(-3).mean(-1)
        # Gaussian density on [0,1]^D, plus D log 256 to turn it into nats of 8-bit data.
        log_scale = self.log_scale
        nll = 0.5 * ((x - out) / log_scale.exp()).pow(2) + log_scale + 0.5 * math.log(2 * math.pi)
        return nll.flatten(-3).sum(-1) + math.prod(x.shape[-3:]) * LOG_256

    def draw_noise(self, n, generator=None, device=None):
        """The random numbers loss() would draw from `generator` for n images, in its order.

        Processes that share one generator each draw a whole global batch's noise and take
        their own rows, so N processes see exactly the noise one process would."""
        c, h, w = self.config.image_shape
        dequant = (torch.rand((n, c, h, w), generator=generator, device=device)
                   if self.config.recon_loss == "gaussian" else None)
        eps = torch.randn((n, self.config.latent_dim), generator=generator, device=device)
        return {"dequant": dequant, "eps": eps}

    def loss(self, x, kld_weight=1.0, generator=None, noise=None):
        """Per-image reconstruction and KL terms and the batch-mean objective to minimise; for
        the Gaussian decoder also each image's summed squared error (for its calibration).

        `noise`, rows of draw_noise(), replaces the draws from `generator`."""
        noise = noise or {}
        x = self.model_input(x, generator, noise.get("dequant"))
        # Under bf16/fp16 autocast the layers return half floats; the noise, the likelihood and
        # the KL are summed in fp32 (784 bf16 terms would lose ~0.4%), a no-op without autocast.
        mu, logvar = (at_least_fp32(t) for t in self.encode(x))
        out = at_least_fp32(self.decode(self.reparameterize(mu, logvar, generator, noise.get("eps"))))
        recon = self.recon_nll(out, x)
        kl = kl_terms(mu, logvar).sum(1)
        terms = {"loss": (recon + kld_weight * kl).mean(), "recon": recon, "kl": kl}
        if self.config.recon_loss == "gaussian":  # what calibrate_decoder_scale needs, per image
            terms["squared_error"] = (x - out.detach()).pow(2).flatten(1).sum(1)
        return terms

    # DistributedDataParallel synchronises gradients only through forward(), so training
    # calls the loss that way.
    forward = loss

    @torch.no_grad()
    def reconstruct(self, x):
        """Decode the posterior mean of each image; images in [0, 1]."""
        mu, _ = self.encode(x)
        return self.mean_image(self.decode(mu))

    @torch.no_grad()
    def sample(self, n, generator=None, device=None):
        """Draw n images from the prior z ~ N(0, I), decoded to their mean, in [0, 1]."""
        device = device or next(self.parameters()).device
        z = torch.randn((n, self.config.latent_dim), generator=generator, device=device)
        return self.mean_image(self.decode(z))


def is_likelihood(config):
    """Whether the model's reconstruction term is a negative log-likelihood in nats (the mse
    objective, GenerativeZoo's, is not)."""
    return config.recon_loss != "mse"


def models_binary_pixels(recon_loss):
    """Whether the decoder likelihood `recon_loss` is defined on binary pixels, as --binarize needs."""
    return recon_loss == "bernoulli"


def likelihood_kind(config, binarized):
    """What the model's nats are, in words; None where there is no likelihood."""
    if not is_likelihood(config):
        return None
    if config.recon_loss == "gaussian":
        return "density of uniformly dequantised 8-bit data (comparable with published bits/dim)"
    if binarized:
        return "Bernoulli likelihood of binarised images (comparable with binarised-MNIST results)"
    return ("Bernoulli cross-entropy on grey [0,1] intensities: NOT a likelihood of 8-bit data, "
            "not comparable with published nats or bits/dim (train with --binarize for that)")
