"""What a run can be asked for, and every default, in plain Python: the dataset names, the decoder
likelihoods and precisions, and the one declaration of a run, in three parts:
  VAEConfig       the network (recorded in the checkpoint: rebuilds it)
  TrainingRecord  the training recipe and data (recorded: --resume takes it back, --eval reads it)
  RunChoices      what one --train invocation chooses (not recorded: the resume command repeats it)
A field declared with flag() is also the command-line flag --<field name>: VanVAE.py builds its
parser from these fields, the checkpoint stores the first two as they are, --resume checks given
flags against them, and the resume command repeats the third. Adding a recorded training flag
means one field here and the code that uses its value.

Imports no torch and no dataset library, so the command line parses and checks its flags (and
answers --help) in a fraction of a second, before any heavy import; vae.py, training.py and
data.py take their choices and defaults from here, so each is written once."""

import argparse
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace

DEFAULT_DATASET = "mnist"  # what --dataset means when it is not given
DATASETS = ("mnist", "cifar10", "fashionmnist", "chestmnist", "octmnist", "tissuemnist",
            "pneumoniamnist", "svhn")
ARRAY_EXTENSIONS = (".npy", ".npz")
RECON_LOSSES = ("bernoulli", "gaussian", "mse")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FID_PRECISIONS = ("fp32", "bf16")  # --fid_precision: the Inception network's arithmetic (fid.py)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRIORS = ("standard", "gmm", "two_stage", "flow", "riemannian")  # where z comes from (priors.py)
# Which fitted prior --sample and --eval use when --prior is not given: the first of these that
# the checkpoint holds, best measured first (FID-10k, docs/RESULTS.md); standard always exists.
# The order depends on how long the weights trained (prior_order). riemannian beat gmm after
# 100 epochs (the length --train runs by default) on both seeds measured: 27.64 against 28.80 on
# seed 0 (bf16 Inception), 29.36 against 30.27 on seed 1 (fp32). gmm beat it after 10 epochs (the
# README's first command) on both: 45.97 against 48.90 on seed 0 (bf16), 52.35 against 58.40 on
# seed 1 (fp32), and after 30 on seed 1: 36.19 against 37.73 (fp32). The gap closes with training
# (6.05, 1.54, -0.91 on seed 1); between 30 and 100 epochs it was not measured, so the Riemannian
# sampler comes first from 100 epochs, the shortest run where it was measured better.
PRIOR_PREFERENCE = ("riemannian", "gmm", "flow", "two_stage", "standard")
SHORT_RUN_PRIOR_PREFERENCE = ("gmm", "riemannian", "flow", "two_stage", "standard")
SHORT_RUN_EPOCHS = 100  # weights trained fewer epochs than this use SHORT_RUN_PRIOR_PREFERENCE


def prior_order(epochs_trained):
    """Every prior's name, best measured first for weights trained `epochs_trained` epochs
    (None, a weights-only file's unknown, counts as the default run's length): after a short
    run the gmm, after a long one the Riemannian sampler (PRIOR_PREFERENCE)."""
    short = epochs_trained is not None and epochs_trained < SHORT_RUN_EPOCHS
    return SHORT_RUN_PRIOR_PREFERENCE if short else PRIOR_PREFERENCE


def best_prior(fitted, epochs_trained):
    """Of the fitted prior names (N(0, I) always counts as held), the best measured for weights
    trained `epochs_trained` epochs (prior_order): what --sample, --eval, the last training
    grid and api's sample() use when no prior is named."""
    return next(name for name in prior_order(epochs_trained) if name == "standard" or name in fitted)


