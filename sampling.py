"""Drawing images from a trained model: z from a prior (N(0, I), or one fitted after training,
priors.py), decoded in chunks to uint8, and --sample's files.

Models and prior states in, uint8 tensors and files out; knows no datasets."""

import os
import shutil
import tempfile

import torch

import priors
from util import atomic_torch_save, save_image_grid


@torch.no_grad()
def decoded_uint8(model, z):
    """The decoder's mean image of each latent z, quantised to uint8 as a saved sample is (on
    z's device)."""
    return model.mean_image(model.decode(z)).mul(255).round_().to(torch.uint8)


@torch.no_grad()
def prior_samples_uint8(model, n, generator, prior=None, chunk=1024, on_progress=None):
    """n images decoded from z ~ `prior` (a priors.py state; None is N(0, I)), quantised to
    uint8 as a saved sample is, on the CPU; on_progress(images done), if given, after each chunk
    (the Riemannian prior's HMC takes seconds per chunk)."""
    device = next(model.parameters()).device
    return _decoded_in_chunks(model, n, lambda start, size: priors.sample_latents(
        prior, size, generator, device, latent_dim=model.config.latent_dim), chunk, on_progress)


def codes_uint8(model, codes, chunk=1024):
    """The decoder's mean image of each latent code (N, latent_dim), uint8 on the CPU."""
    device = next(model.parameters()).device
    return _decoded_in_chunks(model, codes.shape[0], lambda start, size: codes[start:start + size].to(device), chunk)


def _decoded_in_chunks(model, n, latents, chunk, on_progress=None):
    """n images decoded from latents(first index, count), chunk by chunk, in eval mode (BatchNorm
    at its running statistics, so an image does not depend on the rest of its chunk).

    Filled in place: a list of chunks and a torch.cat would hold every sample twice, so memory
    stays one uint8 copy whatever n is."""
    was_training = model.training
    model.eval()
    samples = torch.empty((n, *model.config.image_shape), dtype=torch.uint8)
    for start in range(0, n, chunk):
        images = decoded_uint8(model, latents(start, min(chunk, n - start)))
        samples[start:start + images.shape[0]] = images.cpu()
        if on_progress is not None:
            on_progress(start + images.shape[0])
    model.train(was_training)
    return samples


def save_png_folder(samples, folder):
    """Each uint8 (C, H, W) image of `samples` as its own lossless PNG, folder/000000.png and
    on (grey as one channel, colour as RGB): what FID tools and image viewers read. Written into
    a new folder beside it, then renamed into place, so `folder` is whole or as it was."""
    from PIL import Image
    parent = os.path.dirname(os.path.abspath(folder))
    staging = tempfile.mkdtemp(prefix=".png-", dir=parent)
    try:
        width = max(6, len(str(samples.shape[0] - 1)))
        for i, image in enumerate(samples):
            pixels = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(os.path.join(staging, f"{i:0{width}d}.png"))
        old = None
        if os.path.isdir(folder):  # the same request again: replaced whole, never mixed
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(folder, os.path.join(old, "png"))
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_samples(samples, png_path, tensor_path, max_grid=256, png_folder=None):
    """Save uint8 (n, C, H, W) samples as a tensor file, the first max_grid as a PNG grid,
    and, if `png_folder` is given, each as a PNG file there."""
    save_image_grid(samples[:max_grid].float() / 255, png_path)
    atomic_torch_save(samples, tensor_path)
    if png_folder is not None:
        save_png_folder(samples, png_folder)
