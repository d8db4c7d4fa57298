"""VanVAE command line: train a Vanilla VAE on an image dataset, or sample from a trained one.

    python VanVAE.py --train --dataset fashionmnist
    python VanVAE.py --sample --checkpoint models/VanillaVAE/VanillaVAE_fashionmnist.pt
    torchrun --nproc_per_node=4 VanVAE.py --train --dataset fashionmnist   (docs/DISTRIBUTED.md)
    python VanVAE.py --eval --dataset fashionmnist
    python VanVAE.py --outlier_detection --dataset fashionmnist --out_dataset mnist
"""

import argparse
import contextlib
import math
import os
import random
import shlex
import signal
import sys

import settings
from settings import DATASETS, TrainSettings, UserError, VAEConfig

# Imported by import_the_work() once the flags are checked: torch, torchvision and medmnist take
# seconds to import, and --help or a bad flag should answer at once.
checkpoint = data = distributed = training = util = vae = None


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit status 2, like every other user error.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number_type(kind, minimum, rule, minimum_allowed=True):
    """An argparse type: a finite int or float no smaller than `minimum` (or above it)."""
    noun = "whole number" if kind is int else "number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not minimum_allowed):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    return parse


def dataset_type(text):
    """A named dataset, or the path of the user's images (a folder or a .npy/.npz file)."""
    if text in DATASETS or settings.is_path_dataset(text):
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