# What --train fits after its last epoch (fitting.PriorsAfterTraining), in this order: both cost
# little (4.2 s and 38.8 s on a 2-core AVX2-only EPYC, docs/RESULTS.md).
TRAIN_PRIORS = ("riemannian", "gmm")
# --prior_components and --prior_codes: 400 components fitted to 20,000 of the training codes, drawn
# at random: FID-10k 29.25 over two seeds on Fashion-MNIST after 100 epochs, against 29.69 for 200
# components, 30.48 for 100 and 31.84 for 30 on 10,000; 45.97 against 46.38 for 200 after 10 epochs
# (bf16 Inception); a fit of 27-53 s on 2 cores (docs/RESULTS.md). Fewer codes get one component
# per GMM_CODES_PER_COMPONENT: with fewer per component, samples start to repeat the codes.
GMM_COMPONENTS = 400
GMM_CODES = 20_000
GMM_CODES_PER_COMPONENT = GMM_CODES // GMM_COMPONENTS  # 50
ARCHITECTURES = ("plain", "resnet")  # --architecture: the network's blocks (vae.py)
# The sample grids --train saves before its last epoch come from a mixture of WATCH_COMPONENTS
# fitted to WATCH_CODES training codes at each save (about a second on 2 CPU cores), so a user
# watching sees samples near what --sample will give, not N(0, I)'s (docs/RESULTS.md); the last
# grid comes from the prior --sample uses.
WATCH_COMPONENTS = 10
WATCH_CODES = 5000
LR_SCHEDULES = ("constant", "cosine")  # Adam's learning rate over the run (schedules.py)
DEFAULT_HIDDEN_DIMS = (32, 64, 128, 256, 512)
TEST_FRACTION = 0.05  # --test_fraction: the share of the user's own images held out for test
# torch's generators take seeds below 2^64; the run derives seed + 1 and seed + 2 from it.
MAX_SEED = 2**63 - 1


def is_path_dataset(text):
    """True when a dataset argument names a path (a folder or an array file) rather than one
    of DATASETS: it holds a path separator, ends in .npy/.npz, or exists on disk."""
    text = os.fspath(text)
    separators = [s for s in (os.sep, os.altsep) if s]
    return (any(s in text for s in separators) or text.lower().endswith(ARRAY_EXTENSIONS)
            or os.path.exists(text))


# ---------------------------------------------------------------- flag value parsers (argparse types)

def number_type(kind, minimum, rule, minimum_allowed=True, maximum=None):
    """An argparse type: a finite int or float no smaller than `minimum` (or above it), and no
    larger than `maximum` if given."""
    noun = "whole number" if kind is int else "number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if (not math.isfinite(value) or value < minimum or (value == minimum and not minimum_allowed)
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    return parse


def dataset_type(text):
    """A named dataset, or the path of the user's images (a folder or a .npy/.npz file)."""
    if text in DATASETS or is_path_dataset(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a dataset ({', '.join(DATASETS)}) "
                                     "nor an existing folder or .npy/.npz file")


def fraction_type(text):
    value = number_type(float, 0, "zero or more")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, not {text}")
    return value


positive_int = number_type(int, 1, "at least 1")
nonnegative_int = number_type(int, 0, "zero or more")
positive_float = number_type(float, 0, "a positive number", minimum_allowed=False)
nonnegative_float = number_type(float, 0, "zero or a positive number")
seed_type = number_type(int, 0, f"a whole number from 0 to {MAX_SEED}", maximum=MAX_SEED)
# Channels and latent dimensions: far beyond any VAE this tool trains, and within what a tensor's
# size can hold (a checkpoint saying 2**70 overflowed torch's size arguments).
MAX_WIDTH = 2**16
width_type = number_type(int, 1, f"a whole number from 1 to {MAX_WIDTH}", maximum=MAX_WIDTH)


# ---------------------------------------------------------------- the declaration of a run

_SAME = object()


def flag(default, help, *, flag_default=_SAME, aliases=(), added_later=False, **argparse_options):
    """A dataclass field that is also the flag --<its name>: `help` is its --help text (argparse's
    %(default)s works), `argparse_options` go to add_argument (type, choices, action, nargs),
    `flag_default`, if given, is the flag's default where it differs from the field's (None
    meaning "work it out", as --hidden_dims does), and `aliases` are other spellings.
    added_later: a recorded field that files written before it lack; they read back its default,
    which must be what those runs did."""
    meta = {"help": help, "argparse": argparse_options, "aliases": tuple(aliases), "added_later": added_later}
    if flag_default is not _SAME:
        meta["flag_default"] = flag_default
    return field(default=default, metadata=meta)


