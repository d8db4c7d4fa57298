"""VanVAE command line: train a Vanilla VAE on an image dataset, or sample from a trained one.

    python VanVAE.py --train --dataset fashionmnist
    python VanVAE.py --sample --checkpoint models/VanillaVAE/VanillaVAE_fashionmnist.pt
    torchrun --nproc_per_node=4 VanVAE.py --train --dataset fashionmnist   (docs/DISTRIBUTED.md)
    python VanVAE.py --eval --dataset fashionmnist
    python VanVAE.py --outlier_detection --dataset fashionmnist --out_dataset mnist
"""

import argparse
import os
import shlex
import sys
import time

import settings
import util
from settings import (
    DATASETS,
    DEFAULT_DATASET,
    FID_PRECISIONS,
    PRIORS,
    RunChoices,
    TrainingRecord,
    VAEConfig,
    dataset_type,
    fraction_type,
    nonnegative_int,
    positive_int,
)
from util import UserError

# Imported by import_the_work() once the flags are checked: torch, torchvision and medmnist take
# seconds to import, and --help or a bad flag should answer at once.
modes = distributed = training = None


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit status 2, like every other user error.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
    mode.add_argument("--fit_prior", choices=PRIORS[1:], default=None,
                      help="fit a latent prior to the training set's codes and store it in "
                           "--checkpoint: gmm (Ghosh et al. 2020), two_stage (Dai and Wipf 2019), flow "
                           "(a masked autoregressive flow) or riemannian (Chadebec and Allassonnière "
                           f"2022); --train fits {' and '.join(settings.TRAIN_PRIORS)} after its last epoch")
    p.add_argument("--prior", choices=(*PRIORS, "all"), default=None,
                   help="where z comes from for --sample and --eval: standard (N(0, I), the VAE's "
                        f"own), {', '.join(PRIORS[1:])} (fitted after training), or all (--eval only) "
                        f"(default: none, meaning the first the checkpoint holds of "
                        f"{', '.join(settings.PRIOR_PREFERENCE)}: best measured first; of "
                        f"{', '.join(settings.SHORT_RUN_PRIOR_PREFERENCE)} for weights trained fewer "
                        f"than {settings.SHORT_RUN_EPOCHS} epochs)")
    p.add_argument("--dataset", type=dataset_type, default=None, metavar="NAME|PATH",
                   help=f"dataset to train on: one of {', '.join(DATASETS)}, or your own images: "
                        "a folder of image files (any depth; train/ and test/ subfolders are the "
                        f"splits) or a .npy/.npz array file of uint8 images (default: {DEFAULT_DATASET})")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path to save to (--train) or load (--sample) "
                        "(default: none, meaning <output_dir>/models/VanillaVAE/VanillaVAE_<dataset>.pt)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="with --dataset PATH: grey (1) or RGB (3); alpha is composited on white "
                        "(default: none, meaning 1 when every image is grey, else 3)")
    p.add_argument("--test_fraction", type=fraction_type, default=settings.TEST_FRACTION,
                   help="with --dataset PATH and no train/ and test/ subfolders (or .npz "
                        "train/test arrays): the share held out for test, chosen by a hash of "
                        "each file's path (or array index), so adding images moves no old one "
                        "(default: %(default)s)")
    p.add_argument("--iw_samples", type=positive_int, default=100,
                   help="importance samples K per image for the log-likelihood bound of --eval and "
                        "--outlier_detection (default: 100; Burda et al. report K=5000)")
    p.add_argument("--fid_samples", type=nonnegative_int, default=10000,
                   help="prior samples for --eval's FID against the test split; 0 skips FID "
                        "(default: 10000; per 1000 images on 2 CPU cores, about 31 s in fp32, 19 s in bf16)")
    p.add_argument("--fid_precision", choices=FID_PRECISIONS, default="fp32",
                   help="the Inception network's arithmetic for --eval's FID: fp32 (the literature's), "
                        "or bf16 autocast, about 1.8x faster on CPUs with AVX512-BF16 or AMX but not the "
                        "same figure: its FID-10k measured 0.37 below fp32's on the same images "
                        "(default: fp32)")
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
    for declaration, title in DECLARED_GROUPS:
        group = p.add_argument_group(title)
        for f in settings.flag_fields(declaration):
            group.add_argument(f"--{f.name}", *f.metadata["aliases"], dest=f.name,
                               default=settings.flag_default(f), help=f.metadata["help"],
                               **f.metadata["argparse"])
    return p


