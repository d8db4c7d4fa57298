"""A user's own images, from a folder or one .npy/.npz file, decoded once into uint8 tensors.

Boundary: this file turns image and array files into uint8 (N, C, H, W) tensors split into train
and test. It knows no model, no command-line flag and no named dataset (data.py owns those); it
raises UserError worded without flag names, and the caller words it for its own interface.

Public interface
- (settings.is_path_dataset tells whether a dataset argument is such a path: test the known
  dataset names first, or a folder called "mnist" in the working directory would win.)
- source_name(path) -> str: the folder's name or the file's stem, reduced to [A-Za-z0-9_.-].
- load_source(path, ...) -> {"train", "test": uint8 (N, C, H, W) contiguous; "train_labels",
  "test_labels": int64 (N,); "info": dict}. Its docstring lists the keys of "info".

A folder
- Files: every image file below it, at any depth, in the order of their relative POSIX paths.
  An image file is one whose extension Pillow can open here (IMAGE_EXTENSIONS); other files are
  ignored, and so are names starting with "." (macOS writes "._x.png" files that are no images).
  Links to folders are followed, but each folder (device, inode) is read once, so a link loop
  ends. A GIF or TIFF with several frames gives its first frame.
- Splits: train/ and test/ folders directly inside it are the splits (files elsewhere are then
  ignored); otherwise an image is held out for test when a hash of its relative path falls below
  test_fraction, so adding images never moves an old one from one split to the other (a folder
  where no hash falls below it holds out its image of least hash; see _held_out).
- Labels: when every image lies in a subfolder (of train/ and test/ if present), the index of
  that top-level subfolder among the sorted names, listed in info["classes"]; else zeros.
- Colour: every image becomes `channels` channels: 1 is grey ("L", ITU-R 601 luma), 3 is "RGB".
  Transparent pixels (RGBA, LA, a palette or a colour marked transparent) are composited on
  WHITE. 16-bit grey ("I;16", "I") is scaled from 0..65535 to 0..255; CMYK goes through
  Pillow. The EXIF orientation of a JPEG is applied, as a photo viewer shows it.
- A file that cannot be read (corrupt, truncated, a broken link) is skipped and counted, and one
  warning line on stderr names the first few; with strict=True it is a UserError instead.

An array file
- uint8 images shaped (N, H, W), (N, H, W, C) or (N, C, H, W), C being 1 or 3 (channels last
  when the last axis is 1 or 3). An .npz holding train/test, x_train/x_test or
  train_images/test_images gives the splits; a .npy or an .npz of one array is split like a
  folder, by a hash of each image's index, so appending images moves no old one.

Both
- image_size N brings every image to N x N: the shorter side is resized to N (antialiased),
  then the centre is cropped. Without it every image must have the same size.
- A split may come out empty (a tiny folder, test_fraction 0): it is then a (0, C, H, W) tensor,
  and the caller decides whether that is an error.
- Before decoding, the bytes of the result are compared with MemAvailable in /proc/meminfo, and
  a result that would not fit is refused (the check is skipped where that file is unreadable).
- With cache_dir, the result is kept there as one file, keyed on the relative path, size and
  mtime of every file and on the options, and the next call with unchanged files loads it.
  Only the newest cache of a source (with the same options) is kept. Arrays are cached only when
  they had to be resized or converted: otherwise reading them is already as fast as the cache.
  A cache that cannot be written costs one warning line on stderr, never the load.
"""

import collections
import concurrent.futures
import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import zipfile
from pathlib import PurePath

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from settings import ARRAY_EXTENSIONS
from util import UserError, atomic_torch_save, load_torch_file

FORMAT_VERSION = 1  # bump when decoding changes, so caches of the old decoding are not reused
# Formats Pillow registers but cannot decode without outside programs (EPS, WMF), or whose
# files are data rather than pictures (HDF5 and GRIB files often sit beside images).
_NOT_PICTURES = {"BUFR", "EPS", "GRIB", "HDF5", "IPTC", "MPEG", "WMF"}
IMAGE_EXTENSIONS = frozenset(extension for extension, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN and fmt not in _NOT_PICTURES)
SPLIT_PAIRS = (("train", "test"), ("x_train", "x_test"), ("train_images", "test_images"))
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
GREY_MODES = ("1", "L", "LA", "La", "F") + SIXTEEN_BIT_MODES
EXIF_ORIENTATION = 0x0112
SERIAL_BELOW_FILES = 512  # below this, starting worker processes costs more than it saves
SKIPPED_NAMED = 3  # how many unreadable files one warning line names
ROWS_PER_COPY = 4096  # array images copied at a time, so a split is never held twice