def flag_fields(cls):
    """The fields of a declaration that are command-line flags, in declaration order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_names(cls):
    return tuple(f.name for f in flag_fields(cls))


def flag_default(f):
    """What the flag of field `f` is when not given."""
    return f.metadata.get("flag_default", f.default)


def from_flags(cls, values, **others):
    """An instance of declaration `cls` with its flag fields from `values` (a mapping of flag
    names to parsed values, such as vars() of argparse's result) and the rest from `others`."""
    return cls(**{name: values[name] for name in flag_names(cls)}, **others)


_TYPE_WORDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string",
               dict: "a dict", list: "a list", tuple: "a list", type(None): "none"}


def _has_type(value, kind):
    if kind is type(None):
        return value is None
    if kind is bool or isinstance(value, bool):  # bool is an int to Python, never to a record
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def value_problem(value, kinds, parse=None, choices=None):
    """What is wrong with `value` for a field of types `kinds` (a tuple), whose flag parses its
    text with `parse` and takes `choices`: words such as "must be a whole number, not 'x'", or
    None when nothing is."""
    if not any(_has_type(value, kind) for kind in kinds):
        return (f"must be {' or '.join(_TYPE_WORDS.get(kind, kind.__name__) for kind in kinds)}, "
                f"not {type(value).__name__} {str(value)[:40]!r}")
    if value is None or isinstance(value, bool):
        return None
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, not {value!r}"
    if parse is not None and not isinstance(value, (list, tuple, dict)):
        try:
            parse(str(value))
        except argparse.ArgumentTypeError as e:
            return str(e)
    return None


def field_problem(instance):
    """'<field> <what is wrong>' for the first field of a declaration instance (read back from
    a file) whose value has not its declared type, or lies outside its flag's domain; else None."""
    for f in fields(instance):
        kinds = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        options = f.metadata.get("argparse", {})
        parse = options.get("type")
        value = getattr(instance, f.name)
        if isinstance(value, (list, tuple)) and options.get("nargs") == "+":  # --hidden_dims
            problems = [value_problem(v, (int,), parse) for v in value] or ["must not be empty"]
            problem = next((p for p in problems if p), None)
        else:
            problem = value_problem(value, kinds, parse, options.get("choices"))
        if problem:
            return f"{f.name} {problem}"
    return None


def with_floats(instance):
    """A frozen declaration instance whose float fields holding whole numbers (a file may say
    1 for 1.0) hold floats, as every computation with them expects (2**70 as an int overflows)."""
    ints = {f.name: float(getattr(instance, f.name)) for f in fields(instance)
            if f.type is float and isinstance(getattr(instance, f.name), int)
            and not isinstance(getattr(instance, f.name), bool)}
    return replace(instance, **ints) if ints else instance


@dataclass
class VAEConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""
    dataset: str
    image_shape: tuple  # (channels, height, width)
    latent_dim: int = flag(128, "latent dimensions (default: %(default)s)", type=width_type)
    hidden_dims: tuple = flag(
        DEFAULT_HIDDEN_DIMS, "channels of each stride-2 conv layer (default: none given, meaning "
        f"{' '.join(map(str, DEFAULT_HIDDEN_DIMS))})", flag_default=None, type=width_type, nargs="+")
    recon_loss: str = flag(
        "gaussian", "decoder likelihood: gaussian (a density of dequantised 8-bit pixels whose "
        "variance is calibrated to each batch's squared error, the sigma-VAE; the best samples "
        "measured, docs/RESULTS.md), bernoulli (BCE on [0,1] intensities) or mse (GenerativeZoo's "
        "per-pixel mean squared error) (default: %(default)s)", choices=RECON_LOSSES)
    architecture: str = flag(
        "plain", "the network's blocks: plain (the seed's stride-2 conv + BatchNorm + LeakyReLU blocks) "
        "or resnet (the same, with a residual block of two 3x3 convolutions after each of the "
        "decoder's upsampling blocks below full size; --hidden_dims keeps its meaning) "
        "(default: %(default)s)", choices=ARCHITECTURES, added_later=True)

    def __post_init__(self):
        self.image_shape = tuple(int(v) for v in self.image_shape)
        self.hidden_dims = tuple(int(v) for v in self.hidden_dims)

    def as_dict(self):
        d = asdict(self)
        d["image_shape"], d["hidden_dims"] = list(self.image_shape), list(self.hidden_dims)
        return d


