"""VanVAE command line: train a Vanilla VAE on an image dataset, or sample from a trained one.

    python VanVAE.py --train --dataset fashionmnist
    python VanVAE.py --sample --checkpoint models/VanillaVAE/VanillaVAE_fashionmnist.pt
    torchrun --nproc_per_node=4 VanVAE.py --train --dataset fashionmnist   (docs/DISTRIBUTED.md)
"""

import argparse
import os
import random
import shlex
import sys

import data
import distributed
import vae
from util import UserError, load_torch_file, seed_everything


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit status 2, like every other user error.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, not {text}")
    return value


def build_parser():
    p = Parser(prog="VanVAE.py", description="Train a Vanilla VAE on an image dataset, or sample "
               "new images from a trained one. Every figure printed is per image, with its unit.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train a model (and save checkpoints, "
                      "samples and reconstructions every --sample_and_save_frequency epochs)")
    mode.add_argument("--sample", action="store_true", help="draw --num_samples images from the "
                      "prior of a trained model; needs only --checkpoint")
    p.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="dataset to train on (default: mnist)")
    p.add_argument("--batch_size", type=positive_int, default=128,
                   help="images per step; under torchrun the global batch, split evenly over the "
                        "processes, so it must be a multiple of their number (default: 128)")
    p.add_argument("--n_epochs", type=positive_int, default=100, help="epochs to train (default: 100)")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate (default: 0.0002)")
    p.add_argument("--latent_dim", type=positive_int, default=128, help="latent dimensions (default: 128)")
    p.add_argument("--hidden_dims", type=positive_int, nargs="+", default=None,
                   help="channels of each stride-2 conv layer (default: none given, meaning 32 64 128 256 512)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path to save to (--train) or load (--sample) "
                        "(default: none, meaning <output_dir>/models/VanillaVAE/VanillaVAE_<dataset>.pt)")
    p.add_argument("--num_samples", type=positive_int, default=16,
                   help="images drawn from the prior per sample grid or --sample run (default: 16)")
    p.add_argument("--sample_and_save_frequency", "--sample_and_save_freq", type=positive_int, default=5,
                   dest="sample_and_save_frequency",
                   help="save checkpoint, samples and reconstructions every this many epochs, and "
                        "after the last (default: 5)")
    p.add_argument("--data_dir", default="./data", help="where datasets are found or downloaded (default: ./data)")
    p.add_argument("--output_dir", default=".",
                   help="where models/ and runs/ are written (default: . the working directory)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for weights, shuffling and sampling (default: none, meaning a "
                        "fresh one, printed and saved so the run can be repeated)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to compute (default: auto, meaning cuda, then mps, then cpu); under "
                        "torchrun each process uses cuda:LOCAL_RANK, or the cpu")
    p.add_argument("--recon_loss", choices=vae.RECON_LOSSES, default="bernoulli",
                   help="decoder likelihood: bernoulli (BCE on [0,1] intensities), gaussian "
                        "(learned scale, dequantised 8-bit density) or mse (GenerativeZoo's per-pixel "
                        "mean squared error) (default: bernoulli)")
    p.add_argument("--kld_weight", type=nonnegative_float, default=1.0,
                   help="weight of the KL term; 1 gives the true ELBO (default: 1.0; GenerativeZoo "
                        "uses 0.0001 with --recon_loss mse)")
    p.add_argument("--image_size", type=positive_int, default=None,
                   help="MedMNIST image size: 28, 64, 128 or 224 (default: none, meaning the "
                        "dataset's native size: 28 for MNIST, Fashion-MNIST and MedMNIST, 32 for "
                        "CIFAR-10 and SVHN)")
    p.add_argument("--precision", choices=vae.PRECISIONS, default=vae.TrainSettings.precision,
                   help="autocast dtype of convolutions and matrix products while training: bf16 "
                        "(CPUs with AVX512-BF16/AMX, CUDA), fp16 (CUDA only, with loss scaling), "
                        "fp32; weights, loss and Adam stay fp32 (default: auto, meaning bf16 where "
                        "the hardware has it natively, else fp32; see docs/BENCHMARKS.md)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction,
                   default=vae.TrainSettings.channels_last,
                   help="NHWC memory layout, faster with oneDNN and cuDNN (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=vae.TrainSettings.compile,
                   help="torch.compile the encoder and decoder; pays back only on long runs "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for PyTorch (default: none, meaning one per CPU this process "
                        "may run on)")
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


def default_checkpoint(output_dir, dataset):
    return os.path.join(output_dir, "models", "VanillaVAE", f"VanillaVAE_{dataset}.pt")


def run_dir(output_dir, dataset):
    return os.path.join(output_dir, "runs", f"VanillaVAE_{dataset}")


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable")


def load_checkpoint(path, dataset=None, image_shape=None):
    """Load and check a checkpoint; `dataset`/`image_shape`, where given, must agree with it."""
    ckpt = load_torch_file(path)
    model = vae.model_from_checkpoint(ckpt, path)
    config = model.config
    if dataset is not None and dataset != config.dataset:
        raise UserError(f"{path} was trained on {config.dataset}, not --dataset {dataset}")
    if image_shape is not None and tuple(image_shape) != config.image_shape:
        raise UserError(f"{path} is for {config.image_shape} images, but --dataset/--image_size "
                        f"give {tuple(image_shape)}")
    return ckpt, model


def run_train(args):
    world = distributed.launched_world_size()
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the global batch and must split evenly "
                        f"over the {world} processes torchrun started: use a multiple of {world}")
    device = pick_device(args.device)
    vae.check_precision(args.precision, device)
    with distributed.process_group(device), distributed.stdout_on_main_only():
        train_in_process_group(args, device)


