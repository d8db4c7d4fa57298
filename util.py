"""Small shared helpers that know neither models nor datasets: the user-error type, atomic
tensor files, image grids, seeding, the per-run CSV, and turning uint8 images into floats.

Imports no project file, and torch only inside the functions that need it, so the command line
can use UserError before torch is imported."""

import contextlib
import csv
import os
import pickle
import random
import re
import signal
import socket
import tempfile
import time
import warnings
import zipfile


class UserError(Exception):
    """A problem the user can fix (bad flag, missing or unreadable file).

    The command line prints it as one line and exits with status 2. Under torchrun every
    process meets the same problem and rank 0 alone prints it, unless `this_rank_only` says
    it arose in this process alone (then this process prints it). `remedy`, (what to do, {its
    values}), names a way out that the caller words: the command line with its flags
    (VanVAE.REMEDIES), so that lower layers speak of values only."""

    def __init__(self, message, this_rank_only=False, remedy=None):
        super().__init__(message)
        self.this_rank_only = this_rank_only
        self.remedies = [] if remedy is None else [remedy]

    def extended(self, words, remedy=None):
        """The same error, of the same class, with `words` after its message and `remedy`
        after its remedies: a caller adds what it knows without losing what was known."""
        error = self.__class__.__new__(self.__class__)
        error.__dict__.update(self.__dict__)
        error.args = (f"{self}{words}",)
        error.remedies = self.remedies + ([] if remedy is None else [remedy])
        return error


class BadValue(UserError):
    """A value that cannot work, named by its field (latent_dim, precision): lower layers raise
    it in words about values, "latent_dim must be at least 1, not 0"; the command line, whose
    flags bear the fields' names (settings.py), prints it as "--latent_dim must be ..."."""

    def __init__(self, field, message):
        super().__init__(f"{field} {message}")
        self.field = field


