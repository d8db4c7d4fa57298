"""Drawing images from a trained model: z from a prior (N(0, I), or one fitted after training,
priors.py), decoded in chunks to uint8, and --sample's files.

Models and prior states in, uint8 tensors and files out; knows no datasets."""

import torch

import priors
from util import atomic_torch_save, save_image_grid


@torch.no_grad()
def prior_samples_uint8(model, n, generator, prior=None, chunk=1024):
    """n images decoded from z ~ `prior` (a priors.py state; None is N(0, I)), quantised to
    uint8 as a saved sample is, on the CPU.

    Drawn in chunks and filled in place: a list of chunks and a torch.cat would hold every
    sample twice, so memory stays one uint8 copy whatever n is."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = torch.empty((n, *model.config.image_shape), dtype=torch.uint8)
    for start in range(0, n, chunk):
        z = priors.sample_latents(prior, min(chunk, n - start), generator, device,
                                  latent_dim=model.config.latent_dim)
        images = model.mean_image(model.decode(z))
        samples[start:start + images.shape[0]] = images.mul(255).round_().to(torch.uint8).cpu()
    model.train(was_training)
    return samples


def sample_to_files(model, n, generator, png_path, tensor_path, prior=None, max_grid=256):
    """Draw n samples; save all as a uint8 (n, C, H, W) tensor file and the first max_grid as
    a PNG grid. Returns the samples."""
    samples = prior_samples_uint8(model, n, generator, prior)
    save_image_grid(samples[:max_grid].float() / 255, png_path)
    atomic_torch_save(samples, tensor_path)
    return samples
