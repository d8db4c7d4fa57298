"""VanVAE command line: train a Vanilla VAE on an image dataset, or sample from a trained one.

    python VanVAE.py --train --dataset fashionmnist
    python VanVAE.py --sample --checkpoint models/VanillaVAE/VanillaVAE_fashionmnist.pt
    torchrun --nproc_per_node=4 VanVAE.py --train --dataset fashionmnist   (docs/DISTRIBUTED.md)
    python VanVAE.py --eval --dataset fashionmnist
    python VanVAE.py --outlier_detection --dataset fashionmnist --out_dataset mnist
"""

import argparse
import json
import math
import os
import random
import shlex
import sys

import data
import distributed
import training
import vae
from util import UserError, load_torch_file, seed_everything


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


positive_int = number_type(int, 1, "at least 1")
nonnegative_int = number_type(int, 0, "zero or more")
positive_float = number_type(float, 0, "a positive number", minimum_allowed=False)
nonnegative_float = number_type(float, 0, "zero or a positive number")


def build_parser():
    p = Parser(prog="VanVAE.py", description="Train a Vanilla VAE on an image dataset, or sample "
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
    p.add_argument("--precision", choices=training.PRECISIONS, default=training.TrainSettings.precision,
                   help="autocast dtype of convolutions and matrix products while training: bf16 "
                        "(CPUs with AVX512-BF16/AMX, CUDA), fp16 (CUDA only, with loss scaling), "
                        "fp32; weights, loss and Adam stay fp32 (default: auto, meaning bf16 where "
                        "the hardware has it natively, else fp32; see docs/BENCHMARKS.md)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction,
                   default=training.TrainSettings.channels_last,
                   help="NHWC memory layout, faster with oneDNN and cuDNN (default: %(default)s)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=training.TrainSettings.compile,
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
    p.add_argument("--out_dataset", choices=data.DATASETS, default=None,
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
    training.check_precision(args.precision, device)
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
        training.check_resumable(resume, path)
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
        if args.binarize and args.recon_loss != "bernoulli":
            raise UserError(f"--binarize needs --recon_loss bernoulli (binary pixels), not {args.recon_loss}")
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
    binarized = resume["args"].get("binarize", False) if resume is not None else args.binarize
    if binarized:
        import evaluation
        test_images = evaluation.binarize_fixed(test_images)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{dataset}: {train_images.shape[0]} train / {test_images.shape[0]} test images of "
          f"{tuple(train_images.shape[1:])}; {n_params / 1e6:.2f} M parameters; {device}"
          f"{f' ({threads} threads)' if device.type == 'cpu' else ''}, "
          f"{training.resolve_precision(args.precision, device)}; seed {seed}",
          flush=True)
    flags = {k: v for k, v in vars(args).items()}
    flags.update(dataset=dataset, seed=seed, checkpoint=path)
    settings = training.TrainSettings(
        n_epochs=args.n_epochs, batch_size=args.batch_size, lr=args.lr, kld_weight=args.kld_weight,
        sample_and_save_frequency=args.sample_and_save_frequency, num_samples=args.num_samples,
        seed=seed, checkpoint_path=path, run_dir=out_dir, args=flags,
        progress=sys.stderr.isatty() and distributed.is_main(), precision=args.precision,
        channels_last=args.channels_last, compile=args.compile, binarize=binarized)
    flags["binarize"] = binarized
    if resume is not None:
        # The run continues with the hyper-parameters it started with; only its length,
        # the save frequency and the sample count may change.
        for key in ("batch_size", "lr", "kld_weight"):
            setattr(settings, key, resume["args"][key])
            flags[key] = resume["args"][key]
    training.train(model, train_images, test_images, settings, resume)
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


def load_for_eval(args):
    """The checkpoint's model on its device and the facts about its training that --eval needs."""
    path = args.checkpoint or default_checkpoint(args.output_dir, args.dataset or "mnist")
    ckpt, model = load_checkpoint(path, args.dataset)
    model.to(pick_device(args.device))
    trained = ckpt.get("args", {})
    return path, model, trained.get("binarize", False), trained.get("kld_weight", 1.0), trained.get("image_size")


def test_split(name, args, image_size, binarized, shape=None, binarize_seed=0):
    images, labels = data.load_split(name, "test", args.data_dir, image_size)
    images, labels = images[:args.eval_images], labels[:args.eval_images]
    if shape is not None:
        images = data.match_shape(images, shape)
    if binarized:
        import evaluation
        images = evaluation.binarize_fixed(images, binarize_seed)
    return images, labels


def write_json(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def run_eval(args):
    import evaluation
    path, model, binarized, kld_weight, image_size = load_for_eval(args)
    config = model.config
    seed = args.seed if args.seed is not None else 0
    out_dir = run_dir(args.output_dir, config.dataset)
    check_writable(out_dir)
    raw_images, labels = test_split(config.dataset, args, image_size, False)
    images = evaluation.binarize_fixed(raw_images) if binarized else raw_images
    fid_net = fid_reference = None
    if args.fid_samples > 0:
        import fid
        fid_net = fid.load_network()
        print(f"FID reference: {config.dataset} test split, {raw_images.shape[0]} images "
              "(features cached in --data_dir after the first run)", flush=True)
        mu, sigma, _ = fid.reference_statistics(
            fid_net, raw_images, args.data_dir, f"{config.dataset}_{config.image_shape[-1]}px_test")
        fid_reference = (mu, sigma, f"the {raw_images.shape[0]} {config.dataset} test images")
    print(f"evaluating {path} on {images.shape[0]} {config.dataset} test images "
          f"(K={args.iw_samples}, seed {seed})", flush=True)
    report, means = evaluation.evaluate(model, images, labels, iw_samples=args.iw_samples,
                                        kld_weight=kld_weight, binarized=binarized, seed=seed,
                                        fid_samples=args.fid_samples, fid_reference=fid_reference,
                                        fid_net=fid_net)
    report["checkpoint"] = path
    report["files"] = evaluation.save_pictures(model, images, labels, means, os.path.join(out_dir, "eval"))
    report["files"]["json"] = os.path.join(out_dir, "eval.json")
    write_json(report, report["files"]["json"])
    print(evaluation.format_table(report))
    for name, file in report["files"].items():
        print(f"  {name:<16} {file}")


def run_outlier_detection(args):
    import evaluation
    from plots import plot_score_histograms
    if args.out_dataset is None:
        raise UserError("--outlier_detection needs --out_dataset NAME (the dataset of outliers)")
    path, model, binarized, kld_weight, image_size = load_for_eval(args)
    config = model.config
    seed = args.seed if args.seed is not None else 0
    out_dir = run_dir(args.output_dir, config.dataset)
    check_writable(out_dir)
    images_in, _ = test_split(config.dataset, args, image_size, binarized)
    # A different binarisation seed, so no two images share their noise by construction.
    images_out, _ = test_split(args.out_dataset, args, None, binarized, config.image_shape, binarize_seed=1)
    print(f"scoring {images_in.shape[0]} {config.dataset} and {images_out.shape[0]} {args.out_dataset} "
          f"test images with {path} (K={args.iw_samples})", flush=True)
    scores_in = evaluation.outlier_scores(model, images_in, args.iw_samples, kld_weight, seed)
    scores_out = evaluation.outlier_scores(model, images_out, args.iw_samples, kld_weight, seed + 1)
    report = {"checkpoint": path, "in_dataset": config.dataset, "out_dataset": args.out_dataset,
              "n_in": int(images_in.shape[0]), "n_out": int(images_out.shape[0]), "binarized": binarized,
              "out_images": f"{args.out_dataset} test images brought to {config.image_shape}: RGB->grey by "
                            "channel mean, grey->RGB by repetition, bilinear resize",
              "positive_class_for_fpr": "in-distribution (FPR = outliers accepted at 95% of inliers accepted)",
              "scores": evaluation.outlier_report(scores_in, scores_out), "files": {}}
    for name in scores_in:
        png = os.path.join(out_dir, f"outliers_{args.out_dataset}_{name}.png")
        plot_score_histograms(scores_in[name].numpy(), scores_out[name].numpy(), config.dataset,
                              args.out_dataset, name.replace("_", " "), png,
                              f"{name}: AUROC {report['scores'][name]['auroc']:.3f}")
        report["files"][name] = png
    report["files"]["json"] = os.path.join(out_dir, f"outliers_{args.out_dataset}.json")
    write_json(report, report["files"]["json"])
    print(f"{'score':<40} {'AUROC':>7} {'FPR@95%TPR':>11} {'mean in':>10} {'mean out':>10}")
    for name, r in report["scores"].items():
        print(f"{name:<40} {r['auroc']:>7.4f} {r['fpr_at_95_tpr']:>11.4f} {r['mean_in']:>10.2f} {r['mean_out']:>10.2f}")
    print(f"({report['out_images']}; higher score = more anomalous)")
    for name, file in report["files"].items():
        print(f"  {name:<40} {file}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.train:
            run_train(args)
        elif args.eval:
            run_eval(args)
        elif args.outlier_detection:
            run_outlier_detection(args)
        else:
            run_sample(args)
    except training.StopRequested as stop:
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
