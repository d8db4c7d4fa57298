"""What each mode of the command line does once its flags are checked: --train's set-up around
training.train (the checkpoint to resume or the new model, the data, the lock on the
checkpoint), --sample, --eval and --outlier_detection. VanVAE.py parses and checks the flags,
imports this file, calls one run_* function and turns errors into one line."""

import contextlib
import os
import random
import sys

import api
import checkpoint
import data
import distributed
import fitting
import settings
import training
import util
import vae
from progress import Progress
from settings import DEFAULT_DATASET, TrainingRecord, TrainSettings
from util import UserError


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
                            f"{n_gpus} CUDA device(s): give --nproc_per_node at most {n_gpus}",
                            this_rank_only=True)
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




def load_resume(args, path):
    """(checkpoint, its TrainingState) that --resume continues, checked against the flags."""
    ckpt = checkpoint.load(path, data.dataset_name(args.dataset) if args.dataset else None)
    dataset = ckpt.model.config.dataset
    if data.is_named(dataset):
        image_size = args.image_size
        if image_size is None and dataset in data.MEDMNIST_CLASS_NAMES:
            image_size = ckpt.model.config.image_shape[-1]  # a 64 px run resumes without --image_size
        checkpoint.check_matches(ckpt, image_shape=data.image_shape(dataset, image_size))
    state = checkpoint.resume_state(ckpt)
    check_no_contradiction(args, ckpt)
    done, step = state.epoch, state.step
    if done >= args.n_epochs and step == 0:
        raise UserError(f"{path} has finished {done} epoch{'s' if done != 1 else ''}: nothing to "
                        f"resume; give --n_epochs above {done} to train it longer")
    return ckpt, state


def check_no_contradiction(args, ckpt):
    """A recorded flag (settings.TrainingRecord's and VAEConfig's) given with --resume must agree
    with the checkpoint, which decides."""
    config = ckpt.model.config
    recorded = {**{name: getattr(ckpt.training, name) for name in settings.flag_names(TrainingRecord)},
                **{name: getattr(config, name) for name in settings.flag_names(vae.VAEConfig)}}
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
        dataset = resume.model.config.dataset if resume is not None else (args.dataset or DEFAULT_DATASET)
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
                        f"images of {dataset} (its training.n_train / n_test); {args.data_dir} holds "
                        f"{counts[0]} / {counts[1]}: resume with the same data (--data_dir), or train anew")
    world = distributed.world_size()
    if counts[0] < 2 * world or counts[1] < 1:
        raise UserError(f"{dataset} gives {counts[0]} train and {counts[1]} test images; training "
                        f"needs at least {2 * world} and 1 (add images, or a test/ folder, or "
                        "change --test_fraction)")
    return train_images, test_images, loaded


def hidden_dims(args):
    """--hidden_dims, or the default network's when not given."""
    return tuple(args.hidden_dims or settings.DEFAULT_HIDDEN_DIMS)


def new_model(args, dataset, train_images, test_images, source):
    """A fresh model and its TrainingRecord from the flags."""
    config = settings.from_flags(vae.VAEConfig, vars(args) | {"hidden_dims": hidden_dims(args)},
                                 dataset=dataset, image_shape=tuple(train_images.shape[1:]))
    # checked by VanillaVAE, below
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    seed = distributed.from_main(seed)  # every process must shuffle and draw noise alike
    util.seed_everything(seed)  # before the weights are drawn
    record = settings.from_flags(TrainingRecord, vars(args) | {"seed": seed}, dataset=dataset,
                                 data_source=source, n_train=int(train_images.shape[0]),
                                 n_test=int(test_images.shape[0]))
    return vae.VanillaVAE(config), record


def check_new_run(args, path):
    """Before any data is read: what a new run's flags alone can tell is wrong."""
    if os.path.exists(path) and not args.overwrite:
        raise UserError(f"{path} already exists: add --resume to continue it, --overwrite to "
                        "start over, or --checkpoint to save elsewhere")
    if args.binarize and not vae.models_binary_pixels(args.recon_loss):
        raise UserError(f"--binarize needs --recon_loss bernoulli (binary pixels), not {args.recon_loss}")
    dataset = args.dataset or DEFAULT_DATASET
    if data.is_named(dataset):
        image_shape = data.image_shape(dataset, args.image_size)
        vae.check_config(settings.from_flags(vae.VAEConfig, vars(args) | {"hidden_dims": hidden_dims(args)},
                                             dataset=dataset, image_shape=image_shape))


