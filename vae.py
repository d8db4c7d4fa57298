"""The Vanilla VAE (Kingma and Welling 2014): model, loss, and the routines that train and
sample it. Tensors in, tensors out: this file never reads datasets from disk."""

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from util import UserError, atomic_torch_save, save_image_grid, write_csv

FORMAT_VERSION = 1
RECON_LOSSES = ("bernoulli", "gaussian", "mse")
DEFAULT_HIDDEN_DIMS = (32, 64, 128, 256, 512)
LOG_256 = math.log(256.0)


@dataclass
class VAEConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""
    dataset: str
    image_shape: tuple  # (channels, height, width)
    latent_dim: int = 128
    hidden_dims: tuple = DEFAULT_HIDDEN_DIMS
    recon_loss: str = "bernoulli"

    def __post_init__(self):
        self.image_shape = tuple(int(v) for v in self.image_shape)
        self.hidden_dims = tuple(int(v) for v in self.hidden_dims)

    def as_dict(self):
        d = asdict(self)
        d["image_shape"], d["hidden_dims"] = list(self.image_shape), list(self.hidden_dims)
        return d


def encoder_sizes(size, n_layers):
    """Spatial size after each stride-2, pad-1, 3x3 convolution: ceil(size / 2) per layer."""
    sizes = [size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def check_config(config):
    """Raise UserError for a configuration that cannot make a working network."""
    if config.recon_loss not in RECON_LOSSES:
        raise UserError(f"--recon_loss must be one of {', '.join(RECON_LOSSES)}, not {config.recon_loss!r}")
    if config.latent_dim < 1:
        raise UserError(f"--latent_dim must be at least 1, not {config.latent_dim}")
    if not config.hidden_dims or min(config.hidden_dims) < 1:
        raise UserError("--hidden_dims needs one or more positive channel counts")
    _, h, w = config.image_shape
    n = len(config.hidden_dims)
    # Every layer but the last must still have more than one pixel to halve.
    if min(encoder_sizes(h, n)[n - 1], encoder_sizes(w, n)[n - 1]) < 2:
        max_layers = max(1, math.ceil(math.log2(min(h, w))))
        raise UserError(f"--hidden_dims has {n} layers, too deep for {h}x{w} images "
                        f"(at most {max_layers} stride-2 layers fit)")


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same weights, same state_dict) that computes a one-pixel output as one matrix
    product over the kernel taps that land on the input: at the bottleneck (a 2x2 input, stride 2,
    padding 1) 5 of the 9 taps only ever see zero padding, and a GEMM beats the conv kernel there."""

    def forward(self, x):
        h, w = x.shape[-2:]
        (ph, pw), (kh, kw), (sh, sw) = self.padding, self.kernel_size, self.stride
        one_pixel = (h + 2 * ph - kh) // sh == 0 and (w + 2 * pw - kw) // sw == 0
        if not (one_pixel and ph + h <= kh and pw + w <= kw and self.groups == 1
                and self.dilation == (1, 1) and self.padding_mode == "zeros"):
            return super().forward(x)
        weight = self.weight[:, :, ph:ph + h, pw:pw + w]
        return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same weights, same state_dict) that expands a one-pixel input as one
    matrix product: output pixel o gets exactly kernel tap o + padding, so no tap is wasted."""

    def forward(self, x, output_size=None):
        (ph, pw), (kh, kw) = self.padding, self.kernel_size
        (oph, opw) = self.output_padding
        out_h, out_w = kh - 2 * ph + oph, kw - 2 * pw + opw
        if not (x.shape[-2:] == (1, 1) and output_size is None and self.groups == 1
                and self.dilation == (1, 1) and ph + out_h <= kh and pw + out_w <= kw):
            return super().forward(x, output_size)
        weight = self.weight[:, :, ph:ph + out_h, pw:pw + out_w].flatten(1)
        out = (x.flatten(1) @ weight.to(x.dtype)).view(x.shape[0], self.out_channels, out_h, out_w)
        if self.weight.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # what the next layers expect
        return out if self.bias is None else out + self.bias.to(out.dtype)[:, None, None]


