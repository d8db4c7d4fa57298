"""The Python way in: a trained checkpoint, loaded once, to sample, encode, decode and
reconstruct with, from a script or a notebook in the repository folder:

    import api
    vae = api.load("models/VanillaVAE/VanillaVAE_fashionmnist.pt")
    images = vae.sample(16, seed=0)  # uint8 (16, 1, 28, 28), from the best prior it holds

The command line's --sample draws through this same class. Images go in and come out as
uint8 (N, C, H, W) tensors, as the datasets hold them and as --sample saves them; latents are
float32 (N, latent_dim). Errors are util.UserError, one line each."""

from dataclasses import dataclass

import torch

import checkpoint
import sampling
import settings
from util import UserError, to_float


@dataclass
class Posterior:
    """q(z|x) of each image: a diagonal Gaussian, (N, latent_dim) float32 each."""
    mean: torch.Tensor
    variance: torch.Tensor


class TrainedVAE:
    """A trained VanillaVAE (in eval mode) with the latent priors fitted to it.

    model:  the vae.VanillaVAE itself; config: its vae.VAEConfig
    priors: {name: state} of every prior it can sample from, "standard" (N(0, I)) included
    path:   the checkpoint file it was read from"""

    def __init__(self, ckpt, device="cpu"):
        self.path, self.device = ckpt.path, torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.config = self.model.config
        self.priors = {"standard": None, **ckpt.priors}
        self.epochs_trained = ckpt.epochs_trained

    @property
    def best_prior(self):
        """The prior sample() uses when none is named (settings.best_prior)."""
        return settings.best_prior(self.priors, self.epochs_trained)

    def sample(self, n, prior=None, seed=None, on_progress=None):
        """n new images, uint8 (n, C, H, W): z drawn from `prior` (a name in self.priors; None
        means settings.best_prior), decoded to the decoder's mean and quantised. The same seed gives the
        same images, as --sample --seed does. on_progress(images done), if given, after each
        chunk of 1024."""
        name = prior or self.best_prior
        if name not in self.priors:
            raise UserError(f"{self.path} has no {name} prior; it holds {', '.join(self.priors)}")
        seed = int(torch.randint(2**31, ())) if seed is None else seed
        generator = torch.Generator(self.device).manual_seed(seed)
        return sampling.prior_samples_uint8(self.model, n, generator, self.priors[name], on_progress=on_progress)

    def _checked(self, images):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.config.image_shape:
            raise UserError(f"images must be uint8 of shape (N, {', '.join(map(str, self.config.image_shape))}), "
                            f"not {images.dtype} {tuple(images.shape)}")
        return images

    @torch.no_grad()
    def encode(self, images):
        """The posterior q(z|x) of uint8 images (N, C, H, W), as the priors were fitted to it
        (a Gaussian decoder's images at the centre of each 8-bit bin)."""
        x = self.model.model_input(to_float(self._checked(images), self.device), u=0.5)
        mean, logvar = self.model.encode(x)
        return Posterior(mean.float().cpu(), logvar.float().exp().cpu())

    def decode(self, z):
        """The decoder's mean image of each latent z (N, latent_dim), as uint8 (N, C, H, W)."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise UserError(f"z must be (N, {self.config.latent_dim}), not {tuple(z.shape)}")
        return sampling.decoded_uint8(self.model, z).cpu()

    def reconstruct(self, images):
        """Each image decoded from its posterior mean, uint8 (N, C, H, W)."""
        return self.decode(self.encode(images).mean)


def load(path, device="cpu", dataset=None):
    """The checkpoint at `path` as a TrainedVAE on `device`; `dataset`, if given, must be the
    one it was trained on."""
    return TrainedVAE(checkpoint.load(path, dataset), device)