def build_parser():
    p = Parser(prog="VanVAE.py", allow_abbrev=False, description="Train a Vanilla VAE on an image dataset, or sample "
               "new images from a trained one. Every figure printed is per image, with its unit.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train a model (and save checkpoints, "
                      "samples and reconstructions every --sample_and_save_frequency epochs)")
    mode.add_argument("--sample", action="store_true", help="draw --num_samples images from the "
                      "prior of a trained model; needs only --checkpoint")
    mode.add_argument("--eval", action="store_true", help="evaluate a trained model on its test "
                      "split: -ELBO, importance-weighted log-likelihood bound, reconstruction error, "
                      "active units, FID; a table, eval.json and pictures in the run folder")
    mode.add_argument("--outlier_detection", action="store_true", help="score the model's test split "
                      "and --out_dataset's test split by -ELBO and the importance-weighted bound; "
                      "report AUROC and FPR at 95%% TPR")
    p.add_argument("--dataset", type=dataset_type, default=None, metavar="NAME|PATH",
                   help=f"dataset to train on: one of {', '.join(DATASETS)}, or your own images: "
                        "a folder of image files (any depth; train/ and test/ subfolders are the "
                        "splits) or a .npy/.npz array file of uint8 images (default: mnist)")
    p.add_argument("--batch_size", type=positive_int, default=TrainSettings.batch_size,
                   help="images per step; under torchrun the global batch, split evenly over the "
                        "processes, so it must be a multiple of their number (default: %(default)s)")
    p.add_argument("--n_epochs", type=positive_int, default=TrainSettings.n_epochs,
                   help="epochs to train (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=TrainSettings.lr,
                   help="Adam learning rate (default: %(default)s)")
    p.add_argument("--latent_dim", type=positive_int, default=VAEConfig.latent_dim,
                   help="latent dimensions (default: %(default)s)")
    p.add_argument("--hidden_dims", type=positive_int, nargs="+", default=None,
                   help="channels of each stride-2 conv layer (default: none given, meaning "
                        f"{' '.join(map(str, settings.DEFAULT_HIDDEN_DIMS))})")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path to save to (--train) or load (--sample) "
                        "(default: none, meaning <output_dir>/models/VanillaVAE/VanillaVAE_<dataset>.pt)")
    p.add_argument("--num_samples", type=positive_int, default=TrainSettings.num_samples,
                   help="images drawn from the prior per sample grid or --sample run (default: %(default)s)")
    p.add_argument("--sample_and_save_frequency", "--sample_and_save_freq", type=positive_int,
                   default=TrainSettings.sample_and_save_frequency,
                   dest="sample_and_save_frequency",
                   help="save checkpoint, samples and reconstructions every this many epochs, and "
                        "after the last (default: %(default)s)")
    p.add_argument("--data_dir", default="./data", help="where datasets are found or downloaded (default: ./data)")
    p.add_argument("--output_dir", default=".",
                   help="where models/ and runs/ are written (default: . the working directory)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for weights, shuffling and sampling (default: none, meaning a "
                        "fresh one, printed and saved so the run can be repeated)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to compute (default: auto, meaning cuda, then mps, then cpu); under "
                        "torchrun each process uses cuda:LOCAL_RANK, or the cpu")
    p.add_argument("--recon_loss", choices=settings.RECON_LOSSES, default=VAEConfig.recon_loss,
                   help="decoder likelihood: bernoulli (BCE on [0,1] intensities), gaussian "
                        "(learned scale, dequantised 8-bit density) or mse (GenerativeZoo's per-pixel "
                        "mean squared error) (default: %(default)s)")
    p.add_argument("--kld_weight", type=nonnegative_float, default=TrainSettings.kld_weight,
                   help="weight of the KL term; 1 gives the true ELBO (default: %(default)s; GenerativeZoo "
                        "uses 0.0001 with --recon_loss mse)")
    p.add_argument("--image_size", type=positive_int, default=None,
                   help="MedMNIST image size: 28, 64, 128 or 224; for your own images, N brings "
                        "every image to N x N (shorter side resized with antialiasing, then a "
                        "centre crop) (default: none, meaning the dataset's native size: 28 for "
                        "MNIST, Fashion-MNIST and MedMNIST, 32 for CIFAR-10 and SVHN; your own "
                        "images must then share one size)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="with --dataset PATH: grey (1) or RGB (3); alpha is composited on white "
                        "(default: none, meaning 1 when every image is grey, else 3)")
    p.add_argument("--test_fraction", type=fraction_type, default=0.05,
                   help="with --dataset PATH and no train/ and test/ subfolders (or .npz "
                        "train/test arrays): the share held out for test, chosen by a hash of "
                        "each file's path (or array index), so adding images moves no old one "
                        "(default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="with --dataset PATH: stop at an unreadable image instead of skipping it "
                        "with a warning")
    p.add_argument("--precision", choices=settings.PRECISIONS, default=TrainSettings.precision,
                   help="autocast dtype of convolutions and matrix products while training: bf16 "
                        "(CPUs with AVX512-BF16/AMX, CUDA), fp16 (CUDA only, with loss scaling), "
                        "fp32; weights, loss and Adam stay fp32 (default: auto, meaning bf16 where "
                        "the hardware has it natively, else fp32; see docs/BENCHMARKS.md)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction,
                   default=TrainSettings.channels_last,
                   help="NHWC memory layout, faster with oneDNN and cuDNN (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=TrainSettings.compile,
                   help="torch.compile the encoder and decoder; pays back only on long runs "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for PyTorch (default: none, meaning one per CPU this process "
                        "may run on)")
    p.add_argument("--binarize", action="store_true",
                   help="with --train and --recon_loss bernoulli: train on a fresh binarisation of "
                        "every batch (pixel = 1 with probability its intensity) and evaluate on a "
                        "fixed binarisation of the test set, so nats compare with binarised-MNIST "
                        "results; --eval reads it from the checkpoint")
    p.add_argument("--iw_samples", type=positive_int, default=100,
                   help="importance samples K per image for the log-likelihood bound of --eval and "
                        "--outlier_detection (default: 100; Burda et al. report K=5000)")
    p.add_argument("--fid_samples", type=nonnegative_int, default=10000,
                   help="prior samples for --eval's FID against the test split; 0 skips FID "
                        "(default: 10000; about 2 minutes per 1000 images on 2 CPU cores)")
    p.add_argument("--eval_images", type=positive_int, default=None,
                   help="with --eval/--outlier_detection: use only the first this many images of each "
                        "test split (default: none, meaning all of them)")
    p.add_argument("--out_dataset", type=dataset_type, default=None, metavar="NAME|PATH",
                   help="with --outlier_detection: the dataset whose test images are the outliers; "
                        "brought to the model's channels and size by channel mean or repetition and "
                        "bilinear resizing")
    p.add_argument("--resume", action="store_true",
                   help="with --train: continue from --checkpoint (or the default one) where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="with --train: replace an existing checkpoint instead of refusing to start")
    return p


def pick_device(name):
    import torch
    under_torchrun = distributed.launched_world_size() > 1
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available() and not under_torchrun:
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple MPS device is available here (try --device cpu)")
    if name == "mps" and under_torchrun:
        raise UserError("--device mps cannot train under torchrun: neither gloo nor NCCL exchanges "
                        "MPS tensors (use --device cpu, or one process)")
    if name == "cuda" and under_torchrun:
        local_rank, n_gpus = distributed.launched_local_rank(), torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise UserError(f"torchrun started process {local_rank} on this machine, which has "
                            f"{n_gpus} CUDA device(s): give --nproc_per_node at most {n_gpus}")
        return torch.device("cuda", local_rank)  # one GPU per process
    return torch.device(name)


def set_threads(threads):
    """One intra-op thread per usable CPU: more oversubscribes the cores, fewer leaves them idle."""
    import torch
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Processes that torchrun starts on one machine share its CPUs.
    usable = (usable or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, usable))
    return torch.get_num_threads()


def check_creatable(folder):
    """Raise UserError unless `folder` exists and is writable, or can be created; creates nothing."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot create output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise UserError(f"output folder {existing} is not writable" if existing == os.path.abspath(folder)
                        else f"cannot create output folder {folder}: {existing} is not writable")


@contextlib.contextmanager
def folder_for(path):
    """Create the folder of file `path` for the block, and remove what it created if the block
    fails before putting anything there: a failed run leaves no empty folders behind."""
    folder = os.path.dirname(os.path.abspath(path))
    check_creatable(folder)
    created = []
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    for new in reversed(created):
        os.mkdir(new)
    try:
        yield
    except BaseException:
        for new in created:
            try:
                os.rmdir(new)  # only if empty
            except OSError:
                break
        raise


def run_train(args):
    distributed.check_batch_splits(args.batch_size, distributed.launched_world_size())
    device = pick_device(args.device)
    training.check_precision(args.precision, device)
    with distributed.process_group(device), distributed.stdout_on_main_only():
        train_in_process_group(args, device)


# Flags --resume takes from the checkpoint: given with another value, they are refused.
RECORDED_FLAGS = ("batch_size", "lr", "kld_weight", "seed", "binarize")
CONFIG_FLAGS = ("latent_dim", "hidden_dims", "recon_loss")


def load_resume(args, path):
    """The checkpoint --resume continues, checked against the flags."""
    ckpt = checkpoint.load(path, data.dataset_name(args.dataset) if args.dataset else None)
    dataset = ckpt.model.config.dataset
    if data.is_named(dataset):
        image_size = args.image_size
        if image_size is None and dataset in data.MEDMNIST_CLASSES:
            image_size = ckpt.model.config.image_shape[-1]  # a 64 px run resumes without --image_size
        checkpoint.check_matches(ckpt, image_shape=data.image_shape(dataset, image_size))
    checkpoint.check_resumable(ckpt)
    check_no_contradiction(args, ckpt)
    done, step = ckpt.progress["epoch"], ckpt.progress["step"]
    if done >= args.n_epochs and step == 0:
        raise UserError(f"{path} has finished {done} epoch{'s' if done != 1 else ''}: nothing to "
                        f"resume; give --n_epochs above {done} to train it longer")
    return ckpt


def check_no_contradiction(args, ckpt):
    """A flag given with --resume must agree with the checkpoint, which decides."""
    config = ckpt.model.config
    recorded = {**{name: getattr(ckpt.training, name) for name in RECORDED_FLAGS},
                **{name: getattr(config, name) for name in CONFIG_FLAGS}}
    for name, value in recorded.items():
        given = getattr(args, name)
        if name in args.given and (tuple(given) if name == "hidden_dims" else given) != value:
            shown = " ".join(map(str, value)) if name == "hidden_dims" else value
            raise UserError(f"--{name} {' '.join(map(str, given)) if name == 'hidden_dims' else given} "
                            f"contradicts {ckpt.path}, trained with {shown}: a resumed run keeps its "
                            f"own (leave --{name} out, or start over with --overwrite)")


def own_images_options(args):
    return {"channels": args.channels, "test_fraction": args.test_fraction, "strict": args.strict}


def load_training_data(args, resume):
    """(train images, test images, data source) of the run's dataset: for --resume the one its
    checkpoint names, read with the options it was read with, and refused if it changed."""
    record = resume.training if resume is not None else None
    source = record.data_source if record is not None else None
    if source is None:
        dataset = resume.model.config.dataset if resume is not None else (args.dataset or "mnist")
        image_size = resume.model.config.image_shape[-1] if resume is not None else args.image_size
        options = own_images_options(args)
    else:  # the user's own images: where they were, unless --dataset says where they are now
        dataset, image_size = args.dataset or source["path"], source["image_size"]
        options = {**data.source_options(source), "strict": args.strict}
    train_images, test_images, _, loaded = distributed.first_on_each_machine(
        lambda: data.load_splits(dataset, args.data_dir, image_size, options))
    if source is not None and loaded["fingerprint"] != source["fingerprint"]:
        raise UserError(f"the images in {dataset} changed since this run started ({source['n_train']} "
                        f"train / {source['n_test']} test then, {loaded['n_train']} / {loaded['n_test']} "
                        "now, or files modified): train anew with --overwrite, or restore them")
    counts = (train_images.shape[0], test_images.shape[0])
    if record is not None and record.n_train is not None and (record.n_train, record.n_test) != counts:
        raise UserError(f"{resume.path} was trained on {record.n_train} train / {record.n_test} test "
                        f"images of {dataset}; {args.data_dir} holds {counts[0]} / {counts[1]}: "
                        "resume with the same data (--data_dir), or train anew")
    world = distributed.world_size()
    if counts[0] < 2 * world or counts[1] < 1:
        raise UserError(f"{dataset} gives {counts[0]} train and {counts[1]} test images; training "
                        f"needs at least {2 * world} and 1 (add images, or a test/ folder, or "
                        "change --test_fraction)")
    return train_images, test_images, loaded


def new_model(args, dataset, train_images, test_images, source):
    """A fresh model and its TrainingRecord from the flags."""
    config = vae.VAEConfig(dataset=dataset, image_shape=tuple(train_images.shape[1:]),
                           latent_dim=args.latent_dim,
                           hidden_dims=tuple(args.hidden_dims or vae.DEFAULT_HIDDEN_DIMS),
                           recon_loss=args.recon_loss)
    vae.check_config(config)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    seed = distributed.from_main(seed)  # every process must shuffle and draw noise alike
    util.seed_everything(seed)  # before the weights are drawn
    record = checkpoint.TrainingRecord(dataset, seed, args.batch_size, args.lr, args.kld_weight,
                                       args.binarize, source, int(train_images.shape[0]),
                                       int(test_images.shape[0]))
    return vae.VanillaVAE(config), record


def check_new_run(args, path):
    """Before any data is read: what a new run's flags alone can tell is wrong."""
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} already exists: add --resume to continue it, --overwrite to "
                        "start over, or --checkpoint to save elsewhere")
    if args.binarize and not vae.models_binary_pixels(args.recon_loss):
        raise UserError(f"--binarize needs --recon_loss bernoulli (binary pixels), not {args.recon_loss}")
    dataset = args.dataset or "mnist"
    if data.is_named(dataset):
        image_shape = data.image_shape(dataset, args.image_size)
        vae.check_config(vae.VAEConfig(dataset, image_shape, args.latent_dim,
                                       tuple(args.hidden_dims or vae.DEFAULT_HIDDEN_DIMS), args.recon_loss))