# No bias before BatchNorm: it subtracts the batch mean, so such a bias has no true gradient and
# Adam would only turn rounding noise into drift (which also made processes disagree).
def conv_block(c_in, c_out):
    return nn.Sequential(Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU())


def deconv_block(c_in, c_out, output_padding):
    return nn.Sequential(ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1,
                                         output_padding=output_padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.LeakyReLU())


def at_least_fp32(t):
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


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
        self.decoder = nn.Sequential(*[deconv_block(dims[i + 1], dims[i], pad(i + 1))
                                       for i in reversed(range(len(dims) - 1))])
        self.final_layer = nn.Sequential(deconv_block(dims[0], dims[0], pad(0)),
                                         nn.Conv2d(dims[0], channels, 3, padding=1))
        if config.recon_loss == "gaussian":
            # One learned decoder scale shared by all pixels (Rybkin et al. 2021, sigma-VAE).
            self.log_scale = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def init_decoder_scale(self, images_uint8):
        """Start the Gaussian's scale at the pixels' standard deviation, the best scale for a
        decoder that knows only the mean; from sigma = 1 Adam would need thousands of steps."""
        if self.config.recon_loss == "gaussian":
            std = images_uint8[:10_000].float().div(255).std().clamp_min(1 / 256)
            self.log_scale.fill_(std.log().item())

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
        its likelihood is a bound on the discrete data's probability."""
        if self.config.recon_loss == "gaussian":
            if u is None:
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x * 255 + u) / 256
        return x

    def recon_nll(self, out, x):
        """Per-image reconstruction term: nats of -log p(x|z), or GenerativeZoo's mean MSE."""
        if self.config.recon_loss == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        if self.config.recon_loss == "mse":
            # GenerativeZoo's objective: per-pixel mean squared error on [-1, 1] images, Tanh output.
            return (torch.tanh(out) - (2 * x - 1)).pow(2).flatten(1).mean(1)
        # Gaussian density on [0,1]^D, plus D log 256 to turn it into nats of 8-bit data.
        log_scale = self.log_scale
        nll = 0.5 * ((x - out) / log_scale.exp()).pow(2) + log_scale + 0.5 * math.log(2 * math.pi)
        return nll.flatten(1).sum(1) + x[0].numel() * LOG_256

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
        """Per-image reconstruction and KL terms and the batch-mean objective to minimise.

        `noise`, rows of draw_noise(), replaces the draws from `generator`."""
        noise = noise or {}
        x = self.model_input(x, generator, noise.get("dequant"))
        # Under bf16/fp16 autocast the layers return half floats; the noise, the likelihood and
        # the KL are summed in fp32 (784 bf16 terms would lose ~0.4%), a no-op without autocast.
        mu, logvar = (at_least_fp32(t) for t in self.encode(x))
        out = at_least_fp32(self.decode(self.reparameterize(mu, logvar, generator, noise.get("eps"))))
        recon = self.recon_nll(out, x)
        # KL(N(mu, sigma^2) || N(0, I)) in closed form: Kingma and Welling 2014, appendix B.
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return {"loss": (recon + kld_weight * kl).mean(), "recon": recon, "kl": kl}

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


def binarize(x, generator=None):
    """Each pixel set to 1 with probability equal to its intensity in [0, 1]: binarised MNIST
    as Salakhutdinov and Murray 2008 define it, so likelihoods compare with the literature."""
    return torch.bernoulli(x, generator=generator)


def is_likelihood(config):
    return config.recon_loss != "mse"


# ---------------------------------------------------------------- checkpoints

def model_from_checkpoint(ckpt, path):
    """Rebuild the model a checkpoint describes, with its weights, on the CPU."""
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path} is not a VanVAE checkpoint (no format_version)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt['format_version']}; "
                        f"this VanVAE reads format {FORMAT_VERSION}")
    try:
        config = VAEConfig(**ckpt["config"])
        model = VanillaVAE(config)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} does not describe a VanVAE model: {reason}") from None
    return model


