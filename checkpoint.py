"""The checkpoint file, VanVAE's one saved format: its default place, what it holds, writing it
atomically, reading and checking it, and reading the older format.

Format 2 is a dict that torch.load(weights_only=True) reads (tensors and plain values only):
    format_version  2
    config          vae.VAEConfig as a dict: rebuilds the network
    model           the network's state_dict
    training        TrainingRecord as a dict: what a resumed run and --eval read back
    optimizer       Adam's state_dict                               } where training stands,
    epoch, step     epochs done, and steps done in the next one     } for --resume; absent
    history         one dict of per-epoch figures per epoch         } from a weights-only
    partial         a stopped epoch's running sums and seconds      } file, which samples
    rng             shuffle_at_epoch_start and noise generator states} and evaluates only
    scaler          the fp16 GradScaler's state (CUDA --precision fp16 only)
    priors          {name: priors.py state} fitted after training (gmm, two_stage); absent
                    until one is fitted, and dropped by the next training save (new weights)
    args            the command line's flags: a record for people; no code reads it back
Format 1 had no `training`: its facts sat in `args`. load() reads it and fills the record in
from there, so every checkpoint VanVAE ever wrote still samples, evaluates and resumes."""

import contextlib
import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass

import priors as latent_priors
from settings import LR_SCHEDULES
from util import UserError, atomic_torch_save, first_line, load_torch_file
from vae import VAEConfig, VanillaVAE

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PROGRESS_KEYS = ("optimizer", "epoch", "step", "history", "partial", "rng")


@dataclass(frozen=True)
class TrainingRecord:
    """How the weights were trained: what --resume continues with and --eval must know.

    dataset     the dataset's name (also in config, which rebuilds the network)
    seed        the run's seed: shuffling, noise and the fixed sample grid derive from it
    batch_size  global images per step
    lr          Adam's learning rate
    kld_weight  weight of the KL term in the objective (1 = the ELBO)
    binarize    whether training saw dynamically binarised images (so --eval binarises too)
    data_source None for a named dataset; for the user's own images, data.load_splits' source:
                their path, fingerprint, image counts and shape, and the options they were read
                with, so --eval reads the same held-out split and --resume notices a change
    n_train     training images (None in format 1), so --resume refuses other data
    n_test      test images (None in format 1)
    lr_schedule       constant or cosine (settings.LR_SCHEDULES; schedules.py)
    kl_warmup_epochs  epochs over which the KL weight rose from 0 to kld_weight
    The last two were added to format 2 later, with defaults: a file without them was trained
    with a constant learning rate and no warm-up."""
    dataset: str
    seed: int
    batch_size: int
    lr: float
    kld_weight: float = 1.0
    binarize: bool = False
    data_source: dict | None = None
    n_train: int | None = None
    n_test: int | None = None
    lr_schedule: str = "constant"
    kl_warmup_epochs: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its model on the CPU, its record (None for a weights-only file) and
    the progress entries --resume needs (empty for a weights-only file)."""
    path: str
    model: VanillaVAE
    training: TrainingRecord | None
    progress: dict
    flags: dict
    priors: dict  # {name: state} of the priors fitted after training

    # A weights-only file is evaluated as a plain, non-binarised ELBO model.
    @property
    def binarize(self):
        return self.training is not None and self.training.binarize

    @property
    def kld_weight(self):
        return self.training.kld_weight if self.training is not None else 1.0


def default_path(output_dir, dataset):
    return os.path.join(output_dir, "models", "VanillaVAE", f"VanillaVAE_{dataset}.pt")


def run_dir(output_dir, checkpoint_path):
    """The folder of a checkpoint's pictures, CSV, samples and reports, one per checkpoint:
    runs/<file name without .pt> for a checkpoint at its default place, and for any other
    runs/<file name>-<8 hex digits of its absolute path>, so two checkpoints of one name in
    different folders never share one."""
    stem = os.path.splitext(os.path.basename(checkpoint_path))[0]
    where = os.path.dirname(os.path.abspath(checkpoint_path))
    if where != os.path.abspath(os.path.dirname(default_path(output_dir, "x"))):
        stem += "-" + hashlib.sha1(os.path.abspath(checkpoint_path).encode()).hexdigest()[:8]
    return os.path.join(output_dir, "runs", stem)


@contextlib.contextmanager
def owned(path):
    """Hold the checkpoint at `path` for this process for the block: a second run that asks
    for it is refused at once. The lock is flock() on a hidden file beside it, which the kernel
    releases if the process dies, even by kill -9."""
    lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    fd = _lock(lock_path, path)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)  # before the release, so a waiting opener sees a new file
        except OSError:
            pass
        os.close(fd)


def _lock(lock_path, path):
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot lock {path} ({lock_path}: {e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{path} is in use by another VanVAE run (process {holder}): wait for "
                            "it to end, or give another --checkpoint") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the holder removed it between our open and our lock: try again
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def save(path, model, training, progress, flags):
    """Write a format-2 checkpoint atomically; `progress` holds PROGRESS_KEYS, and the fp16
    loss scaler's state as "scaler" where there is one."""
    extra = {"scaler": progress["scaler"]} if progress.get("scaler") is not None else {}
    atomic_torch_save({"format_version": FORMAT_VERSION, "config": model.config.as_dict(),
                       "model": model.state_dict(), "training": asdict(training),
                       **{key: progress[key] for key in PROGRESS_KEYS}, **extra, "args": flags}, path)


