"""The checkpoint file, VanVAE's one saved format: its default place, what it holds, writing it
atomically, reading and checking it, and reading the older format.

Format 2 is a dict that torch.load(weights_only=True) reads (tensors and plain values only):
    format_version  2
    config          vae.VAEConfig as a dict: rebuilds the network
    model           the network's state_dict
    training        settings.TrainingRecord as a dict: what a resumed run and --eval read back
    optimizer, epoch, step, history, partial, rng (shuffle_at_epoch_start, noise), scaler:
                    a TrainingState (below), where training stands, for --resume; absent from
                    a weights-only file, which samples and evaluates only. epoch, the epochs
                    trained, also chooses the default prior (settings.prior_order)
    priors          {name: priors.py state} fitted after training (gmm, two_stage, flow, riemannian);
                    written with the weights they were fitted to, and dropped by the next
                    training save (new weights)
    args            the command line's flags: a record for people; no code reads it back
Format 1 had no `training`: its facts sat in `args`. load() reads it and fills the record in
from there, so every checkpoint VanVAE ever wrote still samples, evaluates and resumes."""

import contextlib
import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass, fields

import torch

import priors as latent_priors
from settings import MAX_WIDTH, TrainingRecord, field_problem, value_problem, with_floats
from util import BadValue, UserError, atomic_torch_save, first_line, load_torch_file
from vae import VAEConfig, VanillaVAE

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PROGRESS_KEYS = ("optimizer", "epoch", "step", "history", "partial", "rng")