def source_name(path):
    """The folder's base name or the file's stem, for checkpoint and run names; "images" when
    nothing of it survives the reduction to [A-Za-z0-9_.-]."""
    path = os.path.abspath(os.fspath(path))  # "." and "photos/" name the folder itself
    base = os.path.basename(path)
    if not os.path.isdir(path):
        base = os.path.splitext(base)[0]
    # No leading dot or dash: the name must not hide a run folder or read as a flag.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")
    return name or "images"


def load_source(path, *, image_size=None, channels=None, test_fraction=0.05, cache_dir=None,
                strict=False, workers=None, progress=None):
    """Load a folder of images or a .npy/.npz file as uint8 train and test tensors.

    image_size: None (all images must share one size) or N for N x N; channels: 1, 3 or None
    (1 when every image is grey, else 3); test_fraction: the held-out share in [0, 1) when the
    source has no split of its own; cache_dir: where to keep the decoded result (None: nowhere);
    strict: an unreadable image is an error rather than skipped; workers: processes that decode
    (None: every usable core); progress: a bar on stderr (None: when stderr is a terminal).

    Returns {"train", "test", "train_labels", "test_labels", "info"}; info holds "path"
    (absolute), "kind" ("folder" or "array"), "name" (source_name), "image_shape" (C, H, W),
    "n_train", "n_test", "fingerprint" (hex key of the files and options), "skipped" (unreadable
    files), "skipped_first" (the first few, with the reason), "cached" (read from cache_dir),
    and "classes" when the labels come from subfolders.
    Raises UserError for a missing path, a folder with no readable image, an array of the wrong
    dtype or shape, mixed sizes without image_size, or a result larger than the free memory."""
    _check_options(image_size, channels, test_fraction, workers)
    root = os.path.abspath(os.fspath(path))
    if not os.path.exists(root):
        raise UserError(f"{path}: no such folder or file")
    options = {"image_size": image_size, "channels": channels, "test_fraction": test_fraction}
    run = {"workers": workers or _usable_cores(), "strict": strict,
           "progress": sys.stderr.isatty() if progress is None else progress}
    if os.path.isdir(root):
        return _load_folder(root, options, cache_dir, run)
    if root.lower().endswith(ARRAY_EXTENSIONS):
        return _load_array_file(root, options, cache_dir, run)
    raise UserError(f"{path} is neither a folder of images nor a .npy or .npz file")


def _check_options(image_size, channels, test_fraction, workers):
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a whole number of pixels >= 1, not {image_size!r}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), not {channels!r}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"test fraction must be at least 0 and below 1, not {test_fraction!r}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, not {workers!r}")


# ---- a folder ----

def _load_folder(root, options, cache_dir, run):
    files, scan_skipped = _scan_folder(root)
    if not files and not scan_skipped:
        raise UserError(f"{root}: no image files in it (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)")
    fingerprint = _fingerprint(root, "folder", options, files + scan_skipped)
    cache_path = _cache_path(cache_dir, root, "folder", options, fingerprint)
    result = _read_cache(cache_path, fingerprint, root)
    if result is None:
        result = _read_folder(root, [rel for rel, _, _ in files], scan_skipped, options, run)
        result["info"]["fingerprint"] = fingerprint
        _write_cache(cache_path, result)
    info = result["info"]
    _report_skipped(root, info["skipped_first"], info["skipped"], run["strict"])
    return result


