"""One image file decoded to uint8 (C, H, W) as images.py documents it (colour, transparency,
16-bit, EXIF orientation, resizing), and many decoded in parallel worker processes. Knows no
folders, splits or caches."""

import concurrent.futures
import multiprocessing
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from progress import Progress
from util import UserError

# Formats Pillow registers but cannot decode without outside programs (EPS, WMF), or whose
# files are data rather than pictures (HDF5 and GRIB files often sit beside images).
_NOT_PICTURES = {"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "WMF"}
IMAGE_EXTENSIONS = frozenset(extension for extension, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN and fmt not in _NOT_PICTURES)
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
GREY_MODES = ("1", "L", "LA", "La", "F") + SIXTEEN_BIT_MODES
EXIF_ORIENTATION = 0x0112
SERIAL_BELOW_FILES = 512  # below this, starting worker processes costs more than it saves


# ---- one image (these run in worker processes) ----

def probe_chunk(paths):
    return [_probe(path) for path in paths]


def _probe(path):
    """(width, height, is grey) as shown, read from the header alone; or the reason it failed."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _orientation(image) in (5, 6, 7, 8):  # a quarter turn swaps the sides
                width, height = height, width
            return width, height, image.mode in GREY_MODES or _grey_palette(image)
    except Exception as error:  # Pillow's plugins raise anything from OSError to SyntaxError
        return failure_reason(error, path)


def _decode_chunk(paths, shape, image_size):
    """uint8 (len(paths), C, H, W), zero where a file failed, and [(position, reason)]."""
    images = np.zeros((len(paths), *shape), dtype=np.uint8)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[i] = _decode(path, shape, image_size)
        except Exception as error:  # Pillow's plugins raise anything from OSError to SyntaxError
            failures.append((i, failure_reason(error, path)))
    return images, failures


def _decode(path, shape, image_size):
    with Image.open(path) as opened:
        if image_size is not None:
            # JPEG only: decode at 1/2 to 1/8 scale when that still covers image_size.
            opened.draft(None, (image_size, image_size))
        # Inside the `with`: an image already in the right mode is still the lazy, open file.
        return to_chw(prepare_image(opened, shape[0], image_size), shape)


def to_chw(image, shape):
    pixels = np.asarray(image)
    if pixels.shape[:2] != shape[1:]:
        raise ValueError(f"decodes to {pixels.shape[1]}x{pixels.shape[0]}, not the "
                         f"{shape[2]}x{shape[1]} of the others")
    return pixels.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1)


def prepare_image(image, channels, image_size):
    """A Pillow image as "L" or "RGB", upright, and image_size x image_size when given."""
    if _orientation(image) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    image = _to_channels(image, channels)
    return image if image_size is None else _fit_square(image, image_size)


def _orientation(image):
    # Only JPEG carries it in the header; Pillow would decode a whole PNG to find its EXIF.
    if image.format not in ("JPEG", "MPO"):
        return 1
    return image.getexif().get(EXIF_ORIENTATION, 1)


def _grey_palette(image):
    """A palette image whose colours are all grey (read from the header, not the pixels)."""
    palette = image.palette if image.mode == "P" else None
    if palette is None or (palette.rawmode or palette.mode) != "RGB":
        return False
    colours = bytes(palette.palette)
    return colours[0::3] == colours[1::3] == colours[2::3]


def _to_channels(image, channels):
    if image.mode in SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bit(image)
    if image.mode == "PA" or "transparency" in image.info and image.mode in ("1", "L", "P", "RGB"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La"):
        image = _on_white(image)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _sixteen_to_eight_bit(image):
    # Pillow's own convert clips 16-bit values at 255, which would make mid-grey white.
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # "L"


def _on_white(image):
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def _fit_square(image, size):
    """Shorter side to `size`, centre cropped: one resize of the centred square, so the crop
    costs no second rounding. Pillow widens its filter when shrinking, so it antialiases."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR,
                        box=(left, top, left + side, top + side))


def failure_reason(error, path=None):
    """One short line for a file that failed, without the path the warning already names."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if path is not None:
        text = text.replace(f"'{path}'", "").replace(path, "").strip(" :")
    return text[:80] or type(error).__name__


# ---- many images, in parallel ----

def collect(work, items, args, run, what):
    """work(chunk, *args) over consecutive chunks of items, results flattened in item order."""
    by_start = dict(run_chunks(work, items, args, run, what))
    return [result for start in sorted(by_start) for result in by_start[start]]


def decode_all(paths, shape, image_size, run):
    """uint8 (N, C, H, W) filled chunk by chunk, so the result is never held twice, and
    [(index, reason)] of the files that failed (their rows are zero)."""
    images = torch.empty((len(paths), *shape), dtype=torch.uint8)
    target = images.numpy()
    failures = []
    for start, (chunk, chunk_failures) in run_chunks(_decode_chunk, paths, (shape, image_size),
                                                      run, "decoding images"):
        target[start:start + len(chunk)] = chunk
        failures += [(start + i, reason) for i, reason in chunk_failures]
    return images, sorted(failures)


def run_chunks(work, items, args, run, what):
    """Yield (first index, work(chunk, *args)) for chunks of items, in worker processes when
    there are enough items to pay for starting them, in completion order."""
    workers = run["workers"]
    size = max(16, min(256, len(items) // (workers * 4)))
    starts = range(0, len(items), size)
    done = 0
    with Progress(what, len(items), "image", enabled=run["progress"]) as bar:
        if workers == 1 or len(items) < SERIAL_BELOW_FILES:
            for start in starts:
                yield start, work(items[start:start + size], *args)
                done += len(items[start:start + size])
                bar.update(done)
            return
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context())
        try:
            futures = {pool.submit(work, items[s:s + size], *args): s for s in starts}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
                done += len(items[futures[future]:futures[future] + size])
                bar.update(done)
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(f"a process {what} died (out of memory?); "
                            "try fewer workers or a smaller image size") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _pool_context():
    # Workers use only Pillow and numpy; forking spares each of them re-importing torch.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