RESUME_KEYS = ("optimizer", "epoch", "step", "history", "partial", "rng", "args")


def check_resumable(ckpt, path):
    """Raise UserError unless `ckpt` (already past model_from_checkpoint) holds the training
    state --resume needs; a weights-only file can still be sampled from."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    missing += [f"rng.{key}" for key in ("shuffle_at_epoch_start", "noise")
                if not isinstance(ckpt.get("rng"), dict) or key not in ckpt["rng"]]
    missing += [f"args.{key}" for key in ("seed", "batch_size", "lr", "kld_weight")
                if not isinstance(ckpt.get("args"), dict) or key not in ckpt["args"]]
    if missing:
        raise UserError(f"{path} holds weights but not the training state to resume "
                        f"(missing {', '.join(missing)}); use it with --sample, or train anew")


# ---------------------------------------------------------------- training

@dataclass
class TrainSettings:
    n_epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    kld_weight: float = 1.0
    sample_and_save_frequency: int = 5
    num_samples: int = 16
    seed: int = 0
    checkpoint_path: str = "models/VanillaVAE/VanillaVAE_mnist.pt"
    run_dir: str = "runs/VanillaVAE_mnist"
    args: dict = field(default_factory=dict)  # the flags, saved in the checkpoint
    progress: bool = True
    precision: str = "auto"  # autocast dtype for convolutions and matrix products: PRECISIONS
    channels_last: bool = True  # NHWC activations and weights (oneDNN's preferred layout)
    compile: bool = False  # torch.compile the encoder and decoder
    binarize: bool = False  # a fresh binarisation of every batch (dynamic binarisation)


class StopRequested(Exception):
    """Raised after Ctrl-C or SIGTERM once the current step is done and the state is saved."""

    def __init__(self, signal_name, checkpoint_path):
        super().__init__(signal_name)
        self.signal_name, self.checkpoint_path = signal_name, checkpoint_path


class NonFiniteLoss(UserError):
    pass


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls between steps, so a step is never cut."""

    def __init__(self):
        self.name = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum, frame):
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


@torch.no_grad()
def evaluate(model, images, batch_size, kld_weight=1.0, seed=0):
    """Per-image means of the reconstruction term, KL and objective over uint8 `images`.

    A fixed noise seed makes the figure a function of the weights alone."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start:start + batch_size], device)
        terms = model.loss(x, kld_weight, generator)
        sums += torch.stack([terms["recon"].sum(), terms["kl"].sum(),
                             (terms["recon"] + kld_weight * terms["kl"]).sum()]).double()
    model.train(was_training)
    recon, kl, loss = (sums / images.shape[0]).tolist()
    return {"recon": recon, "kl": kl, "loss": loss}


def batch_noise(model, batch, rows, generator):
    """This process's rows of the noise for a whole global batch of `batch` images."""
    noise = model.draw_noise(batch, generator, generator.device)
    return {name: values[rows] for name, values in noise.items() if values is not None}


def to_float(images_uint8, device):
    return images_uint8.to(device, non_blocking=True).float().div_(255)


# ---------------------------------------------------------------- speed (measured in bench.py)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware, not emulated by conversions."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                          "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(precision, device):
    """'auto' is bf16 where the hardware computes it natively, else fp32: bf16 reaches the same
    test -ELBO as fp32 within seed-to-seed noise (docs/BENCHMARKS.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def check_precision(precision, device):
    """Raise UserError for an autocast dtype this device cannot train in."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device (on a CPU use bf16 or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this CUDA device has no bf16 support (use fp16)")


def autocast(device, precision):
    """bf16/fp16 convolutions and matrix products; weights, BatchNorm statistics, the loss and
    Adam stay fp32 (mixed precision, Micikevicius et al. 2018)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model, lr):
    """Adam; the fused kernel updates every parameter in one pass instead of a dozen."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.Adam(model.parameters(), lr=lr)