def _scan_folder(root):
    """[(relative POSIX path, bytes, mtime_ns)] of the image files below root, sorted, and
    [(relative path, reason)] of the folders and links that could not be read."""
    found, unreadable = [], []
    seen_folders = set()
    _first_visit(root, seen_folders)

    def note_unreadable(error):
        unreadable.append((_relative(error.filename, root) + "/", error.strerror or str(error)))

    for folder, subfolders, names in os.walk(root, onerror=note_unreadable, followlinks=True):
        # Sorted, so which of two links to one folder is kept does not depend on the disk.
        subfolders[:] = [d for d in sorted(subfolders) if not d.startswith(".")
                         and _first_visit(os.path.join(folder, d), seen_folders)]
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full_path = os.path.join(folder, name)
            try:
                stat = os.stat(full_path)
            except OSError as error:  # a broken link
                unreadable.append((_relative(full_path, root), error.strerror or str(error)))
                continue
            found.append((_relative(full_path, root), stat.st_size, stat.st_mtime_ns))
    return sorted(found), sorted(unreadable)


def _first_visit(folder, seen_folders):
    """Whether `folder` is new: (device, inode) ends link loops and double visits alike."""
    try:
        stat = os.stat(folder)
    except OSError:
        return False
    key = (stat.st_dev, stat.st_ino)
    if key in seen_folders:
        return False
    seen_folders.add(key)
    return True


def _relative(path, root):
    return PurePath(os.path.relpath(path, root)).as_posix()


def _read_folder(root, relpaths, scan_skipped, options, run):
    """Decode the folder's images (train first, then test) into one result dict."""
    entries, classes = _plan_folder(root, relpaths, options["test_fraction"])
    skipped = list(scan_skipped)
    if not entries and not skipped:
        raise UserError(f"{root}: its train/ and test/ folders hold no image files")
    _refuse_skipped(root, entries, skipped, run["strict"])
    shape = (options["channels"], options["image_size"], options["image_size"])
    if None in shape:  # the headers must say what the options leave open
        headers = _collect(_probe_chunk, _full_paths(root, entries), (), run, "reading headers")
        failed = [i for i, header in enumerate(headers) if isinstance(header, str)]
        skipped += [(entries[i][0], headers[i]) for i in failed]
        entries, headers = _drop(entries, failed), _drop(headers, failed)
        _refuse_skipped(root, entries, skipped, run["strict"])
        shape = _shape_from_headers(root, headers, options)
    _check_memory(len(entries) * int(np.prod(shape)),
                  f"{len(entries)} images of {'x'.join(map(str, shape))} from {root}")
    images, failures = _decode_all(_full_paths(root, entries), shape, options["image_size"], run)
    if failures:  # rare: a file whose header read but whose pixels did not
        skipped += [(entries[i][0], reason) for i, reason in failures]
        kept = _drop(range(len(entries)), [i for i, _ in failures])
        entries, images = [entries[i] for i in kept], images[kept]
        _refuse_skipped(root, entries, skipped, run["strict"])
    return _result(root, "folder", images, [e[1] for e in entries], [e[2] for e in entries],
                   skipped, classes)


def _plan_folder(root, relpaths, test_fraction):
    """[(relpath, is_test, label)], train before test, and the class names (None: no classes)."""
    has_split_folders = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test"))
    placed = []  # (relpath, is_test, path inside the split)
    if has_split_folders:
        for rel in relpaths:
            top, _, rest = rel.partition("/")
            if top in ("train", "test") and rest:
                placed.append((rel, top == "test", rest))
    else:
        placed = [(rel, is_test, rel) for rel, is_test in zip(relpaths, _held_out(relpaths, test_fraction))]
    placed.sort(key=lambda p: p[1])  # stable: each split stays in path order
    tops = [inner.partition("/")[0] if "/" in inner else None for _, _, inner in placed]
    if not tops or None in tops:
        return [(rel, is_test, 0) for rel, is_test, _ in placed], None
    classes = sorted(set(tops))
    index = {name: i for i, name in enumerate(classes)}
    return [(rel, is_test, index[top]) for (rel, is_test, _), top in zip(placed, tops)], classes