def train_in_process_group(args, device):
    threads = set_threads(args.threads)
    dataset = data.dataset_name(args.dataset or "mnist")
    path = args.checkpoint or checkpoint.default_path(args.output_dir, dataset)
    out_dir = checkpoint.run_dir(args.output_dir, path)
    check_creatable(out_dir)
    # Rank 0 owns the checkpoint for the whole run: a second run on it is refused at once.
    with folder_for(path), checkpoint.owned(path) if distributed.is_main() else contextlib.nullcontext():
        resume = load_resume(args, path) if args.resume else None
        if resume is None:
            check_new_run(args, path)
        if resume is not None:
            print(f"resuming {path} after epoch {resume.progress['epoch']}"
                  + (f", step {resume.progress['step']}" if resume.progress["step"] else ""), flush=True)
        train_images, test_images, source = load_training_data(args, resume)
        if resume is None:
            model, record = new_model(args, dataset, train_images, test_images, source)
        else:
            model, record = resume.model, resume.training
        train_with(args, device, threads, path, out_dir, model, record, train_images, test_images, resume)
    print(f"done: {path}")


def train_with(args, device, threads, path, out_dir, model, record, train_images, test_images, resume):
    if record.binarize:
        test_images = data.binarize_fixed(test_images)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    config = model.config
    print(f"{config.dataset}: {train_images.shape[0]} train / {test_images.shape[0]} test images of "
          f"{tuple(train_images.shape[1:])}; {n_params / 1e6:.2f} M parameters; {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, "
          f"{training.resolve_precision(args.precision, device)}; seed {record.seed}",
          flush=True)
    # The record of the flags holds the values the run really uses: a resumed run's come back
    # from its checkpoint, whatever the command line said.
    flags = {**{k: v for k, v in vars(args).items() if k != "given"},
             "dataset": args.dataset or config.dataset, "seed": record.seed, "checkpoint": path,
             "batch_size": record.batch_size, "lr": record.lr, "kld_weight": record.kld_weight,
             "binarize": record.binarize, "latent_dim": config.latent_dim,
             "hidden_dims": list(config.hidden_dims), "recon_loss": config.recon_loss}
    settings = TrainSettings(
        n_epochs=args.n_epochs, batch_size=record.batch_size, lr=record.lr,
        kld_weight=record.kld_weight, sample_and_save_frequency=args.sample_and_save_frequency,
        num_samples=args.num_samples, seed=record.seed, checkpoint_path=path, run_dir=out_dir,
        flags=flags, progress=sys.stderr.isatty() and distributed.is_main(),
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        binarize=record.binarize, data_source=record.data_source, n_train=record.n_train,
        n_test=record.n_test)
    training.train(model, train_images, test_images, settings, resume)


