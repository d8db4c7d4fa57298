"""The user's images from one .npy or .npz file, as images.py documents it: headers read
first, splits picked, images copied or converted in chunks, never held twice."""

import collections
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from image_decode import failure_reason, prepare_image, run_chunks, to_chw
from image_results import (
    cache_path_for,
    check_memory,
    held_out_by_hash,
    make_result,
    mixed_sizes_error,
    read_cache,
    source_fingerprint,
    write_cache,
)
from util import UserError

SPLIT_PAIRS = (("train", "test"), ("x_train", "x_test"), ("train_images", "test_images"))
ROWS_PER_COPY = 4096  # array images copied at a time, so a split is never held twice


# ---- an array file ----

def load_array_file(path, options, cache_dir, run):
    headers = _array_headers(path)
    picked = _pick_arrays(path, headers)
    layouts = {split: _layout(path, name, *headers[name]) for split, name in picked.items()}
    shape = _array_result_shape(path, layouts, options)
    converted = any(layout[1] != shape for layout in layouts.values())
    stat = os.stat(path)
    fingerprint = source_fingerprint(path, "array", options, [(os.path.basename(path), stat.st_size,
                                                         stat.st_mtime_ns)])
    cache_path = cache_path_for(cache_dir if converted else None, path, "array", options,
                             fingerprint)
    result = read_cache(cache_path, fingerprint, path)
    if result is None:
        n_images = sum(layout[2] for layout in layouts.values())
        if n_images == 0:
            raise UserError(f"{path} holds no images")
        # An .npz member is read whole, and images to convert are first taken out as they are;
        # a .npy is memory-mapped and copied straight into the result.
        input_bytes = sum(n * int(np.prod(chw)) for _, chw, n in layouts.values())
        extra_bytes = input_bytes if converted or path.lower().endswith(".npz") else 0
        check_memory(n_images * int(np.prod(shape)) + extra_bytes,
                      f"{n_images} images of {'x'.join(map(str, shape))} from {path}")
        result = _read_arrays(path, picked, layouts, shape, options, run)
        result["info"]["fingerprint"] = fingerprint
        write_cache(cache_path, result)
    return result


def _array_headers(path):
    """{name: (shape, dtype)} of every array in the file, from the headers alone."""
    try:
        if path.lower().endswith(".npy"):
            with open(path, "rb") as f:
                shape, dtype = _npy_header(f)
                data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if os.path.getsize(path) - f.tell() < data_bytes:
                    raise ValueError(f"truncated: {os.path.getsize(path) - f.tell()} of the {data_bytes} "
                                     f"bytes its header promises")
                return {"": (shape, dtype)}
        with zipfile.ZipFile(path) as archive:
            return {name[:-4]: _npy_member_header(archive, name)
                    for name in archive.namelist() if name.endswith(".npy")}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a readable numpy file: {failure_reason(error)}") from None


def _npy_member_header(archive, name):
    with archive.open(name) as f:
        return _npy_header(f)


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    return shape, dtype


def _pick_arrays(path, headers):
    """{"train": name, "test": name}, or {"all": name} for one array to split by hash."""
    for train, test in SPLIT_PAIRS:
        if train in headers and test in headers:
            return {"train": train, "test": test}
    if len(headers) == 1:
        return {"all": next(iter(headers))}
    pairs = "; ".join(" and ".join(pair) for pair in SPLIT_PAIRS)
    raise UserError(f"{path} holds {len(headers)} arrays ({', '.join(sorted(headers)) or 'none'})"
                    f"; expected one array, or a pair of train and test arrays named: {pairs}")


def _layout(path, name, shape, dtype):
    """(axis order, (C, H, W), N) of a uint8 image array, or a UserError naming what it is."""
    where = f"{path}" + (f" [{name}]" if name else "")
    if dtype != np.uint8:
        raise UserError(f"{where} holds {dtype} values; expected uint8 images (0..255)")
    if len(shape) == 3:
        return "NHW", (1, shape[1], shape[2]), shape[0]
    if len(shape) == 4 and shape[3] in (1, 3):
        return "NHWC", (shape[3], shape[1], shape[2]), shape[0]
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW", (shape[1], shape[2], shape[3]), shape[0]
    raise UserError(f"{where} has shape {tuple(shape)}; expected images shaped (N, H, W), "
                    f"(N, H, W, C) or (N, C, H, W) with C = 1 or 3")


def _array_result_shape(path, layouts, options):
    channels = options["channels"] or max(layout[1][0] for layout in layouts.values())
    if options["image_size"] is not None:
        return channels, options["image_size"], options["image_size"]
    sizes = collections.Counter()
    for _, (_, height, width), n in layouts.values():
        sizes[(width, height)] += n
    if len(sizes) > 1:
        raise mixed_sizes_error(path, sizes)
    (width, height), = sizes
    return channels, height, width


def _read_arrays(path, picked, layouts, shape, options, run):
    """The arrays' images, split, as one uint8 (N, C, H, W) tensor of `shape`, train first."""
    arrays = _open_arrays(path, picked, layouts)
    if "all" in arrays:
        everything = arrays.pop("all")
        held_out = np.array(held_out_by_hash([str(i) for i in range(len(everything))], options["test_fraction"]),
                            dtype=bool)
        rows = {"train": np.flatnonzero(~held_out), "test": np.flatnonzero(held_out)}
        arrays = {"train": everything, "test": everything}
    else:
        rows = {split: np.arange(len(array)) for split, array in arrays.items()}
    n_train, n_test = len(rows["train"]), len(rows["test"])
    images = torch.empty((n_train + n_test, *shape), dtype=torch.uint8)
    target = images.numpy()
    _fill(target[:n_train], arrays["train"], rows["train"], options["image_size"], run)
    _fill(target[n_train:], arrays["test"], rows["test"], options["image_size"], run)
    return make_result(path, "array", images, [False] * n_train + [True] * n_test,
                   [0] * (n_train + n_test), [], None)


def _open_arrays(path, picked, layouts):
    """{split: (N, C, H, W) view} of the picked arrays."""
    try:
        if path.lower().endswith(".npy"):
            # Memory-mapped: only the images copied out are ever read.
            arrays = {split: np.load(path, mmap_mode="r", allow_pickle=False) for split in picked}
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {split: archive[name] for split, name in picked.items()}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a readable numpy file: {failure_reason(error)}") from None
    return {split: _as_nchw(array, layouts[split][0]) for split, array in arrays.items()}


def _as_nchw(array, layout):
    if layout == "NHW":
        return array[:, None]
    return array.transpose(0, 3, 1, 2) if layout == "NHWC" else array


def _fill(target, array, rows, image_size, run):
    """target[i] = array[rows[i]], brought to target's (C, H, W): copied in slabs when it fits
    already, else each image through Pillow, exactly as an image file would be."""
    if array.shape[1:] == target.shape[1:]:
        for start in range(0, len(rows), ROWS_PER_COPY):
            target[start:start + ROWS_PER_COPY] = array[rows[start:start + ROWS_PER_COPY]]
        return
    selected = array[rows]
    for start, chunk in run_chunks(_convert_chunk, selected, (target.shape[1:], image_size),
                                    run, "converting images"):
        target[start:start + len(chunk)] = chunk


def _convert_chunk(array, shape, image_size):
    out = np.empty((len(array), *shape), dtype=np.uint8)
    for i, chw in enumerate(array):
        pixels = np.ascontiguousarray(chw.transpose(1, 2, 0))
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        out[i] = to_chw(prepare_image(image, shape[0], image_size), shape)
    return out