def train_in_process_group(args, device):
    threads = set_threads(args.threads)
    dataset = data.dataset_name(args.dataset or DEFAULT_DATASET)
    path = checkpoint_for(args)
    out_dir = checkpoint.run_dir(args.output_dir, path)
    check_creatable(out_dir)
    # Rank 0 owns the checkpoint for the whole run (a second run on it is refused at once), and
    # alone writes files.
    main = distributed.is_main()
    with folder_for(path) if main else contextlib.nullcontext(), \
            checkpoint.owned(path) if main else contextlib.nullcontext():
        resume, state = load_resume(args, path) if args.resume else (None, None)
        if resume is None:
            check_new_run(args, path)
        else:
            print(f"resuming {path} after epoch {state.epoch}"
                  + (f", step {state.step}" if state.step else ""), flush=True)
        train_images, test_images, source = load_training_data(args, resume)
        if resume is None:
            model, record = new_model(args, dataset, train_images, test_images, source)
        else:
            model, record = resume.model, resume.training
        train_with(args, device, threads, path, out_dir, model, record, train_images, test_images, state)
    print(f"done: {path}")


def run_fit_prior(args):
    if distributed.launched_world_size() > 1:
        raise UserError("--fit_prior runs in one process: start it with python, not torchrun")
    path = checkpoint_for(args)
    set_threads(args.threads)
    with checkpoint.owned(path):
        ckpt = checkpoint.load(path, args.dataset and data.dataset_name(args.dataset))
        train_images, _, _ = load_training_data(args, ckpt)
        try:
            fitted = fitting.fitted_priors(ckpt.model, ckpt.training, [args.fit_prior], train_images,
                                   args.prior_components, args.prior_codes)
        except UserError as e:
            raise e.extended(f": nothing was saved into {path}") from None
        checkpoint.save_priors(ckpt, fitted)
        print(f"saved {', '.join(fitted)} into {path}", flush=True)


def chosen_priors(ckpt, name):
    """{name: state} of the priors to sample from: `name` (None: the best it holds, as
    settings.best_prior), "all" for N(0, I) and every fitted one. A prior the checkpoint
    lacks is one line saying how to fit it."""
    name = name or settings.best_prior(ckpt.priors, ckpt.epochs_trained)
    if name == "all":  # the best first: its FID is the report's headline figure
        held = {"standard": None, **ckpt.priors}
        return {p: held[p] for p in sorted(held, key=settings.prior_order(ckpt.epochs_trained).index)}
    if name == "standard":
        return {"standard": None}
    if name not in ckpt.priors:
        raise UserError(f"{ckpt.path} has no {name} prior: fit one with python VanVAE.py "
                        f"--fit_prior {name} --checkpoint {ckpt.path}")
    return {name: ckpt.priors[name]}


def train_with(args, device, threads, path, out_dir, model, record, train_images, test_images, state):
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
             "dataset": args.dataset or config.dataset, "checkpoint": path,
             **{name: getattr(record, name) for name in settings.flag_names(TrainingRecord)},
             **{name: getattr(config, name) for name in settings.flag_names(vae.VAEConfig)},
             "hidden_dims": list(config.hidden_dims)}
    run = TrainSettings(record, settings.from_flags(settings.RunChoices, vars(args)), path, out_dir,
                        flags, progress=distributed.is_main())
    training.train(model, train_images, test_images, run, state,
                   fitting.PriorsAfterTraining(record, train_images, config.latent_dim,
                                               args.prior_components, args.prior_codes, path))