def train_in_process_group(args, device):
    dataset = args.dataset or "mnist"
    threads = set_threads(args.threads)
    image_shape = data.image_shape(dataset, args.image_size)
    path = args.checkpoint or default_checkpoint(args.output_dir, dataset)
    resume = None
    if args.resume:
        resume, model = load_checkpoint(path, dataset, image_shape)
        vae.check_resumable(resume, path)
        seed = resume["args"]["seed"]
        print(f"resuming {path} after epoch {resume['epoch']}"
              + (f", step {resume['step']}" if resume["step"] else ""), flush=True)
    else:
        if os.path.exists(path) and not args.overwrite:
            raise UserError(f"{path} already exists: add --resume to continue it, --overwrite to "
                            "start over, or --checkpoint to save elsewhere")
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        seed = distributed.from_main(seed)  # every process must shuffle and draw noise alike
        seed_everything(seed)
        config = vae.VAEConfig(dataset=dataset, image_shape=image_shape, latent_dim=args.latent_dim,
                               hidden_dims=tuple(args.hidden_dims or vae.DEFAULT_HIDDEN_DIMS),
                               recon_loss=args.recon_loss)
        vae.check_config(config)
        model = vae.VanillaVAE(config)
    check_writable(os.path.dirname(os.path.abspath(path)))
    out_dir = run_dir(args.output_dir, dataset)
    check_writable(out_dir)
    train_images, test_images = distributed.first_on_each_machine(lambda: (
        data.load_split(dataset, "train", args.data_dir, args.image_size)[0],
        data.load_split(dataset, "test", args.data_dir, args.image_size)[0]))
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{dataset}: {train_images.shape[0]} train / {test_images.shape[0]} test images of "
          f"{tuple(train_images.shape[1:])}; {n_params / 1e6:.2f} M parameters; {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, "
          f"{vae.resolve_precision(args.precision, device)}; seed {seed}",
          flush=True)
    flags = {k: v for k, v in vars(args).items()}
    flags.update(dataset=dataset, seed=seed, checkpoint=path)
    settings = vae.TrainSettings(
        n_epochs=args.n_epochs, batch_size=args.batch_size, lr=args.lr, kld_weight=args.kld_weight,
        sample_and_save_frequency=args.sample_and_save_frequency, num_samples=args.num_samples,
        seed=seed, checkpoint_path=path, run_dir=out_dir, args=flags,
        progress=sys.stderr.isatty() and distributed.is_main(), precision=args.precision,
        channels_last=args.channels_last, compile=args.compile)
    if resume is not None:
        # The run continues with the hyper-parameters it started with; only its length,
        # the save frequency and the sample count may change.
        for key in ("batch_size", "lr", "kld_weight"):
            setattr(settings, key, resume["args"][key])
            flags[key] = resume["args"][key]
    vae.train(model, train_images, test_images, settings, resume)
    print(f"done: {path}")


def run_sample(args):
    import torch
    if distributed.launched_world_size() > 1:
        raise UserError("--sample runs in one process: start it with python, not torchrun")
    dataset_path = args.checkpoint or default_checkpoint(args.output_dir, args.dataset or "mnist")
    _, model = load_checkpoint(dataset_path, args.dataset)
    device = pick_device(args.device)
    model.to(device)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    out_dir = run_dir(args.output_dir, model.config.dataset)
    check_writable(out_dir)
    stem = os.path.join(out_dir, f"prior_samples_n{args.num_samples}_seed{seed}")
    generator = torch.Generator(device).manual_seed(seed)
    vae.sample_to_files(model, args.num_samples, generator, stem + ".png", stem + ".pt")
    print(f"{args.num_samples} samples from {dataset_path} (seed {seed}):")
    print(f"  grid   {stem}.png")
    print(f"  tensor {stem}.pt (uint8, {args.num_samples} x {' x '.join(map(str, model.config.image_shape))})")


# Flags a resumed run does not take back from the checkpoint: where things are, how long to go on.
RESUME_FLAGS = ("n_epochs", "data_dir", "output_dir", "sample_and_save_frequency", "num_samples",
                "device", "image_size")


def resume_command(args, checkpoint_path, launcher="python"):
    """The command that continues a stopped run, repeating every such flag that was not left
    at its default (the hyper-parameters come back from the checkpoint itself)."""
    words = ["VanVAE.py", "--train", "--resume", "--dataset", args.dataset or "mnist",
             "--checkpoint", checkpoint_path]
    parser = build_parser()
    for name in RESUME_FLAGS:
        value = getattr(args, name)
        if value != parser.get_default(name):
            words += [f"--{name}", str(value)]
    return f"{launcher} {shlex.join(words)}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.train:
            run_train(args)
        else:
            run_sample(args)
    except vae.StopRequested as stop:
        if not distributed.is_main():
            return 130
        launcher = "torchrun <its flags>" if distributed.launched_world_size() > 1 else "python"
        print(f"VanVAE.py: stopped by {stop.signal_name}; saved {stop.checkpoint_path}. Resume with: "
              f"{resume_command(args, stop.checkpoint_path, launcher)}", file=sys.stderr)
        return 130
    except UserError as e:
        where = f" (rank {distributed.rank()})" if distributed.launched_world_size() > 1 else ""
        print(f"VanVAE.py: error{where}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("VanVAE.py: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