class Stopped(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop, `kill`), raised where the process is
    (stops_raise). A KeyboardInterrupt, so whatever cleans up after Ctrl-C cleans up after
    both. `left`: what the stop leaves on disk, in words, where a stage knows better than the
    command line (set on the way up by whoever knows it)."""

    def __init__(self, signal_name, left=None):
        super().__init__(signal_name)
        self.signal_name, self.left = signal_name, left


def _raise_stopped(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def stops_raise():
    """From now on, SIGINT and SIGTERM raise Stopped in the main thread, between any two Python
    operations: every stage that runs Python answers a stop within the longest single
    operation it makes (a torch or numpy call), not only the epochs' loop, which polls its own
    flag between steps instead. Python's default SIGTERM ends the process with no word.
    Returns the handlers it replaced, for signal_handlers_back."""
    return {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}


def signal_handlers_back(previous):
    for s, handler in previous.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def stops_held():
    """Within the block, Ctrl-C and SIGTERM are only noted, and raised as Stopped once it ends:
    for imports, since medmnist's has a bare `except:` that would swallow the stop. (Blocking the
    signals instead protected only the threads that inherit the mask: once, in a full test run,
    the press was lost and the run carried on to the end.)"""
    noted = []
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        signal_handlers_back(previous)
    if noted:
        raise Stopped(signal.Signals(noted[0]).name)


@contextlib.contextmanager
def written_atomically(path, suffix=None):
    """Yield a temporary path beside `path` (so the rename cannot cross filesystems), ending in
    `suffix` (default: path's extension, for writers that read the format from it); once the
    block ends, it replaces `path` whole, with the permissions the user's umask gives a new
    file. On any error or stop the temporary is removed, so `path` is either as it was or
    complete, never half. Its name carries this machine and process (remove_stale_temporaries)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{_HOST}-{os.getpid()}-",
                               suffix=os.path.splitext(path)[1] if suffix is None else suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from colleagues
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def path_problem(path, kind=None, need="read"):
    """What stops `path` from serving, in words that follow "PATH: ", or None. kind: "folder",
    "file" or None (either); need: "read" (it must exist and be readable), "write" (it may be
    created: its nearest existing folder must take new files) or "read_write" (both, as a
    checkpoint replaced in place). Creates nothing. Root passes every permission check, so
    those cases only ever show for other users."""
    path = os.fspath(path)
    if not path:
        return "an empty path"
    full = os.path.abspath(path)
    name_max = _pathconf(os.path.dirname(full), "PC_NAME_MAX", 255)
    long_name = next((part for part in full.split(os.sep) if len(os.fsencode(part)) > name_max), None)
    if long_name is not None:
        return f"a name in it is {len(os.fsencode(long_name))} bytes long; this filesystem allows {name_max}"
    if os.path.lexists(path) and not os.path.exists(path):
        return "a broken symbolic link (or a loop of links)"
    if os.path.exists(path):
        folder = os.path.isdir(path)
        if kind == "folder" and not folder:
            return "it is a file, not a folder"
        if kind == "file" and folder:
            return "it is a folder, not a file"
        if need != "write" or folder:
            if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
                return "permission denied (it cannot be read)"
        where = full if folder else os.path.dirname(full)
    else:
        if need != "write":
            return "no such folder or file" if kind is None else f"no such {kind}"
        where = os.path.dirname(full)
        while not os.path.lexists(where):
            where = os.path.dirname(where)
        if not os.path.exists(where):
            return f"cannot create it: {where} is a broken symbolic link"
        if not os.path.isdir(where):
            return f"cannot create it: {where} is a file, not a folder"
    if need != "read":
        if os.statvfs(where).f_flag & os.ST_RDONLY:  # first: access() says no there too, even to root
            return f"{where} is on a read-only filesystem"
        if not os.access(where, os.W_OK | os.X_OK):
            return f"permission denied (nothing can be written in {where})"
    return None


def _pathconf(path, name, default):
    try:
        return os.pathconf(path if os.path.isdir(path) else "/", name)
    except (OSError, ValueError):
        return default


def first_line(error):
    """The gist of an exception's message: libraries' messages can span many lines (medmnist
    prints a whole how-to, torch a stack of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def seed_everything(seed):
    import torch
    random.seed(seed)
    torch.manual_seed(seed)


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to 64 MiB (a step's activations at batch 128, an IW bound's chunk) come from
# the heap and are reused; larger ones (a 100,000-sample tensor) are still mapped and handed back,
# and at most 128 MiB of free heap is kept, so resident memory stays bounded.
MMAP_THRESHOLD, TRIM_THRESHOLD = 64 * 2**20, 128 * 2**20


def keep_freed_memory():
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default a block over its mmap threshold is unmapped when freed, so a training step or an
    IW-bound batch that allocates the same large activations again touches fresh pages: on a
    2-core EPYC 150,000-370,000 page faults per 40 steps, a system time of 10-15% of the step
    in training and as much as the user time in the IW bound (docs/BENCHMARKS.md). PyTorch's
    CPU tuning guide gives the same cure by preloading jemalloc or tcmalloc; mallopt reaches it
    at run time, with no library to install. Peak memory is unchanged (freed blocks are reused,
    not added to). Does nothing where the C library is not glibc. Returns whether it applied."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return False
        return (bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    except OSError:
        return False


def to_float(images_uint8, device):
    """uint8 images in [0, 255] as float32 in [0, 1] on `device`."""
    return images_uint8.to(device, non_blocking=True).float().div_(255)


def atomic_torch_save(obj, path):
    """Write `obj` so that `path` is either the old file or the complete new one, never half,
    with the permissions the user's umask gives a new file.

    Written through written_atomically, its temporary always ending in .pt, so the next save
    into the folder removes those a killed process left behind (and only those)."""
    import torch
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        with written_atomically(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        # torch's zip writer turns a full disk into RuntimeError("unexpected pos ...").
        raise UserError(f"could not save {path}: {_save_failure(e, folder)}; "
                        "any previous file there is left intact") from None


_TMP_PREFIX = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_LEGACY_TMP_AGE_S = 3600  # .tmp-XXXXXXXX.pt, from before the names carried a process


def _save_failure(error, folder):
    if isinstance(error, OSError):
        return error.strerror or str(error)
    try:
        if os.statvfs(folder).f_bavail == 0:
            return "no space left on device"
    except OSError:
        pass
    return first_line(error)


def remove_stale_temporaries(folder):
    """Delete this tool's temporary files in `folder` whose writer is gone: those of a process of
    this machine that no longer runs, and old ones that name no process."""
    for name in os.listdir(folder):
        if not (name.startswith(_TMP_PREFIX) and name.endswith(".pt")):
            continue
        parts = name[len(_TMP_PREFIX):].split("-")
        path = os.path.join(folder, name)
        try:
            if len(parts) >= 3 and parts[0] == _HOST and parts[1].isdigit():
                stale = not _process_alive(int(parts[1]))
            else:
                stale = len(parts) == 1 and time.time() - os.path.getmtime(path) > _LEGACY_TMP_AGE_S
            if stale:
                os.remove(path)
        except OSError:  # gone already, or not ours to remove
            pass


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def current_umask():
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_torch_file(path, what="checkpoint"):
    """Load a file written by atomic_torch_save onto the CPU, refusing pickled code."""
    import torch
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols on stderr; the error below says it all.
            warnings.simplefilter("ignore")
            # weights_only=True refuses any pickle that would import or run code.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a VanVAE {what}: refused to load it ({_unpickling_reason(e)}); "
                        "files are read with weights_only=True, so none can run code") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{path} is not a readable {what} (truncated or corrupted?): "
                        f"{first_line(e)}") from None


# torch wraps the real reason in advice to load with weights_only=False, which is the one
# thing a user must not do with a file they cannot trust.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickling_reason(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return reasons[0] if reasons else "not a plain tensor file"


GRID_WIDTH_PX = 512  # small images are enlarged until a grid is about this wide
MAX_UPSCALE = 4


def grid_scale(image_size, nrow):
    """The whole-number enlargement of `image_size`-pixel images that makes a grid of `nrow`
    columns about GRID_WIDTH_PX wide: 4x4 of 28 px becomes 458 px, not 122."""
    return max(1, min(MAX_UPSCALE, -(-GRID_WIDTH_PX // (nrow * image_size))))


def image_grid(images, nrow=None, scale=None):
    """Float images in [0, 1] (N, C, H, W) as one (C', H', W') grid tensor in [0, 1], each
    image enlarged by nearest neighbour (pixels stay crisp squares), 2 px padding."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid
    n = images.shape[0]
    nrow = nrow or max(1, int(n ** 0.5 + 0.5))
    images = images.detach().float().cpu().clamp(0, 1)
    scale = scale or grid_scale(images.shape[-1], min(nrow, n))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=nrow, padding=2)


def save_image_grid(images, path, nrow=None, scale=None):
    """Save float images in [0, 1] (N, C, H, W) as one PNG grid (image_grid); returns the grid."""
    from torchvision.utils import save_image
    grid = image_grid(images, nrow, scale)
    with written_atomically(path) as tmp:
        save_image(grid, tmp)
    return grid


def write_csv(path, rows):
    """Rewrite a whole CSV from a list of dicts, through a temporary file so a reader never
    sees half of it (the whole history is rewritten, so a resumed run never doubles rows)."""
    with written_atomically(path) as tmp, open(tmp, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