@dataclass(frozen=True)
class TrainingRecord:
    """How the weights were trained: what --resume continues with and --eval must know; stored
    in every checkpoint as a dict (checkpoint.py).

    dataset     the dataset's name (also in config, which rebuilds the network)
    data_source None for a named dataset; for the user's own images, data.load_splits' source:
                their path, fingerprint, image counts and shape, and the options they were read
                with, so --eval reads the same held-out split and --resume notices a change
    n_train     training images (None in format 1), so --resume refuses other data
    n_test      test images (None in format 1)
    The flag fields' meaning is their help; one marked added_later may be missing from older
    files (lr_schedule and kl_warmup_epochs: those runs had a constant rate and no warm-up)."""
    dataset: str
    seed: int = flag(0, "random seed for weights, shuffling and sampling (default: none, meaning a "
                     "fresh one, printed and saved so the run can be repeated)", flag_default=None,
                     type=seed_type)
    batch_size: int = flag(128, "images per step; under torchrun the global batch, split evenly over "
                           "the processes, so it must be a multiple of their number (default: "
                           "%(default)s)", type=positive_int)
    lr: float = flag(2e-4, "Adam learning rate (default: %(default)s)", type=positive_float)
    kld_weight: float = flag(1.0, "weight of the KL term; 1 gives the true ELBO (default: %(default)s; "
                             "GenerativeZoo uses 0.0001 with --recon_loss mse)", type=nonnegative_float)
    binarize: bool = flag(False, "with --train and --recon_loss bernoulli: train on a fresh "
                          "binarisation of every batch (pixel = 1 with probability its intensity) and "
                          "evaluate on a fixed binarisation of the test set, so nats compare with "
                          "binarised-MNIST results; --eval reads it from the checkpoint",
                          action="store_true")
    data_source: dict | None = None
    n_train: int | None = None
    n_test: int | None = None
    lr_schedule: str = flag("constant", "Adam's learning rate over the run: constant (--lr throughout) "
                            "or cosine (from --lr down to 0 over the --n_epochs of this invocation, "
                            "set every step from the step number: a run resumed with a larger "
                            "--n_epochs takes the longer curve's value at the step it reached, so the "
                            "rate rises) (default: %(default)s)", choices=LR_SCHEDULES, added_later=True)
    kl_warmup_epochs: int = flag(0, "raise the KL term's weight in the training objective linearly "
                                 "from 0 to --kld_weight over this many epochs, every step; the -ELBO "
                                 "printed and saved stays the true one, only the objective (loss) is "
                                 "warmed (default: %(default)s, no warm-up)", type=nonnegative_int,
                                 added_later=True)