# The flags settings.py declares, as --help groups them.
DECLARED_GROUPS = ((VAEConfig, "the network (recorded in the checkpoint; --resume keeps it)"),
                   (TrainingRecord, "the training recipe (recorded in the checkpoint; --resume keeps it)"),
                   (RunChoices, "this run (not recorded; a stopped run's resume command repeats them)"))


def resume_command(args, checkpoint_path, launcher="python"):
    """The command that continues a stopped run, repeating every such flag that was not left
    at its default (the hyper-parameters come back from the checkpoint itself)."""
    words = ["VanVAE.py", "--train", "--resume", *(["--dataset", args.dataset] if args.dataset else []),
             "--checkpoint", checkpoint_path]
    parser = build_parser()
    for name in settings.flag_names(RunChoices):
        value = getattr(args, name)
        if value == parser.get_default(name):
            continue
        if isinstance(value, bool):  # a switch: --name, or --no-name for BooleanOptionalAction
            words.append(f"--{name}" if value else f"--no-{name}")
        else:
            words += [f"--{name}", str(value)]
    return f"{launcher} {shlex.join(words)}"

MODES = ("train", "sample", "eval", "outlier_detection", "fit_prior")


def check_flags(args):
    """The rules between flags, checked before any import or file: one UserError each."""
    if args.outlier_detection and args.out_dataset is None:
        raise UserError("--outlier_detection needs --out_dataset NAME (the dataset of outliers)")
    if args.sample and args.prior == "all":
        raise UserError(f"--sample draws from one prior: give --prior {', '.join(PRIORS)}")
    if args.eval and args.fid_samples == 1:
        raise UserError("--fid_samples 1 gives no covariance: use 0 (no FID) or at least 2")
    if args.eval and args.fid_samples > 0 and args.eval_images == 1:
        raise UserError("--eval_images 1 gives FID's reference no covariance: use at least 2")
    if args.resume and args.overwrite:
        raise UserError("--resume continues a checkpoint and --overwrite replaces it: give one")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group comes later
    if args.train and args.batch_size // world < 2:
        raise UserError(f"--batch_size {args.batch_size} gives {args.batch_size // world} image(s) per "
                        f"step{f' to each of {world} processes' if world > 1 else ''}; BatchNorm "
                        f"needs at least 2: use --batch_size {2 * world} or more")
    check_path_flags(args)


def import_the_work():
    """Import the modules that do the work (torch and its libraries: seconds). A stop meanwhile
    raises at once (util.stops_raise): none of these imports swallows it (medmnist's bare
    `except:` would, so data.py imports medmnist only when a MedMNIST set is read, with stops
    held, util.stops_held)."""
    global modes, distributed, training
    import distributed
    import modes
    import training


def given_flags(parser, argv):
    """The destinations of the flags written on the command line (not left at their default)."""
    options = parser._option_string_actions  # argparse's own table of option strings
    return {options[word.split("=", 1)[0]].dest for word in map(str, argv)
            if word.startswith("--") and word.split("=", 1)[0] in options}


def path_checks(args):
    """(flag, path, kind, need) of every path flag this invocation uses (util.path_problem)."""
    checks = [(flag, dataset, None, "read") for flag, dataset in (("--dataset", args.dataset),
                                                                   ("--out_dataset", args.out_dataset))
              if dataset is not None and settings.is_path_dataset(dataset)]
    # Datasets are read from --data_dir, and downloads and decoded own images go there: one that
    # exists may be read-only (a shared copy); one that does not must be creatable.
    checks.append(("--data_dir", args.data_dir, "folder", "read" if os.path.lexists(args.data_dir) else "write"))
    checks.append(("--output_dir", args.output_dir, "folder", "write"))  # runs/, and models/ by default
    if args.checkpoint is not None:
        replaced = args.fit_prior or args.resume or (args.train and os.path.lexists(args.checkpoint))
        checks.append(("--checkpoint", args.checkpoint, "file",
                       "read_write" if replaced else "write" if args.train else "read"))
    return checks


def check_path_flags(args):
    """Every path flag, before any work: missing, unreadable, not creatable, a folder where a
    file is wanted or the reverse, a broken link, a name too long, a read-only filesystem: one
    line naming the flag, the path and the reason, not a traceback an epoch later."""
    for flag, path, kind, need in path_checks(args):
        problem = util.path_problem(path, kind, need)
        if problem and flag == "--checkpoint" and problem == "no such file":
            problem = "checkpoint not found (no such file)"
        if problem and flag == "--checkpoint" and problem.startswith("it is a folder"):
            problem += f": give the checkpoint's file path (such as {os.path.join(path, 'VanillaVAE_mnist.pt')})"
        if problem:
            raise UserError(f"{flag} {path}: {problem}")


