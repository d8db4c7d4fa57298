"""What a run can be asked for, and every default, in plain Python: the dataset names, the decoder
likelihoods and precisions, the network's configuration (VAEConfig) and training's (TrainSettings).

Imports no torch and no dataset library, so the command line parses and checks its flags (and
answers --help) in a fraction of a second, before any heavy import; vae.py, training.py and
data.py take their choices and defaults from here, so each is written once."""

import os
from dataclasses import asdict, dataclass, field

DEFAULT_DATASET = "mnist"  # what --dataset means when it is not given
DATASETS = ("mnist", "cifar10", "fashionmnist", "chestmnist", "octmnist", "tissuemnist",
            "pneumoniamnist", "svhn")
ARRAY_EXTENSIONS = (".npy", ".npz")
RECON_LOSSES = ("bernoulli", "gaussian", "mse")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRIORS = ("standard", "gmm", "two_stage")  # where z comes from when sampling (priors.py)
# Which fitted prior --sample and --eval use when --prior is not given: the first of these that
# the checkpoint holds, best measured first (FID-10k, docs/RESULTS.md); standard always exists.
PRIOR_PREFERENCE = ("gmm", "two_stage", "standard")
GMM_COMPONENTS = 30  # --prior_components: measured better than Ghosh et al.'s 10 (docs/RESULTS.md)
# --prior_codes: the mixture is fitted to this many of the training codes, drawn at random (EM's
# time grows with their number; docs/RESULTS.md measures what fewer cost in FID).
GMM_CODES = 10_000
LR_SCHEDULES = ("constant", "cosine")  # Adam's learning rate over the run (schedules.py)
DEFAULT_HIDDEN_DIMS = (32, 64, 128, 256, 512)


def is_path_dataset(text):
    """True when a dataset argument names a path (a folder or an array file) rather than one
    of DATASETS: it holds a path separator, ends in .npy/.npz, or exists on disk."""
    text = os.fspath(text)
    separators = [s for s in (os.sep, os.altsep) if s]
    return (any(s in text for s in separators) or text.lower().endswith(ARRAY_EXTENSIONS)
            or os.path.exists(text))


@dataclass
class VAEConfig:
    """Everything needed to rebuild the network; stored inside every checkpoint."""
    dataset: str
    image_shape: tuple  # (channels, height, width)
    latent_dim: int = 128
    hidden_dims: tuple = DEFAULT_HIDDEN_DIMS
    recon_loss: str = "gaussian"  # the best samples measured (docs/RESULTS.md)

    def __post_init__(self):
        self.image_shape = tuple(int(v) for v in self.image_shape)
        self.hidden_dims = tuple(int(v) for v in self.hidden_dims)

    def as_dict(self):
        d = asdict(self)
        d["image_shape"], d["hidden_dims"] = list(self.image_shape), list(self.hidden_dims)
        return d


@dataclass(frozen=True)
class TrainSettings:
    """How to train (training.train). The command line's defaults are these."""
    n_epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    kld_weight: float = 1.0
    lr_schedule: str = "constant"  # LR_SCHEDULES
    kl_warmup_epochs: int = 0  # epochs over which the KL weight rises from 0 to kld_weight
    sample_and_save_frequency: int = 5
    num_samples: int = 16
    seed: int = 0
    checkpoint_path: str = "models/VanillaVAE/VanillaVAE_mnist.pt"
    run_dir: str = "runs/VanillaVAE_mnist"
    flags: dict = field(default_factory=dict)  # the command line, saved as a record only
    progress: bool = True  # progress lines or bar (rank 0 only)
    progress_seconds: float = 30.0  # between progress lines when the output is not a terminal
    tensorboard: bool = False  # event files in run_dir too (board.py)
    precision: str = "auto"  # autocast dtype for convolutions and matrix products: PRECISIONS
    channels_last: bool = True  # NHWC activations and weights (oneDNN's preferred layout)
    compile: bool = False  # torch.compile the training forward (training.prepare_model)
    binarize: bool = False  # a fresh binarisation of every batch (dynamic binarisation)
    data_source: dict | None = None  # the user's own images: data.load_splits' source
    n_train: int | None = None  # images in the splits, recorded so --resume can check them
    n_test: int | None = None
