"""What a load of the user's images returns and keeps (images.py documents the behaviour):
the result dict, the hash split that holds images out for test, the memory check, the warning
for skipped files, and the cache of a decoded source."""

import glob
import hashlib
import json
import os
import re
import sys

import torch

from util import UserError, atomic_torch_save, load_torch_file

FORMAT_VERSION = 1  # bump when decoding changes, so caches of the old decoding are not reused
SKIPPED_NAMED = 3  # how many unreadable files one warning line names


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


def held_out_by_hash(keys, test_fraction):
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


def mixed_sizes_error(where, sizes):
    """sizes: Counter of (width, height)."""
    listed = ", ".join(f"{w}x{h} ({n} image{'s' if n > 1 else ''})"
                       for (w, h), n in sizes.most_common(3))
    more = f", and {len(sizes) - 3} more" if len(sizes) > 3 else ""
    return UserError(f"{where}: the images come in {len(sizes)} sizes (width x height): {listed}{more}",
                     remedy=("one_image_size", {}))




# ---- results, memory, warnings ----

def make_result(path, kind, images, is_test, labels, skipped, classes):
    """The result dict from images ordered train first, one is_test flag and label per image."""
    n_test = sum(is_test)
    n_train = len(is_test) - n_test
    info = {"path": path, "kind": kind, "name": source_name(path),
            "image_shape": tuple(images.shape[1:]), "n_train": n_train, "n_test": n_test,
            "fingerprint": None, "skipped": len(skipped),
            "skipped_first": first_skipped(skipped), "cached": False}
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


def check_memory(needed_bytes, what):
    available_bytes = _available_memory_bytes()
    if available_bytes is not None and needed_bytes > available_bytes:
        raise UserError(f"{what} would take {needed_bytes / 1e9:.2f} GB of memory, but only "
                        f"{available_bytes / 1e9:.2f} GB is available; use a smaller image "
                        f"size or fewer images")


def first_skipped(skipped):
    return [f"{rel} ({why})" for rel, why in sorted(skipped)[:SKIPPED_NAMED]]


def skipped_summary(first, count):
    more = count - len(first)
    return ", ".join(first) + (f", and {more} more" if more else "")


def report_skipped(root, first, count, strict):
    """One warning line on stderr for the files a load skipped; when strict, the error instead."""
    if not count:
        return
    if strict:
        raise UserError(f"{root}: {count} image file(s) could not be read: "
                        f"{skipped_summary(first, count)}")
    print(f"warning: skipped {count} unreadable image file(s) in {root}: "
          f"{skipped_summary(first, count)}", file=sys.stderr, flush=True)


# ---- the cache ----

def source_fingerprint(path, kind, options, entries):
    """Hex key of the source's place, the options and each (relative path, size, mtime_ns)."""
    digest = hashlib.blake2b(_place_key(path, kind, options).encode(), digest_size=16)
    for entry in entries:
        digest.update(("\0".join(map(str, entry)) + "\n").encode())
    return digest.hexdigest()


def _place_key(path, kind, options):
    """Hex key of what a cache is for, apart from the files' contents."""
    what = json.dumps([FORMAT_VERSION, kind, os.path.realpath(path), options], sort_keys=True)
    return hashlib.blake2b(what.encode(), digest_size=6).hexdigest()


def cache_path_for(cache_dir, path, kind, options, fingerprint):
    if cache_dir is None:
        return None
    name = f"images_{source_name(path)}_{_place_key(path, kind, options)}_{fingerprint[:16]}.pt"
    return os.path.join(os.fspath(cache_dir), name)


def read_cache(cache_path, fingerprint, path):
    """The cached result, or None when there is none for these files (or it is unreadable).
    `path` replaces the stored one, which may be another link to the same files."""
    if cache_path is None or not os.path.isfile(cache_path):
        return None
    check_memory(os.path.getsize(cache_path), f"the cached images in {cache_path}")
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


def write_cache(cache_path, result):
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
