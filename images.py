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
  where no hash falls below it holds out its image of least hash; see image_results.held_out_by_hash).
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
import os
from pathlib import PurePath

import numpy as np

from image_arrays import load_array_file
from image_decode import IMAGE_EXTENSIONS, collect, decode_all, probe_chunk, usable_cores
from image_results import (
    cache_path_for,
    check_memory,
    first_skipped,
    held_out_by_hash,
    make_result,
    mixed_sizes_error,
    read_cache,
    report_skipped,
    skipped_summary,
    source_fingerprint,
    source_name,  # noqa: F401 (part of this file's interface: images.source_name)
    write_cache,
)
from settings import ARRAY_EXTENSIONS, TEST_FRACTION
from util import UserError


def load_source(path, *, image_size=None, channels=None, test_fraction=TEST_FRACTION, cache_dir=None,
                strict=False, workers=None, progress=None):
    """Load a folder of images or a .npy/.npz file as uint8 train and test tensors.

    image_size: None (all images must share one size) or N for N x N; channels: 1, 3 or None
    (1 when every image is grey, else 3); test_fraction: the held-out share in [0, 1) when the
    source has no split of its own; cache_dir: where to keep the decoded result (None: nowhere);
    strict: an unreadable image is an error rather than skipped; workers: processes that decode
    (None: every usable core); progress: whether to show it (progress.Progress: a bar on a
    terminal, lines elsewhere; None: shown).

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
    run = {"workers": workers or usable_cores(), "strict": strict,
           "progress": True if progress is None else progress}
    if os.path.isdir(root):
        return _load_folder(root, options, cache_dir, run)
    if root.lower().endswith(ARRAY_EXTENSIONS):
        return load_array_file(root, options, cache_dir, run)
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
    fingerprint = source_fingerprint(root, "folder", options, files + scan_skipped)
    cache_path = cache_path_for(cache_dir, root, "folder", options, fingerprint)
    result = read_cache(cache_path, fingerprint, root)
    if result is None:
        result = _read_folder(root, [rel for rel, _, _ in files], scan_skipped, options, run)
        result["info"]["fingerprint"] = fingerprint
        write_cache(cache_path, result)
    info = result["info"]
    report_skipped(root, info["skipped_first"], info["skipped"], run["strict"])
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
        headers = collect(probe_chunk, _full_paths(root, entries), (), run, "reading headers")
        failed = [i for i, header in enumerate(headers) if isinstance(header, str)]
        skipped += [(entries[i][0], headers[i]) for i in failed]
        entries, headers = _drop(entries, failed), _drop(headers, failed)
        _refuse_skipped(root, entries, skipped, run["strict"])
        shape = _shape_from_headers(root, headers, options)
    check_memory(len(entries) * int(np.prod(shape)),
                  f"{len(entries)} images of {'x'.join(map(str, shape))} from {root}")
    images, failures = decode_all(_full_paths(root, entries), shape, options["image_size"], run)
    if failures:  # rare: a file whose header read but whose pixels did not
        skipped += [(entries[i][0], reason) for i, reason in failures]
        kept = _drop(range(len(entries)), [i for i, _ in failures])
        entries, images = [entries[i] for i in kept], images[kept]
        _refuse_skipped(root, entries, skipped, run["strict"])
    return make_result(root, "folder", images, [e[1] for e in entries], [e[2] for e in entries],
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
        placed = [(rel, is_test, rel) for rel, is_test in zip(relpaths, held_out_by_hash(relpaths, test_fraction))]
    placed.sort(key=lambda p: p[1])  # stable: each split stays in path order
    tops = [inner.partition("/")[0] if "/" in inner else None for _, _, inner in placed]
    if not tops or None in tops:
        return [(rel, is_test, 0) for rel, is_test, _ in placed], None
    classes = sorted(set(tops))
    index = {name: i for i, name in enumerate(classes)}
    return [(rel, is_test, index[top]) for (rel, is_test, _), top in zip(placed, tops)], classes


def _full_paths(root, entries):
    return [os.path.join(root, *rel.split("/")) for rel, _, _ in entries]


def _drop(items, positions):
    positions = set(positions)
    return [item for i, item in enumerate(items) if i not in positions]


def _refuse_skipped(root, entries_left, skipped, strict):
    """Before decoding on: a UserError when strict and a file was skipped, or when none is left."""
    if strict:
        report_skipped(root, first_skipped(skipped), len(skipped), strict=True)
    if not entries_left:
        raise UserError(f"{root}: none of its {len(skipped)} image files could be read: "
                        f"{skipped_summary(first_skipped(skipped), len(skipped))}")


def _shape_from_headers(root, headers, options):
    """(C, H, W) from the options, or from the headers where the options leave it open."""
    channels = options["channels"] or (1 if all(grey for _, _, grey in headers) else 3)
    if options["image_size"] is not None:
        return channels, options["image_size"], options["image_size"]
    sizes = collections.Counter((width, height) for width, height, _ in headers)
    if len(sizes) > 1:
        raise mixed_sizes_error(root, sizes)
    (width, height), = sizes
    return channels, height, width