def run_sample(args):
    import sampling
    if distributed.launched_world_size() > 1:
        raise UserError("--sample runs in one process: start it with python, not torchrun")
    path = checkpoint_for(args)
    ckpt = checkpoint.load(path, args.dataset and data.dataset_name(args.dataset))
    (prior_name, _), = chosen_priors(ckpt, args.prior).items()
    trained = api.TrainedVAE(ckpt, pick_device(args.device))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    out_dir = checkpoint.run_dir(args.output_dir, path)
    check_creatable(out_dir)
    which = "" if prior_name == "standard" else f"{prior_name}_"
    stem = os.path.join(out_dir, f"{which}prior_samples_n{args.num_samples}_seed{seed}")
    with Progress(f"drawing {prior_name} prior samples", args.num_samples, "image") as bar:
        samples = trained.sample(args.num_samples, prior_name, seed, on_progress=bar.update)
    sampling.save_samples(samples, stem + ".png", stem + ".pt", png_folder=stem)
    print(f"{args.num_samples} samples from {path}, {prior_name} prior (seed {seed}):")
    print(f"  grid   {stem}.png")
    print(f"  tensor {stem}.pt (uint8, {args.num_samples} x {' x '.join(map(str, trained.config.image_shape))})")
    print(f"  images {stem}{os.sep} (one PNG each, for FID tools and image viewers)")


def checkpoint_for(args):
    """The --checkpoint path, or the default one of --dataset (DEFAULT_DATASET if none)."""
    dataset = data.dataset_name(args.dataset or DEFAULT_DATASET)
    return args.checkpoint or checkpoint.default_path(args.output_dir, dataset)


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
    warn_if_fid_is_not_comparable(args.fid_samples, raw_images.shape[0])
    train_images = None
    if args.fid_samples > 0:  # for the decoder's floor, as the encoder saw them in training
        train_images, _, _ = load_training_data(args, ckpt)
        train_images = data.binarize_fixed(train_images) if ckpt.binarize else train_images
    report = evaluation.eval_report(
        ckpt.model, images, labels, raw_images=raw_images, iw_samples=args.iw_samples,
        kld_weight=ckpt.kld_weight, binarized=ckpt.binarize, seed=args.seed or 0,
        fid_samples=args.fid_samples, cache_dir=args.data_dir, out_dir=out_dir, checkpoint_path=ckpt.path,
        priors=chosen_priors(ckpt, args.prior),
        class_names=data.class_names(ckpt.model.config.dataset, ckpt.training and ckpt.training.data_source),
        fid_precision=args.fid_precision, train_images=train_images)
    print(evaluation.format_eval_table(report))
    for name, file in report["files"].items():
        print(f"  {name:<16} {file}")


def warn_if_fid_is_not_comparable(n_samples, n_reference):
    """One line when FID is asked of fewer images than its features: the covariance is then
    singular and the FID biased far above the literature's FID-10k (it still ranks models)."""
    from fid import FEATURE_DIMS  # the Inception pool features FID's covariances are of
    fewest = min(n_samples, n_reference)
    if 0 < fewest < FEATURE_DIMS:
        which = "--fid_samples" if n_samples <= n_reference else "the test split (or --eval_images)"
        print(f"VanVAE.py: warning: FID from {fewest} images ({which}), fewer than its {FEATURE_DIMS} "
              "Inception features: biased upward and not comparable with published FIDs (they use 10,000)",
              file=sys.stderr, flush=True)


def check_other_dataset(out_dataset, dataset):
    """Refuse --out_dataset naming the model's own test set: its AUROC would be about 0.5 by
    construction, a figure that says nothing about outliers."""
    if data.is_named(out_dataset) or data.is_named(dataset):
        same = out_dataset == dataset
    else:  # the user's images: the same files, whichever path or link names them
        same = os.path.realpath(out_dataset) == os.path.realpath(dataset)
    if same:
        raise UserError(f"--out_dataset {out_dataset} is the dataset the model was trained on, so its "
                        "test images are not outliers (AUROC about 0.5 by construction): give another "
                        "dataset")


def run_outlier_detection(args):
    import evaluation
    ckpt, out_dir = load_for_eval(args)
    config = ckpt.model.config
    dataset, data_dir, image_size, own_images = test_split_of(args, ckpt)
    check_other_dataset(args.out_dataset, dataset)
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