def _held_out(keys, test_fraction):
    """Whether each key (a relative path or an array index) is held out for test: a fixed hash
    below test_fraction, not a random draw, so the answer never depends on which other images
    exist. Where that holds out none of two or more keys (a small folder: 48 images at 0.05
    hold out none 8% of the time), the key of least hash alone is held out, so the test split
    is not empty by chance; that choice can change as images are added only until one of them
    falls below test_fraction."""
    hashes = [int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") for key in keys]
    held = [h < test_fraction * 2 ** 64 for h in hashes]
    if test_fraction > 0 and len(keys) >= 2 and not any(held):
        held[hashes.index(min(hashes))] = True
    return held


def _full_paths(root, entries):
    return [os.path.join(root, *rel.split("/")) for rel, _, _ in entries]


def _drop(items, positions):
    positions = set(positions)
    return [item for i, item in enumerate(items) if i not in positions]


def _refuse_skipped(root, entries_left, skipped, strict):
    """Before decoding on: a UserError when strict and a file was skipped, or when none is left."""
    if strict:
        _report_skipped(root, _first_skipped(skipped), len(skipped), strict=True)
    if not entries_left:
        raise UserError(f"{root}: none of its {len(skipped)} image files could be read: "
                        f"{_skipped_summary(_first_skipped(skipped), len(skipped))}")


def _shape_from_headers(root, headers, options):
    """(C, H, W) from the options, or from the headers where the options leave it open."""
    channels = options["channels"] or (1 if all(grey for _, _, grey in headers) else 3)
    if options["image_size"] is not None:
        return channels, options["image_size"], options["image_size"]
    sizes = collections.Counter((width, height) for width, height, _ in headers)
    if len(sizes) > 1:
        raise _mixed_sizes_error(root, sizes)
    (width, height), = sizes
    return channels, height, width


def _mixed_sizes_error(where, sizes):
    """sizes: Counter of (width, height)."""
    listed = ", ".join(f"{w}x{h} ({n} image{'s' if n > 1 else ''})"
                       for (w, h), n in sizes.most_common(3))
    more = f", and {len(sizes) - 3} more" if len(sizes) > 3 else ""
    return UserError(f"{where}: the images come in {len(sizes)} sizes (width x height): "
                     f"{listed}{more}; give an image size N (--image_size N) to resize and "
                     f"centre-crop every one to N x N")


# ---- one image (these run in worker processes) ----

def _probe_chunk(paths):
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
        return _reason(error, path)


def _decode_chunk(paths, shape, image_size):
    """uint8 (len(paths), C, H, W), zero where a file failed, and [(position, reason)]."""
    images = np.zeros((len(paths), *shape), dtype=np.uint8)
    failures = []
    for i, path in enumerate(paths):
        try:
            images[i] = _decode(path, shape, image_size)
        except Exception as error:  # Pillow's plugins raise anything from OSError to SyntaxError
            failures.append((i, _reason(error, path)))
    return images, failures


def _decode(path, shape, image_size):
    with Image.open(path) as opened:
        if image_size is not None:
            # JPEG only: decode at 1/2 to 1/8 scale when that still covers image_size.
            opened.draft(None, (image_size, image_size))
        # Inside the `with`: an image already in the right mode is still the lazy, open file.
        return _to_chw(_prepare(opened, shape[0], image_size), shape)


def _to_chw(image, shape):
    pixels = np.asarray(image)
    if pixels.shape[:2] != shape[1:]:
        raise ValueError(f"decodes to {pixels.shape[1]}x{pixels.shape[0]}, not the "
                         f"{shape[2]}x{shape[1]} of the others")
    return pixels.reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1)


def _prepare(image, channels, image_size):
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