def prepare_for_training(model, settings, device):
    """Memory layout, compilation and loss scaling; returns the fp16 GradScaler or None.
    settings.precision 'auto' becomes the dtype it stands for here."""
    check_precision(settings.precision, device)
    settings.precision = resolve_precision(settings.precision, device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if settings.compile:
        # In place, so the state_dict keys (and the checkpoints) stay those of the eager model.
        for part in (model.encoder, model.decoder, model.final_layer):
            part.compile()
    return torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None


def images_on_device(images, device):
    """The whole uint8 set on the GPU when it fits (no copy per step); else pinned host memory,
    so each batch's copy is asynchronous. On a CPU, the tensor as it is."""
    if device.type != "cuda":
        return images
    try:
        return images.to(device)
    except torch.cuda.OutOfMemoryError:
        return images.pin_memory()


def next_batch(images, idx, device, channels_last):
    x = to_float(images[idx.to(images.device)], device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_step(net, optimizer, x, kld_weight, generator, precision="fp32", scaler=None, noise=None):
    """One Adam step on a float batch; the loss terms stay on the device (no host sync).

    `net` is the model or its DistributedDataParallel wrapper (whose forward is loss)."""
    with autocast(x.device, precision):
        terms = net(x, kld_weight, generator, noise)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        terms["loss"].backward()
        optimizer.step()
    else:
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
    return terms


def batches_per_epoch(n_images, batch_size):
    """Full batches only (BatchNorm needs more than one image); one batch if the set is smaller."""
    return max(1, n_images // batch_size)


def epoch_row(config, epoch, train, test, seconds, images_per_second):
    """One CSV/history row. Column names carry units: nats for likelihoods, GenerativeZoo's
    per-pixel MSE for --recon_loss mse."""
    unit = "nats" if is_likelihood(config) else "mse_per_pixel"
    row = {"epoch": epoch}
    for split, terms in (("train", train), ("test", test)):
        row[f"{split}_loss"] = terms["loss"]
        row[f"{split}_recon_{unit}"] = terms["recon"]
        row[f"{split}_kl_nats"] = terms["kl"]
        if is_likelihood(config):
            row[f"{split}_neg_elbo_nats"] = terms["recon"] + terms["kl"]
    row["seconds"] = seconds
    row["train_images_per_second"] = images_per_second
    return row


def describe(config, terms, kld_weight):
    if not is_likelihood(config):
        return (f"loss {terms['loss']:.5f} (MSE {terms['recon']:.5f}/pixel + "
                f"{kld_weight:g} x KL {terms['kl']:.2f} nats)")
    text = (f"-ELBO {terms['recon'] + terms['kl']:.2f} nats/image "
            f"(recon {terms['recon']:.2f} + KL {terms['kl']:.2f})")
    if kld_weight != 1.0:
        text += f", objective {terms['loss']:.2f}"
    return text


def make_checkpoint(model, optimizer, state, settings):
    return {
        "format_version": FORMAT_VERSION,
        "config": model.config.as_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": state["epoch"],
        "step": state["step"],
        "history": state["history"],
        "partial": state["partial"],
        "rng": {"shuffle_at_epoch_start": state["shuffle_at_epoch_start"],
                "noise": state["noise_gen"].get_state()},
        "args": settings.args,
    }


def check_finite_weights(model, checkpoint_path):
    """The loss is checked before each step; this catches the last step of an epoch blowing
    the weights up, so a checkpoint is never replaced by broken weights."""
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise NonFiniteLoss(f"the weights became NaN or infinite; {checkpoint_path} keeps the "
                            "last good weights")


def save_outputs(model, epoch, settings, test_images, fixed_z, history):
    """Prior samples from a fixed z, test images above their reconstructions, CSV, curves."""
    from plots import plot_loss_curves  # matplotlib is slow to import; only needed here
    model.eval()
    with torch.no_grad():
        samples = model.mean_image(model.decode(fixed_z))
        k = min(8, test_images.shape[0])
        x = to_float(test_images[:k], fixed_z.device)
        pairs = torch.cat([x, model.reconstruct(x)])
    model.train()
    paths = {"samples": f"{settings.run_dir}/samples_epoch_{epoch:04d}.png",
             "reconstructions": f"{settings.run_dir}/reconstructions_epoch_{epoch:04d}.png"}
    save_image_grid(samples, paths["samples"])
    save_image_grid(pairs, paths["reconstructions"], nrow=k)
    write_csv(f"{settings.run_dir}/history.csv", history)
    plot_loss_curves(history, f"{settings.run_dir}/loss_curves.png")
    return paths


def train(model, train_images, test_images, settings, resume=None):
    """Train with Adam on uint8 image tensors; checkpoint, sample and log as settings say.

    `resume` is a loaded checkpoint dict to continue from (same weights, optimizer, random
    streams, history), so an interrupted run ends exactly where an uninterrupted one does."""
    device = next(model.parameters()).device
    scaler = prepare_for_training(model, settings, device)
    # Before the optimizer: on CPUs it swaps BatchNorm for a synchronised one with new parameters.
    net = distributed.data_parallel(model, device)  # `model` itself in a single process
    optimizer = make_optimizer(model, settings.lr)
    train_images, test_images = images_on_device(train_images, device), images_on_device(test_images, device)
    shuffle_gen = torch.Generator().manual_seed(settings.seed)
    state = {"epoch": 0, "step": 0, "history": [], "partial": None,
             "noise_gen": torch.Generator(device).manual_seed(settings.seed + 1)}
    if resume is None:
        model.init_decoder_scale(train_images)
    else:
        optimizer.load_state_dict(resume["optimizer"])
        state.update(epoch=resume["epoch"], step=resume["step"], history=list(resume["history"]),
                     partial=resume["partial"])
        shuffle_gen.set_state(resume["rng"]["shuffle_at_epoch_start"])
        state["noise_gen"].set_state(resume["rng"]["noise"])
    # A fixed prior draw, so the sample grids of successive epochs are comparable.
    fixed_z = torch.randn((settings.num_samples, model.config.latent_dim),
                          generator=torch.Generator().manual_seed(settings.seed + 2)).to(device)
    n_batches = batches_per_epoch(train_images.shape[0], settings.batch_size)
    batch = min(settings.batch_size, train_images.shape[0])
    rows = distributed.batch_rows(batch)  # this process's share of every global batch
    model.train()

    def save():
        check_finite_weights(model, settings.checkpoint_path)
        distributed.on_main(lambda: atomic_torch_save(make_checkpoint(model, optimizer, state, settings),
                                                      settings.checkpoint_path))

    with _SignalFlag() as stop:
        for epoch in range(state["epoch"] + 1, settings.n_epochs + 1):
            state["shuffle_at_epoch_start"] = shuffle_gen.get_state()
            order = torch.randperm(train_images.shape[0], generator=shuffle_gen)
            first_step, partial = state["step"], state["partial"]
            # Saved sums cover all processes, so only rank 0 resumes with them.
            sums = (partial["sums"].to(device) if partial is not None and distributed.is_main()
                    else torch.zeros(3, device=device, dtype=torch.float64))
            seconds_before = partial["seconds"] if partial is not None else 0.0
            start = time.perf_counter()
            bar = tqdm(range(first_step, n_batches), desc=f"epoch {epoch}/{settings.n_epochs}",
                       total=n_batches, initial=first_step, disable=not settings.progress,
                       leave=False, unit="batch")
            for step in bar:
                idx = order[step * batch:(step + 1) * batch][rows]
                x = next_batch(train_images, idx, device, settings.channels_last)
                if settings.binarize:  # from the noise stream, so a resumed run draws the same pixels
                    x = binarize(x, state["noise_gen"])
                terms = train_step(net, optimizer, x, settings.kld_weight, None, settings.precision,
                                   scaler, noise=batch_noise(model, batch, rows, state["noise_gen"]))
                sums += torch.stack([terms["recon"].sum(), terms["kl"].sum(),
                                     terms["loss"] * x.shape[0]]).detach().double()
                if step % 25 == 0 or step == n_batches - 1:
                    # The only host sync in the loop: a running loss for the bar, and an early
                    # stop before NaN weights could ever be saved.
                    running = distributed.all_reduce_sum(sums)[2].item() / ((step + 1) * batch)
                    if not math.isfinite(running):
                        raise NonFiniteLoss(f"the training loss became NaN or infinite in epoch "
                                            f"{epoch}; {settings.checkpoint_path} keeps the last good weights")
                    bar.set_postfix(loss=f"{running:.4g}")
                stop_name = distributed.agreed_signal(stop.name)  # all processes stop at one step
                if stop_name is not None and step < n_batches - 1:
                    sums = distributed.all_reduce_sum(sums)
                    if not torch.isfinite(sums).all():
                        raise NonFiniteLoss(f"the training loss became NaN or infinite in epoch "
                                            f"{epoch}; {settings.checkpoint_path} keeps the last good weights")
                    state.update(epoch=epoch - 1, step=step + 1,
                                 partial={"sums": sums.cpu(),
                                          "seconds": seconds_before + time.perf_counter() - start})
                    save()
                    raise StopRequested(stop_name, settings.checkpoint_path)
            bar.close()
            sums = distributed.all_reduce_sum(sums)
            if not torch.isfinite(sums).all():
                raise NonFiniteLoss(f"the training loss became NaN or infinite in epoch {epoch}; "
                                    f"{settings.checkpoint_path} keeps the last good weights")
            seconds = seconds_before + time.perf_counter() - start
            n_seen = n_batches * batch
            recon, kl, loss = (sums / n_seen).tolist()
            train_terms = {"recon": recon, "kl": kl, "loss": loss}
            test_terms = evaluate(model, test_images, settings.batch_size, settings.kld_weight,
                                  settings.seed)
            row = epoch_row(model.config, epoch, train_terms, test_terms, seconds, n_seen / seconds)
            state["history"].append(row)
            state.update(epoch=epoch, step=0, partial=None)
            print(f"epoch {epoch}/{settings.n_epochs}  train {describe(model.config, train_terms, settings.kld_weight)}"
                  f"  test {describe(model.config, test_terms, settings.kld_weight)}"
                  f"  {seconds:.1f} s, {n_seen / seconds:.0f} images/s", flush=True)
            last = epoch == settings.n_epochs
            stop_name = distributed.agreed_signal(stop.name)
            if epoch % settings.sample_and_save_frequency == 0 or last or stop_name is not None:
                state["shuffle_at_epoch_start"] = shuffle_gen.get_state()
                save()
                paths = distributed.on_main(
                    lambda: save_outputs(model, epoch, settings, test_images, fixed_z, state["history"]))
                if distributed.is_main():
                    print(f"saved {settings.checkpoint_path}, {paths['samples']}, {paths['reconstructions']}",
                          flush=True)
            if stop_name is not None and not last:  # after the last epoch there is nothing to resume
                raise StopRequested(stop_name, settings.checkpoint_path)
    return state["history"]


def sample_to_files(model, n, generator, png_path, tensor_path, chunk=1024, max_grid=256):
    """Draw n prior samples in chunks; save all as a uint8 (n, C, H, W) tensor file and the
    first max_grid as a PNG grid, so memory stays small whatever n is."""
    device = next(model.parameters()).device
    model.eval()
    # Filled in place: a list of chunks and a torch.cat would hold every sample twice.
    samples = torch.empty((n, *model.config.image_shape), dtype=torch.uint8)
    for start in range(0, n, chunk):
        images = model.sample(min(chunk, n - start), generator, device)
        samples[start:start + images.shape[0]] = images.mul(255).round_().to(torch.uint8).cpu()
    save_image_grid(samples[:max_grid].float() / 255, png_path)
    atomic_torch_save(samples, tensor_path)
    return samples