def run_sample(args):
    import torch

    import sampling
    if distributed.launched_world_size() > 1:
        raise UserError("--sample runs in one process: start it with python, not torchrun")
    path = checkpoint_for(args)
    model = checkpoint.load(path, args.dataset and data.dataset_name(args.dataset)).model
    device = pick_device(args.device)
    model.to(device)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    out_dir = checkpoint.run_dir(args.output_dir, path)
    check_creatable(out_dir)
    stem = os.path.join(out_dir, f"prior_samples_n{args.num_samples}_seed{seed}")
    generator = torch.Generator(device).manual_seed(seed)
    sampling.sample_to_files(model, args.num_samples, generator, stem + ".png", stem + ".pt")
    print(f"{args.num_samples} samples from {path} (seed {seed}):")
    print(f"  grid   {stem}.png")
    print(f"  tensor {stem}.pt (uint8, {args.num_samples} x {' x '.join(map(str, model.config.image_shape))})")


# Flags a resumed run does not take back from the checkpoint: where things are, how long to go on.
# (How it computes, too: --threads and --precision change the arithmetic, so an exact resume needs them.)
RESUME_FLAGS = ("n_epochs", "data_dir", "output_dir", "sample_and_save_frequency", "num_samples",
                "device", "image_size", "threads", "precision", "channels_last", "compile", "strict")