def _reason(error, path=None):
    """One short line for a file that failed, without the path the warning already names."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if path is not None:
        text = text.replace(f"'{path}'", "").replace(path, "").strip(" :")
    return text[:80] or type(error).__name__


# ---- many images, in parallel ----

def _collect(work, items, args, run, what):
    """work(chunk, *args) over consecutive chunks of items, results flattened in item order."""
    by_start = dict(_run_chunks(work, items, args, run, what))
    return [result for start in sorted(by_start) for result in by_start[start]]


def _decode_all(paths, shape, image_size, run):
    """uint8 (N, C, H, W) filled chunk by chunk, so the result is never held twice, and
    [(index, reason)] of the files that failed (their rows are zero)."""
    images = torch.empty((len(paths), *shape), dtype=torch.uint8)
    target = images.numpy()
    failures = []
    for start, (chunk, chunk_failures) in _run_chunks(_decode_chunk, paths, (shape, image_size),
                                                      run, "decoding images"):
        target[start:start + len(chunk)] = chunk
        failures += [(start + i, reason) for i, reason in chunk_failures]
    return images, sorted(failures)


def _run_chunks(work, items, args, run, what):
    """Yield (first index, work(chunk, *args)) for chunks of items, in worker processes when
    there are enough items to pay for starting them, in completion order."""
    workers = run["workers"]
    size = max(16, min(256, len(items) // (workers * 4)))
    starts = range(0, len(items), size)
    with tqdm(total=len(items), desc=what, unit="image", disable=not run["progress"],
              leave=False, file=sys.stderr) as bar:
        if workers == 1 or len(items) < SERIAL_BELOW_FILES:
            for start in starts:
                yield start, work(items[start:start + size], *args)
                bar.update(len(items[start:start + size]))
            return
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=_pool_context())
        try:
            futures = {pool.submit(work, items[s:s + size], *args): s for s in starts}
            for future in concurrent.futures.as_completed(futures):
                yield futures[future], future.result()
                bar.update(len(items[futures[future]:futures[future] + size]))
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


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---- an array file ----

def _load_array_file(path, options, cache_dir, run):
    headers = _array_headers(path)
    picked = _pick_arrays(path, headers)
    layouts = {split: _layout(path, name, *headers[name]) for split, name in picked.items()}
    shape = _array_result_shape(path, layouts, options)
    converted = any(layout[1] != shape for layout in layouts.values())
    stat = os.stat(path)
    fingerprint = _fingerprint(path, "array", options, [(os.path.basename(path), stat.st_size,
                                                         stat.st_mtime_ns)])
    cache_path = _cache_path(cache_dir if converted else None, path, "array", options,
                             fingerprint)
    result = _read_cache(cache_path, fingerprint, path)
    if result is None:
        n_images = sum(layout[2] for layout in layouts.values())
        if n_images == 0:
            raise UserError(f"{path} holds no images")
        # An .npz member is read whole, and images to convert are first taken out as they are;
        # a .npy is memory-mapped and copied straight into the result.
        input_bytes = sum(n * int(np.prod(chw)) for _, chw, n in layouts.values())
        extra_bytes = input_bytes if converted or path.lower().endswith(".npz") else 0
        _check_memory(n_images * int(np.prod(shape)) + extra_bytes,
                      f"{n_images} images of {'x'.join(map(str, shape))} from {path}")
        result = _read_arrays(path, picked, layouts, shape, options, run)
        result["info"]["fingerprint"] = fingerprint
        _write_cache(cache_path, result)
    return result


def _array_headers(path):
    """{name: (shape, dtype)} of every array in the file, from the headers alone."""
    try:
        if path.lower().endswith(".npy"):
            with open(path, "rb") as f:
                return {"": _npy_header(f)}
        with zipfile.ZipFile(path) as archive:
            return {name[:-4]: _npy_member_header(archive, name)
                    for name in archive.namelist() if name.endswith(".npy")}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a readable numpy file: {_reason(error)}") from None


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
        raise _mixed_sizes_error(path, sizes)
    (width, height), = sizes
    return channels, height, width


def _read_arrays(path, picked, layouts, shape, options, run):
    """The arrays' images, split, as one uint8 (N, C, H, W) tensor of `shape`, train first."""
    arrays = _open_arrays(path, picked, layouts)
    if "all" in arrays:
        everything = arrays.pop("all")
        held_out = np.array(_held_out([str(i) for i in range(len(everything))], options["test_fraction"]),
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
    return _result(path, "array", images, [False] * n_train + [True] * n_test,
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
        raise UserError(f"{path} is not a readable numpy file: {_reason(error)}") from None
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
    for start, chunk in _run_chunks(_convert_chunk, selected, (target.shape[1:], image_size),
                                    run, "converting images"):
        target[start:start + len(chunk)] = chunk


def _convert_chunk(array, shape, image_size):
    out = np.empty((len(array), *shape), dtype=np.uint8)
    for i, chw in enumerate(array):
        pixels = np.ascontiguousarray(chw.transpose(1, 2, 0))
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        out[i] = _to_chw(_prepare(image, shape[0], image_size), shape)
    return out


# ---- results, memory, warnings ----

def _result(path, kind, images, is_test, labels, skipped, classes):
    """The result dict from images ordered train first, one is_test flag and label per image."""
    n_test = sum(is_test)
    n_train = len(is_test) - n_test
    info = {"path": path, "kind": kind, "name": source_name(path),
            "image_shape": tuple(images.shape[1:]), "n_train": n_train, "n_test": n_test,
            "fingerprint": None, "skipped": len(skipped),
            "skipped_first": _first_skipped(skipped), "cached": False}
    if classes is not None:
        info["classes"] = classes
    labels = torch.tensor(labels, dtype=torch.int64)
    return {"train": images[:n_train], "test": images[n_train:],
            "train_labels": labels[:n_train], "test_labels": labels[n_train:], "info": info}


def _available_memory_bytes():
    """MemAvailable from /proc/meminfo, or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_memory(needed_bytes, what):
    available_bytes = _available_memory_bytes()
    if available_bytes is not None and needed_bytes > available_bytes:
        raise UserError(f"{what} would take {needed_bytes / 1e9:.2f} GB of memory, but only "
                        f"{available_bytes / 1e9:.2f} GB is available; use a smaller image "
                        f"size or fewer images")


def _first_skipped(skipped):
    return [f"{rel} ({why})" for rel, why in sorted(skipped)[:SKIPPED_NAMED]]


def _skipped_summary(first, count):
    more = count - len(first)
    return ", ".join(first) + (f", and {more} more" if more else "")


def _report_skipped(root, first, count, strict):
    """One warning line on stderr for the files a load skipped; when strict, the error instead."""
    if not count:
        return
    if strict:
        raise UserError(f"{root}: {count} image file(s) could not be read: "
                        f"{_skipped_summary(first, count)}")
    print(f"warning: skipped {count} unreadable image file(s) in {root}: "
          f"{_skipped_summary(first, count)}", file=sys.stderr, flush=True)


# ---- the cache ----

def _fingerprint(path, kind, options, entries):
    """Hex key of the source's place, the options and each (relative path, size, mtime_ns)."""
    digest = hashlib.blake2b(_place_key(path, kind, options).encode(), digest_size=16)
    for entry in entries:
        digest.update(("\0".join(map(str, entry)) + "\n").encode())
    return digest.hexdigest()


def _place_key(path, kind, options):
    """Hex key of what a cache is for, apart from the files' contents."""
    what = json.dumps([FORMAT_VERSION, kind, os.path.realpath(path), options], sort_keys=True)
    return hashlib.blake2b(what.encode(), digest_size=6).hexdigest()


def _cache_path(cache_dir, path, kind, options, fingerprint):
    if cache_dir is None:
        return None
    name = f"images_{source_name(path)}_{_place_key(path, kind, options)}_{fingerprint[:16]}.pt"
    return os.path.join(os.fspath(cache_dir), name)


def _read_cache(cache_path, fingerprint, path):
    """The cached result, or None when there is none for these files (or it is unreadable).
    `path` replaces the stored one, which may be another link to the same files."""
    if cache_path is None or not os.path.isfile(cache_path):
        return None
    _check_memory(os.path.getsize(cache_path), f"the cached images in {cache_path}")
    try:
        saved = load_torch_file(cache_path, what="image cache")
    except UserError as error:
        print(f"warning: ignored the image cache ({error}); reading the images again",
              file=sys.stderr, flush=True)
        return None
    info = saved.get("info") if isinstance(saved, dict) else None
    if not isinstance(info, dict) or info.get("fingerprint") != fingerprint:
        return None
    return {**saved, "info": {**info, "path": path, "name": source_name(path), "cached": True}}


def _write_cache(cache_path, result):
    """Save the result; on failure only warn. Then drop older caches of the same source."""
    if cache_path is None:
        return
    try:
        atomic_torch_save(result, cache_path)
    except UserError as error:
        print(f"warning: images not cached ({error})", file=sys.stderr, flush=True)
        return
    prefix = os.path.basename(cache_path).rsplit("_", 1)[0]
    for old in glob.glob(os.path.join(glob.escape(os.path.dirname(cache_path)), prefix + "_*.pt")):
        if old != cache_path:
            try:
                os.remove(old)
            except OSError:
                pass  # another process may have removed it first
