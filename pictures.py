"""Pictures of what a model learned, written during training and by --eval: latent traversals
(one row per informative latent coordinate) and the animation of the fixed-z sample grids over
a run. Models and uint8 test images in, PNG and GIF files out; labels are drawn with Pillow
(torchvision's own dependency), so no plotting library is loaded for them."""

import glob
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import metrics
from util import grid_scale, image_grid, written_atomically

TRAVERSAL_DIMS = 10  # rows at most
TRAVERSAL_STEPS = 11  # columns: -3, -2.4, ..., +3 prior standard deviations
TRAVERSAL_RANGE = 3.0
HEADER_PX = 22  # the band above a traversal grid or an animation frame that names it
LABEL_PX = 150  # the traversal's left margin, one label per row


def _font(size=13):
    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable font, where FreeType is built in
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _to_pil(grid):
    array = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def traversal_dimensions(kl, means, k=TRAVERSAL_DIMS):
    """Indices of the latent dimensions to traverse, most KL first: the active ones (their
    posterior means vary over the data, Burda et al. 2016) if any are, else the highest-KL."""
    active = means.double().var(dim=0) > metrics.ACTIVE_UNIT_THRESHOLD
    order = [int(j) for j in torch.argsort(kl, descending=True)]
    chosen = [j for j in order if active[j]] or order
    return chosen[:k]


@torch.no_grad()
def traversal(model, images, index=0):
    """(grid tensor (C, H, W) in [0, 1], [(dimension, KL nats)], scale): each row moves one
    informative coordinate from -3 to +3 with the others at the posterior mean of test image
    `index`."""
    kl, means = metrics.kl_per_dimension_and_means(model, images)
    dims = traversal_dimensions(kl, means)
    values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, TRAVERSAL_STEPS)
    z = means[index].repeat(len(dims), TRAVERSAL_STEPS, 1)  # (rows, steps, D)
    for row, j in enumerate(dims):
        z[row, :, j] = values
    with metrics.eval_mode(model) as device:
        decoded = model.mean_image(model.decode(z.reshape(-1, z.shape[-1]).to(device))).cpu()
    scale = grid_scale(images.shape[-1], TRAVERSAL_STEPS)
    return image_grid(decoded, nrow=TRAVERSAL_STEPS, scale=scale), [(j, float(kl[j])) for j in dims], scale


def save_traversal(model, images, path, caption):
    """The traversal as a labelled PNG: a header, then one row per dimension with 'z_j' and its
    KL in nats in the left margin. Returns (path, the grid tensor of the whole picture)."""
    grid, rows, scale = traversal(model, images)
    cell = images.shape[-1] * scale + 2
    body = _to_pil(grid)
    picture = Image.new("RGB", (LABEL_PX + body.width, HEADER_PX + body.height), "white")
    picture.paste(body, (LABEL_PX, HEADER_PX))
    draw, font = ImageDraw.Draw(picture), _font()
    draw.text((4, 4), f"{caption}: z_j from -{TRAVERSAL_RANGE:g} to +{TRAVERSAL_RANGE:g} (prior sd)",
              fill="black", font=font)
    for row, (j, kl) in enumerate(rows):
        draw.text((4, HEADER_PX + 2 + row * cell + cell // 2 - 8), f"z{j}: KL {kl:.2f} nats",
                  fill="black", font=font)
    with written_atomically(path) as tmp:
        picture.save(tmp)
    return path, torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255


MAX_FRAMES = 60  # beyond this many saves, evenly spaced ones (first and last kept): a GIF is held whole in memory
SAMPLE_FRAME = re.compile(r"samples_epoch_(\d+)\.png$")


def sample_frames(run_dir, last_epoch):
    """[(epoch, path)] of the fixed-z sample grids in run_dir up to last_epoch, in order; at
    most MAX_FRAMES of them, evenly spaced, the first and the last always among them."""
    frames = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), "samples_epoch_*.png")):
        match = SAMPLE_FRAME.search(os.path.basename(path))
        if match and int(match.group(1)) <= last_epoch and os.path.isfile(path):
            frames.append((int(match.group(1)), path))
    frames.sort()
    if len(frames) > MAX_FRAMES:
        step = (len(frames) - 1) / (MAX_FRAMES - 1)
        frames = [frames[round(i * step)] for i in range(MAX_FRAMES)]
    return frames


def save_animation(run_dir, last_epoch, path, frame_ms=600, last_frame_ms=2500):
    """The sample grids of every save (sample_frames), one GIF frame each, labelled with the
    epoch; loops.
    Written atomically, so a reader never sees half of it. Returns the number of frames (0:
    nothing written)."""
    frames = []
    for epoch, png in sample_frames(run_dir, last_epoch):
        with Image.open(png) as image:
            frame = Image.new("RGB", (image.width, image.height + HEADER_PX), "white")
            frame.paste(image.convert("RGB"), (0, HEADER_PX))
        ImageDraw.Draw(frame).text((4, 4), f"epoch {epoch}", fill="black", font=_font())
        frames.append(frame.convert("P", palette=Image.Palette.ADAPTIVE))  # GIF's own form: 1 byte a pixel
    if not frames:
        return 0
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    with written_atomically(path) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0,
                       optimize=False, disposal=1)
    return len(frames)