def resume_command(args, checkpoint_path, launcher="python"):
    """The command that continues a stopped run, repeating every such flag that was not left
    at its default (the hyper-parameters come back from the checkpoint itself)."""
    words = ["VanVAE.py", "--train", "--resume", *(["--dataset", args.dataset] if args.dataset else []),
             "--checkpoint", checkpoint_path]
    parser = build_parser()
    for name in RESUME_FLAGS:
        value = getattr(args, name)
        if value == parser.get_default(name):
            continue
        if isinstance(value, bool):  # a switch: --name, or --no-name for BooleanOptionalAction
            words.append(f"--{name}" if value else f"--no-{name}")
        else:
            words += [f"--{name}", str(value)]
    return f"{launcher} {shlex.join(words)}"


def checkpoint_for(args):
    """The --checkpoint path, or the default one of --dataset (mnist if none)."""
    return args.checkpoint or checkpoint.default_path(args.output_dir, data.dataset_name(args.dataset or "mnist"))


def load_for_eval(args):
    """The checkpoint (its model on its device) and where its reports go."""
    ckpt = checkpoint.load(checkpoint_for(args), args.dataset and data.dataset_name(args.dataset))
    ckpt.model.to(pick_device(args.device))
    out_dir = checkpoint.run_dir(args.output_dir, ckpt.path)
    check_creatable(out_dir)
    return ckpt, out_dir