# The ways out that lower layers name (util.UserError's remedy), worded with this tool's flags.
REMEDIES = {
    "checkpoint_in_use": "wait for it to end, or give another --checkpoint",
    "refit_prior": "fit it again with --fit_prior {prior} --checkpoint {path}",
    "fit_prior": "fit it with python VanVAE.py --fit_prior {prior} --checkpoint {path}",
    "weights_only": "it still samples and evaluates (--sample, --eval), or train anew",
    "fewer_components": "try fewer --prior_components",
    "more_test_images": "a test/ folder, or a larger --test_fraction, gives it some",
    "one_image_size": "give an image size N (--image_size N) to resize and centre-crop every one to N x N",
}


def error_words(e):
    """A UserError as the command line prints it: a value named by its field is named by its
    flag (util.BadValue), and each remedy is worded with the flags it needs."""
    remedies = "".join(f"; {REMEDIES[what].format(**values)}" for what, values in e.remedies)
    return f"{'--' if isinstance(e, util.BadValue) else ''}{e}{remedies}"


def rank_words():
    """' (rank N)' under torchrun, which announces the rank in the environment; else ''."""
    return f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def lost_contact_message(args, reason):
    """One line for a torchrun process whose peer is gone (a node killed or unreachable)."""
    path = modes.checkpoint_for(args)
    return (f"VanVAE.py: error{rank_words()}: lost contact with another process of this torchrun job "
            f"({reason}); the run stops here, and {path} keeps its last save, intact. When every node "
            f"is back, resume with: {resume_command(args, path, 'torchrun <its flags>')}")


STOPPED = 130  # the exit status of every stop, Ctrl-C's or SIGTERM's, in every mode and stage


def what_a_stop_leaves(args, mode, started):
    """What a stop leaves on disk, in words, where the stage that was stopped did not say.
    started: time.time() when this run began."""
    path = modes.checkpoint_for(args) if modes is not None else args.checkpoint
    if mode == "train":
        if path and os.path.exists(path) and os.path.getmtime(path) >= started:  # a stop between stages
            return f"{path} holds this run's last save, whole"
        return (f"no epoch had ended; {path} is as it was" if args.resume
                else "no epoch had ended, so nothing was saved")
    if mode == "fit_prior":
        return f"{path} is as it was; run the same command again to fit the {args.fit_prior} prior"
    if mode == "sample":
        return "the samples were not all written; run the same command again"
    return "its report was not written; run the same command again"


def main(argv=None):
    previous = util.stops_raise()  # SIGTERM, like Ctrl-C, ends any stage at once; the epochs poll their own flag
    try:
        return run_mode(argv)
    finally:
        util.signal_handlers_back(previous)  # as they were, for a caller that called main()


def run_mode(argv):
    started = time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_flags(parser, sys.argv[1:] if argv is None else argv)
    mode = next(name for name in MODES if getattr(args, name))
    try:
        check_flags(args)
        util.keep_freed_memory()  # fewer page faults in every step and decoding pass
        import_the_work()
        getattr(modes, f"run_{mode}")(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0" or e.this_rank_only:  # each problem said once
            print(f"VanVAE.py: error{rank_words()}: {error_words(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"VanVAE.py: --{mode} stopped by {getattr(e, 'signal_name', 'SIGINT')}{rank_words()}; "
              f"{getattr(e, 'left', None) or what_a_stop_leaves(args, mode, started)}", file=sys.stderr)
        return STOPPED
    except Exception as e:
        reason = distributed.lost_contact(e) if distributed is not None and mode == "train" else None
        if reason:
            print(lost_contact_message(args, reason), file=sys.stderr, flush=True)
            return 1
        if training is None or not isinstance(e, training.StopRequested):
            raise
        if not distributed.is_main():
            return STOPPED
        launcher = "torchrun <its flags>" if distributed.launched_world_size() > 1 else "python"
        print(f"VanVAE.py: --train stopped by {e.signal_name}; saved {e.checkpoint_path}. Resume with: "
              f"{resume_command(args, e.checkpoint_path, launcher)}", file=sys.stderr)
        return STOPPED
    return 0


if __name__ == "__main__":
    code = main()
    if code == STOPPED:
        # A stopped process owes its scheduler a prompt end: everything is saved and said, and
        # the interpreter's teardown of torch and its libraries takes seconds more on 2 cores.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