@dataclass(frozen=True)
class TrainingState:
    """Where training stands: what training.train fills at each save and --resume reads back.
    This file alone writes it into a checkpoint and reads it out (format 2's keys)."""
    optimizer: dict  # Adam's state_dict
    epoch: int  # epochs done
    step: int  # steps done in the next epoch (a stopped epoch), else 0
    history: list  # one dict of per-epoch figures per epoch
    partial: dict | None  # a stopped epoch's running sums ("sums", 3 float64) and "seconds"
    shuffle_at_epoch_start: torch.Tensor  # the shuffle generator's state as the epoch began
    noise: torch.Tensor  # the noise generator's state
    scaler: dict | None = None  # the fp16 GradScaler's state (CUDA --precision fp16 only)

    def as_entries(self):
        """The checkpoint's entries for this state (PROGRESS_KEYS, and "scaler" if any)."""
        entries = {"optimizer": self.optimizer, "epoch": self.epoch, "step": self.step,
                   "history": self.history, "partial": self.partial,
                   "rng": {"shuffle_at_epoch_start": self.shuffle_at_epoch_start, "noise": self.noise}}
        return entries | ({"scaler": self.scaler} if self.scaler is not None else {})


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its model on the CPU, its record (None for a weights-only file), its
    priors, and the raw entries of where training stood (resume_state() checks and types them:
    only --resume needs them but the epoch count, which load() checks; the other modes work
    without them)."""
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

    @property
    def epochs_trained(self):
        """The epochs the weights trained, which choose the default prior (settings.prior_order);
        None for a weights-only file."""
        return self.progress.get("epoch")


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
            raise UserError(f"{path} is in use by another VanVAE run (process {holder})",
                            remedy=("checkpoint_in_use", {})) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the holder removed it between our open and our lock: try again
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def save(path, model, training, state, flags, priors=None):
    """Write a format-2 checkpoint atomically: the model, its TrainingRecord, where training
    stands (a TrainingState), the flags record, and `priors` ({name: state}) if any were fitted
    to these weights."""
    atomic_torch_save({"format_version": FORMAT_VERSION, "config": model.config.as_dict(),
                       "model": model.state_dict(), "training": asdict(training),
                       **state.as_entries(), **({"priors": priors} if priors else {}), "args": flags}, path)


def load(path, dataset=None, image_shape=None):
    """Load and check a checkpoint of any readable format; `dataset`/`image_shape`, where
    given, must agree with it. Every problem is one UserError naming the file."""
    raw = load_torch_file(path)
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise UserError(f"{path} is not a VanVAE checkpoint (no format_version)")
    version = raw["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        shown = version if isinstance(version, int) else repr(str(version)[:40])
        raise UserError(f"{path} has checkpoint format {shown}; this VanVAE reads formats "
                        f"{' and '.join(map(str, READABLE_VERSIONS))} (format_version)")
    try:
        model = _model(raw)
        training = _training_record(raw, model.config.dataset)
        for key, kind in (("args", dict), ("priors", dict)):
            if raw.get(key) is not None and not isinstance(raw[key], kind):
                raise ValueError(f"{key} must be a {kind.__name__}, not {type(raw[key]).__name__}")
    except (KeyError, TypeError, ValueError, RuntimeError, UserError) as e:  # BadValue too
        raise UserError(f"{path} does not describe a VanVAE model: {first_line(e)}") from None
    progress = {key: raw[key] for key in (*PROGRESS_KEYS, "scaler") if key in raw}
    if "epoch" in progress:  # every mode reads it: the epochs trained choose the default prior (settings.prior_order)
        _check_progress_entry(path, progress, "epoch")
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
                raise ValueError(f"it was fitted on {state['dataset']}, the model's dataset is {config.dataset}")
        except ValueError as e:
            raise UserError(f"{path} holds a malformed {name} prior ({first_line(e)})",
                            remedy=("refit_prior", {"prior": name, "path": path})) from None
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
        raise BadValue("dataset", f"{dataset}: {ckpt.path} was trained on {config.dataset}")
    if image_shape is not None and tuple(image_shape) != config.image_shape:
        raise UserError(f"{ckpt.path} is for {config.image_shape} images, but the dataset and image size "
                        f"give {tuple(image_shape)}")


def _model(raw):
    """The network the file describes, its every field and weight checked (ValueError naming it)."""
    saved = raw.get("config")
    if not isinstance(saved, dict):
        raise ValueError(f"config must be a dict, not {type(saved).__name__}")
    names = [f.name for f in fields(VAEConfig)]
    missing = [f.name for f in fields(VAEConfig) if f.name not in saved and not f.metadata.get("added_later")]
    unknown = [str(k) for k in saved if k not in names]
    if missing or unknown:
        wrong = f"lacks {', '.join(missing)}" if missing else f"holds unknown {', '.join(unknown)}"
        raise ValueError(f"config {wrong}")
    for name, length in (("image_shape", 3), ("hidden_dims", None)):
        value = saved[name]
        if not isinstance(value, (list, tuple)) or (length and len(value) != length) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_WIDTH for v in value):
            raise ValueError(f"config.{name} must be a list of {length or 'some'} whole numbers from 1 "
                             f"to {MAX_WIDTH}, not {type(value).__name__} {str(value)[:40]!r}")
    config = VAEConfig(**saved)
    problem = field_problem(config)
    if problem:
        raise ValueError(f"config.{problem}")
    model = VanillaVAE(config)
    weights = raw.get("model")
    if not isinstance(weights, dict):
        raise ValueError(f"model must be a state_dict (a dict), not {type(weights).__name__}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # its first line names no key: the next says which and how
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"model (the weights) does not fit config (the network it describes): "
                         f"{lines[1] if len(lines) > 1 else lines[0]}") from None
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model.{name} holds NaN or infinite values")
    return model


# What data.load_splits records of the user's own images (TrainingRecord.data_source).
DATA_SOURCE_TYPES = {"path": (str,), "kind": (str,), "fingerprint": (str,), "n_train": (int,),
                     "n_test": (int,), "image_shape": (list,), "image_size": (int, type(None)),
                     "channels": (int, type(None)), "test_fraction": (float,), "classes": (list,)}


def _training_record(raw, dataset):
    if "training" in raw:
        saved = raw["training"]
        if not isinstance(saved, dict):
            raise ValueError(f"training must be a dict, not {type(saved).__name__}")
        names = [f.name for f in fields(TrainingRecord)]
        missing = [f.name for f in fields(TrainingRecord)
                   if f.name not in saved and not f.metadata.get("added_later")]
        unknown = [str(k) for k in saved if k not in names]
        if missing or unknown:
            raise ValueError(f"training {'lacks ' + ', '.join(missing) if missing else ''}"
                             f"{' and ' if missing and unknown else ''}"
                             f"{'holds unknown ' + ', '.join(unknown) if unknown else ''}")
        record = with_floats(TrainingRecord(**saved))
        problem = field_problem(record) or _data_source_problem(record.data_source)
        if problem is None and (record.n_train is None) != (record.n_test is None):
            problem = "n_train and n_test must both be image counts, or both none (format 1)"
        if problem:
            raise ValueError(f"training.{problem}")
        return record
    args = raw.get("args")
    if not isinstance(args, dict) or not all(k in args for k in ("seed", "batch_size", "lr", "kld_weight")):
        return None  # a weights-only format-1 file
    # Format 1 kept these among its flags; binarize was added later, so may be absent.
    return TrainingRecord(dataset, seed=int(args["seed"]), batch_size=int(args["batch_size"]),
                          lr=float(args["lr"]), kld_weight=float(args["kld_weight"]),
                          binarize=bool(args.get("binarize", False)))


def _data_source_problem(source):
    if source is None:
        return None
    for key, kinds in DATA_SOURCE_TYPES.items():
        if key not in source:
            return f"data_source lacks {key}"
        problem = value_problem(source[key], kinds)
        if problem:
            return f"data_source.{key} {problem}"
    return None


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rng_state(value):
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


# What --resume needs of each progress entry, and the words that say it.
PROGRESS_RULES = {
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list), "Adam's state_dict (state, param_groups)"),
    "epoch": (_is_count, "a whole number >= 0"),
    "step": (_is_count, "a whole number >= 0"),
    "history": (lambda v: isinstance(v, list) and all(
        isinstance(row, dict) and row.keys() == v[0].keys()
        and all(value_problem(x, (float,)) is None for x in row.values()) for row in v),
        "a list of one dict of finite figures per epoch, all with the same keys"),
    "partial": (lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("sums"), torch.Tensor)
                                        and v["sums"].shape == (3,) and v["sums"].is_floating_point()
                                        and value_problem(v.get("seconds"), (float,)) is None),
                "none, or a dict of 3 running sums and seconds"),
    "rng": (lambda v: isinstance(v, dict) and all(_is_rng_state(v.get(k))
                                                  for k in ("shuffle_at_epoch_start", "noise")),
            "a dict of two generator states (uint8 tensors): shuffle_at_epoch_start and noise"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "none, or the GradScaler's state_dict"),
}


def _check_progress_entry(path, progress, key):
    is_valid, words = PROGRESS_RULES[key]
    if not is_valid(progress[key]):
        raise UserError(f"{path} holds a malformed training state: {key} must be {words}, "
                        f"not {type(progress[key]).__name__}", remedy=("weights_only", {}))


def resume_state(ckpt):
    """The TrainingState --resume continues from, or a UserError naming the file and what is
    missing or malformed (a weights-only file can still be sampled from)."""
    missing = [key for key in PROGRESS_KEYS if key not in ckpt.progress]
    rng = ckpt.progress.get("rng")
    missing += [f"rng.{key}" for key in ("shuffle_at_epoch_start", "noise")
                if not isinstance(rng, dict) or key not in rng]
    if ckpt.training is None:
        missing.append("training")
    if missing:
        raise UserError(f"{ckpt.path} holds weights but not the training state to resume "
                        f"(missing {', '.join(missing)})", remedy=("weights_only", {}))
    for key in PROGRESS_RULES:
        if key in ckpt.progress:
            _check_progress_entry(ckpt.path, ckpt.progress, key)
    entries = ckpt.progress
    return TrainingState(entries["optimizer"], entries["epoch"], entries["step"], list(entries["history"]),
                         entries["partial"], entries["rng"]["shuffle_at_epoch_start"], entries["rng"]["noise"],
                         entries.get("scaler"))