def test_split_of(args, ckpt):
    """(dataset, data_dir, image_size, own-images options) of the checkpoint's test split: the
    named dataset at the model's own image size (a weights-only 64 px MedMNIST file has no
    flags to say it), or the user's images read as they were for training."""
    source = ckpt.training.data_source if ckpt.training is not None else None
    if source is None:
        return ckpt.model.config.dataset, args.data_dir, ckpt.model.config.image_shape[-1], None
    return args.dataset or source["path"], args.data_dir, source["image_size"], data.source_options(source)


def run_eval(args):
    import evaluation
    ckpt, out_dir = load_for_eval(args)
    dataset, data_dir, image_size, own_images = test_split_of(args, ckpt)
    raw_images, labels = data.load_test_images(dataset, data_dir, image_size, args.eval_images,
                                               own_images=own_images)
    images = data.binarize_fixed(raw_images) if ckpt.binarize else raw_images
    report = evaluation.eval_report(
        ckpt.model, images, labels, raw_images=raw_images, iw_samples=args.iw_samples,
        kld_weight=ckpt.kld_weight, binarized=ckpt.binarize, seed=args.seed or 0,
        fid_samples=args.fid_samples, cache_dir=args.data_dir, out_dir=out_dir, checkpoint_path=ckpt.path)
    print(evaluation.format_eval_table(report))
    for name, file in report["files"].items():
        print(f"  {name:<16} {file}")


def run_outlier_detection(args):
    import evaluation
    ckpt, out_dir = load_for_eval(args)
    config = ckpt.model.config
    dataset, data_dir, image_size, own_images = test_split_of(args, ckpt)
    images_in, _ = data.load_test_images(dataset, data_dir, image_size, args.eval_images,
                                         binarize=ckpt.binarize, own_images=own_images)
    # Another dataset's images are brought to the model's shape; a different binarisation seed,
    # so no two images share their noise by construction.
    out_size = None if data.is_named(args.out_dataset) else config.image_shape[-1]
    images_out, _ = data.load_test_images(args.out_dataset, args.data_dir, out_size, args.eval_images,
                                          config.image_shape, ckpt.binarize, binarize_seed=1,
                                          every_image=True)
    report = evaluation.outlier_report(
        ckpt.model, images_in, images_out, out_name=data.dataset_name(args.out_dataset), iw_samples=args.iw_samples,
        kld_weight=ckpt.kld_weight, binarized=ckpt.binarize, seed=args.seed or 0, out_dir=out_dir,
        checkpoint_path=ckpt.path)
    print(evaluation.format_outlier_table(report))
    for name, file in report["files"].items():
        print(f"  {name:<40} {file}")