def load(path, dataset=None, image_shape=None):
    """Load and check a checkpoint of any readable format; `dataset`/`image_shape`, where
    given, must agree with it. Every problem is one UserError naming the file."""
    raw = load_torch_file(path)
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise UserError(f"{path} is not a VanVAE checkpoint (no format_version)")
    if raw["format_version"] not in READABLE_VERSIONS:
        raise UserError(f"{path} has checkpoint format {raw['format_version']}; this VanVAE reads "
                        f"formats {' and '.join(map(str, READABLE_VERSIONS))}")
    try:
        model = VanillaVAE(VAEConfig(**raw["config"]))
        model.load_state_dict(raw["model"])
        training = _training_record(raw, model.config.dataset)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not describe a VanVAE model: {first_line(e)}") from None
    progress = {key: raw[key] for key in (*PROGRESS_KEYS, "scaler") if key in raw}
    fitted = _checked_priors(raw.get("priors") or {}, model.config, path)
    ckpt = Checkpoint(str(path), model, training, progress, dict(raw.get("args") or {}), fitted)
    check_matches(ckpt, dataset, image_shape)
    return ckpt


def _checked_priors(fitted, config, path):
    if not isinstance(fitted, dict):
        raise UserError(f"{path} holds a malformed priors entry (not a dict)")
    for name, state in fitted.items():
        try:
            latent_priors.check_prior(state, config.latent_dim)
            if name not in latent_priors.PRIORS or state.get("kind") != name:
                raise ValueError(f"it is stored as {name!r} but is of kind {state.get('kind')!r}")
            if state.get("dataset", config.dataset) != config.dataset:
                raise ValueError(f"it was fitted on {state['dataset']}, the model is of {config.dataset}")
        except ValueError as e:
            raise UserError(f"{path} holds a malformed {name} prior ({first_line(e)}): fit it again "
                            f"with --fit_prior {name} --checkpoint {path}") from None
    return dict(fitted)


def save_priors(ckpt, new_priors):
    """Add (or replace) fitted priors in the checkpoint file, atomically; everything else in
    the file stays as it is. The caller holds the checkpoint (owned())."""
    raw = load_torch_file(ckpt.path)
    upgraded = {**raw, "format_version": FORMAT_VERSION, "priors": {**(raw.get("priors") or {}), **new_priors}}
    if ckpt.training is not None:  # a format-1 file becomes format 2, its record made explicit
        upgraded["training"] = asdict(ckpt.training)
    atomic_torch_save(upgraded, ckpt.path)


def check_matches(ckpt, dataset=None, image_shape=None):
    """Raise UserError unless the checkpoint's model is for `dataset` and `image_shape`
    (either may be None: not checked)."""
    config = ckpt.model.config
    if dataset is not None and dataset != config.dataset:
        raise UserError(f"{ckpt.path} was trained on {config.dataset}, not --dataset {dataset}")
    if image_shape is not None and tuple(image_shape) != config.image_shape:
        raise UserError(f"{ckpt.path} is for {config.image_shape} images, but --dataset/--image_size "
                        f"give {tuple(image_shape)}")


def _training_record(raw, dataset):
    if "training" in raw:
        record = TrainingRecord(**raw["training"])
        if record.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {record.lr_schedule!r}")
        if not isinstance(record.kl_warmup_epochs, int) or record.kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs {record.kl_warmup_epochs!r} is not a whole number >= 0")
        return record
    args = raw.get("args")
    if not isinstance(args, dict) or not all(k in args for k in ("seed", "batch_size", "lr", "kld_weight")):
        return None  # a weights-only format-1 file
    # Format 1 kept these among its flags; binarize was added later, so may be absent.
    return TrainingRecord(dataset, int(args["seed"]), int(args["batch_size"]), float(args["lr"]),
                          float(args["kld_weight"]), bool(args.get("binarize", False)))


def check_resumable(ckpt):
    """Raise UserError unless `ckpt` holds the training state --resume needs; a weights-only
    file can still be sampled from."""
    missing = [key for key in PROGRESS_KEYS if key not in ckpt.progress]
    rng = ckpt.progress.get("rng")
    missing += [f"rng.{key}" for key in ("shuffle_at_epoch_start", "noise")
                if not isinstance(rng, dict) or key not in rng]
    if ckpt.training is None:
        missing.append("training")
    if missing:
        raise UserError(f"{ckpt.path} holds weights but not the training state to resume "
                        f"(missing {', '.join(missing)}); use it with --sample, or train anew")