@dataclass(frozen=True)
class RunChoices:
    """What one invocation chooses: how long, where, how to compute and report. Not recorded as
    facts of the weights; a stopped run's resume command repeats those not at their default."""
    n_epochs: int = flag(100, "epochs to train (default: %(default)s)", type=positive_int)
    sample_and_save_frequency: int = flag(
        5, "save checkpoint, samples and reconstructions every this many epochs, and after the last "
        "(default: %(default)s)", aliases=("--sample_and_save_freq",), type=positive_int)
    num_samples: int = flag(16, "images drawn from the prior per sample grid or --sample run "
                            "(default: %(default)s)", type=positive_int)
    data_dir: str = flag("./data", "where datasets are found or downloaded (default: ./data)")
    output_dir: str = flag(".", "where models/ and runs/ are written (default: . the working directory)")
    device: str = flag("auto", "where to compute (default: auto, meaning cuda, then mps, then cpu); "
                       "under torchrun each process uses cuda:LOCAL_RANK, or the cpu", choices=DEVICES)
    image_size: int | None = flag(
        None, "MedMNIST image size: 28, 64, 128 or 224; for your own images, N brings every image to "
        "N x N (shorter side resized with antialiasing, then a centre crop) (default: none, meaning "
        "the dataset's native size: 28 for MNIST, Fashion-MNIST and MedMNIST, 32 for CIFAR-10 and "
        "SVHN; your own images must then share one size)", type=positive_int)
    threads: int | None = flag(None, "CPU threads for PyTorch (default: none, meaning one per CPU this "
                               "process may run on)", type=positive_int)
    precision: str = flag(
        "auto", "autocast dtype of convolutions and matrix products while training: bf16 (CPUs with "
        "AVX512-BF16/AMX, CUDA), fp16 (CUDA only, with loss scaling), fp32; weights, loss and Adam "
        "stay fp32 (default: auto, meaning bf16 where the hardware has it natively, else fp32; see "
        "docs/BENCHMARKS.md)", choices=PRECISIONS)
    channels_last: bool = flag(True, "NHWC memory layout, faster with oneDNN and cuDNN (default: "
                               "%(default)s)", action=argparse.BooleanOptionalAction)
    compile: bool = flag(False, "torch.compile the training step's forward: a few %% faster per step, "
                         "15-25 s to compile the first time on a machine, cached after (default: "
                         "%(default)s)", action=argparse.BooleanOptionalAction)
    strict: bool = flag(False, "with --dataset PATH: stop at an unreadable image instead of skipping "
                        "it with a warning", action="store_true")
    tensorboard: bool = flag(False, "with --train: also write TensorBoard event files to the run folder "
                             "(the running loss, every history.csv figure, the learning rate, images/s, "
                             "and the pictures of each save); view with: tensorboard --logdir runs",
                             action="store_true")
    progress_seconds: float = flag(30.0, "when the output is not a terminal (a log file, a batch job): "
                                   "seconds between progress lines; on a terminal a progress bar is "
                                   "shown instead (default: %(default)s)", type=nonnegative_float)
    prior_components: int | None = flag(
        None, f"Gaussian components of the gmm prior (default: none, meaning {GMM_COMPONENTS}, or one per "
        f"{GMM_CODES_PER_COMPONENT} codes it is fitted to where they are fewer than {GMM_CODES:,}; "
        f"{GMM_COMPONENTS} measured better than 200, 100, 30 and Ghosh et al.'s 10 on Fashion-MNIST; "
        "docs/RESULTS.md)", type=positive_int)
    prior_codes: int = flag(GMM_CODES, "fit the gmm prior to this many training codes, drawn at random; "
                            "0 means all of them (default: %(default)s: EM's time grows with the "
                            "count; docs/RESULTS.md measures what fewer cost)", type=nonnegative_int)


@dataclass(frozen=True)
class TrainSettings:
    """What training.train is given: the record it trains by (and saves), this invocation's
    choices, and where its files go. progress: whether this process reports (rank 0 only)."""
    record: TrainingRecord = field(default_factory=lambda: TrainingRecord("mnist", seed=0))
    run: RunChoices = field(default_factory=RunChoices)
    checkpoint_path: str = "models/VanillaVAE/VanillaVAE_mnist.pt"
    run_dir: str = "runs/VanillaVAE_mnist"
    flags: dict = field(default_factory=dict)  # the command line, saved as a record only
    progress: bool = True