MODES = ("train", "sample", "eval", "outlier_detection")


def check_flags(args):
    """The rules between flags, checked before any import or file: one UserError each."""
    if args.outlier_detection and args.out_dataset is None:
        raise UserError("--outlier_detection needs --out_dataset NAME (the dataset of outliers)")
    if args.resume and args.overwrite:
        raise UserError("--resume continues a checkpoint and --overwrite replaces it: give one")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group comes later
    if args.train and args.batch_size // world < 2:
        raise UserError(f"--batch_size {args.batch_size} gives {args.batch_size // world} image(s) per "
                        f"step{f' to each of {world} processes' if world > 1 else ''}; BatchNorm "
                        f"needs at least 2: use --batch_size {2 * world} or more")
    check_path_flags(args)


def import_the_work():
    """Import the modules that do the work, with Ctrl-C held back meanwhile: medmnist's import
    has a bare `except:` that would swallow it. A Ctrl-C pressed then arrives right after."""
    global checkpoint, data, distributed, training, util, vae
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import checkpoint
        import data
        import distributed
        import training
        import util
        import vae
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def given_flags(parser, argv):
    """The destinations of the flags written on the command line (not left at their default)."""
    options = parser._option_string_actions  # argparse's own table of option strings
    return {options[word.split("=", 1)[0]].dest for word in map(str, argv)
            if word.startswith("--") and word.split("=", 1)[0] in options}


def check_path_flags(args):
    """Every path flag's kind, before any work: a folder where a file is wanted, a file where
    a folder is, a link loop or a broken link is one line here, not a failure an epoch later."""
    for flag, folder in (("--output_dir", args.output_dir), ("--data_dir", args.data_dir)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{flag} {folder} is a file, not a folder")
    if args.checkpoint is None:
        return
    if os.path.isdir(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint} is a folder: give the checkpoint's file path "
                        f"(such as {os.path.join(args.checkpoint, 'VanillaVAE_mnist.pt')})")
    if os.path.lexists(args.checkpoint) and not os.path.exists(args.checkpoint):
        try:
            os.stat(args.checkpoint)
        except OSError as e:
            raise UserError(f"--checkpoint {args.checkpoint}: {e.strerror} (a broken or looping "
                            "symbolic link)") from None
    parent = os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"--checkpoint {args.checkpoint}: {parent} is a file, not a folder")


def rank_words():
    """' (rank N)' under torchrun, which announces the rank in the environment; else ''."""
    return f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_flags(parser, sys.argv[1:] if argv is None else argv)
    mode = next(name for name in MODES if getattr(args, name))
    try:
        check_flags(args)
        import_the_work()
        {"train": run_train, "sample": run_sample, "eval": run_eval,
         "outlier_detection": run_outlier_detection}[mode](args)
    except UserError as e:
        print(f"VanVAE.py: error{rank_words()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"VanVAE.py: --{mode} interrupted{rank_words()}"
              + ("; nothing was saved" if mode == "train" else ""), file=sys.stderr)
        return 130
    except Exception as e:
        if training is None or not isinstance(e, training.StopRequested):
            raise
        if not distributed.is_main():
            return 130
        launcher = "torchrun <its flags>" if distributed.launched_world_size() > 1 else "python"
        print(f"VanVAE.py: stopped by {e.signal_name}; saved {e.checkpoint_path}. Resume with: "
              f"{resume_command(args, e.checkpoint_path, launcher)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
