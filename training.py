"""Training the VAE: the loop with its checkpoints, pictures and per-epoch figures, the one
training step (which bench.py times too), the precision and memory-layout choices that make a
step fast, and the signal handling that makes a run resumable. Tensors in, tensors out: this
file never reads datasets from disk."""

import contextlib
import math
import os
import signal
import sys
import time

import torch

import checkpoint
import distributed
import metrics
import schedules
from board import Board
from progress import Progress, duration
from settings import GMM_CODES_PER_COMPONENT, PRECISIONS, WATCH_CODES, WATCH_COMPONENTS, best_prior
from util import (
    BadValue,
    Stopped,
    UserError,
    first_line,
    save_image_grid,
    signal_handlers_back,
    stops_raise,
    to_float,
    write_csv,
)
from vae import is_likelihood


class StopRequested(Exception):
    """Raised after Ctrl-C or SIGTERM once the current step is done and the state is saved."""

    def __init__(self, signal_name, checkpoint_path):
        super().__init__(signal_name)
        self.signal_name, self.checkpoint_path = signal_name, checkpoint_path


class NonFiniteLoss(UserError):
    pass


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls between steps, so a step is never cut."""

    def __init__(self):
        self.name = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum, frame):
        self.name = signal.Signals(signum).name

    def raise_from_now(self):
        """Turn the flag into util.Stopped raised at once, now if a signal came already."""
        stops_raise()
        if self.name is not None:
            raise Stopped(self.name)

    def __exit__(self, *exc):
        signal_handlers_back(self._old)


# ---------------------------------------------------------------- speed (measured in bench.py)



def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware, not emulated by conversions."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                          "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def resolve_precision(precision, device):
    """'auto' is bf16 where the hardware computes it natively, else fp32: bf16 reaches the same
    test -ELBO as fp32 within seed-to-seed noise (docs/BENCHMARKS.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def check_precision(precision, device):
    """Raise BadValue for an autocast dtype this device cannot train in."""
    if precision not in PRECISIONS:
        raise BadValue("precision", f"must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise BadValue("precision", "fp16 needs a CUDA device (on a CPU use bf16 or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadValue("precision", "bf16: this CUDA device has no bf16 support (use fp16)")


def autocast(device, precision):
    """bf16/fp16 convolutions and matrix products; weights, BatchNorm statistics, the loss and
    Adam stay fp32 (mixed precision, Micikevicius et al. 2018)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(model, lr):
    """Adam; the fused kernel updates every parameter in one pass instead of a dozen."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:  # a device without the fused kernel
        return torch.optim.Adam(model.parameters(), lr=lr)


def images_on_device(images, device):
    """The whole uint8 set on the GPU when it fits (no copy per step); else pinned host memory,
    so each batch's copy is asynchronous. On a CPU, the tensor as it is."""
    if device.type != "cuda":
        return images
    try:
        return images.to(device)
    except torch.cuda.OutOfMemoryError:
        return images.pin_memory()


def inductor_cache_dir():
    """Where torch.compile keeps what it compiled: a directory the user set is theirs; else
    ~/.cache/vanvae/torchinductor (or under $XDG_CACHE_HOME). Inductor's own default is in /tmp,
    and inductor writes it into the environment the first time any library asks for it (some
    of the libraries modes.py imports do), so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # inductor's own rule
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return current
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "vanvae", "torchinductor")


def prepare_model(model, precision, channels_last, compile_):
    """Memory layout and compilation, in place; returns the fp16 GradScaler or None."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_:
        # The whole training forward (layers, likelihood and KL) as one graph, in place, so the
        # state_dict keys (and the checkpoints) stay the eager model's. Measured on a 2-core AMD
        # EPYC: +4% images/s in fp32, +1.5% in bf16; compiling the encoder and decoder apart was
        # slower than eager. Inductor caches what it compiled on disk; under ~/.cache, not its
        # default /tmp, so a machine pays the first compile (15-25 s there) once, not after
        # every reboot (4 s from the cache).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
        model.compile()
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


class TrainStep:
    """The one training step, and what it keeps between steps: the optimizer, the fp16 loss
    scaler and the noise generator. The loop and bench.py both call it."""

    def __init__(self, model, settings, device):
        self.model, self.settings, self.device = model, settings, device
        check_precision(settings.run.precision, device)
        self.precision = resolve_precision(settings.run.precision, device)
        self.scaler = prepare_model(model, self.precision, settings.run.channels_last, settings.run.compile)
        # Before the optimizer: on CPUs it swaps BatchNorm for a synchronised one with new parameters.
        self.net = distributed.data_parallel(model, device)  # `model` itself in a single process
        self.optimizer = make_optimizer(model, settings.record.lr)
        self.noise_gen = torch.Generator(device).manual_seed(settings.record.seed + 1)

    def __call__(self, images, idx, batch, rows, lr, kl_weight):
        """One Adam step of learning rate `lr` on the objective recon + kl_weight KL, on this
        process's `rows` of the global batch images[idx] (uint8) of `batch` images; returns
        (recon sum, KL sum, objective x images) as float64 on the device, with no host sync."""
        x = to_float(images[idx[rows].to(images.device)], self.device)
        if self.settings.record.binarize:
            # From the noise stream, so a resumed run draws the same pixels; uniforms for the whole
            # global batch, of which this process takes its rows, so N processes equal one.
            u = torch.rand((batch, *x.shape[1:]), generator=self.noise_gen, device=self.noise_gen.device)
            x = (u[rows].to(x.device) < x).to(x.dtype)  # pixel = 1 with probability its intensity
        if self.settings.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Each process draws the whole global batch's noise and takes its rows, so N processes
        # see exactly the noise one process would.
        noise = self.model.draw_noise(batch, self.noise_gen, self.noise_gen.device)
        noise = {name: values[rows] for name, values in noise.items() if values is not None}
        with autocast(x.device, self.precision):
            terms = self.net(x, kl_weight, None, noise)
        self.optimizer.zero_grad(set_to_none=True)
        # Set, not stepped by a torch.optim.lr_scheduler: its state would be one more thing to
        # save and restore at the right step, where a value computed from the step number
        # (schedules.py) is already exact after a resume, mid-epoch too.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is None:
            terms["loss"].backward()
            self.optimizer.step()
        else:
            self.scaler.scale(terms["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if "squared_error" in terms:
            # The sigma-VAE's decoder variance, the whole global batch's mean squared error, for
            # the next step (one step late: the same on every process without a second pass).
            sum_of_squares = distributed.all_reduce_sum(terms["squared_error"].sum())
            self.model.calibrate_decoder_scale(sum_of_squares / terms["squared_error"].new_tensor(
                batch * math.prod(x.shape[1:])))
        return torch.stack([terms["recon"].sum(), terms["kl"].sum(),
                            terms["loss"] * x.shape[0]]).detach().double()


ADAM_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def check_adam_state(optimizer, built):
    """Raise ValueError unless the loaded Adam is the one this code builds (`built`: each group's
    options but params and lr, as make_optimizer made them) and every parameter's state holds a
    finite step count and moments of its shape: the fused kernel trusts them, and a moment of
    another shape corrupts memory (measured: glibc aborts the process)."""
    for group, options in zip(optimizer.param_groups, built):
        for key, value in options.items():
            if type(group.get(key)) is not type(value) or group.get(key) != value:
                raise ValueError(f"its {key} is {str(group.get(key))[:40]!r}, not {value!r}")
        for i, param in enumerate(group["params"]):
            state = optimizer.state.get(param, {})
            if state and set(state) != set(ADAM_STATE_KEYS):
                raise ValueError(f"the state of parameter {i} holds {', '.join(map(str, state))}, "
                                 f"not {', '.join(ADAM_STATE_KEYS)}")
            for key, value in state.items():
                ok = isinstance(value, torch.Tensor) and bool(torch.isfinite(value).all()) and (
                    value.numel() == 1 if key == "step" else value.shape == param.shape)
                if not ok:
                    raise ValueError(f"the {key} of parameter {i} does not fit it")


def batches_per_epoch(n_images, batch_size):
    """Full batches only (BatchNorm needs more than one image); one batch if the set is smaller."""
    return max(1, n_images // batch_size)


def epoch_row(config, epoch, train, test, seconds, images_per_second):
    """One CSV/history row. Column names carry units: nats for likelihoods, GenerativeZoo's
    per-pixel MSE for --recon_loss mse."""
    unit = "nats" if is_likelihood(config) else "mse_per_pixel"
    row = {"epoch": epoch}
    for split, terms in (("train", train), ("test", test)):
        row[f"{split}_loss"] = terms["loss"]
        row[f"{split}_recon_{unit}"] = terms["recon"]
        row[f"{split}_kl_nats"] = terms["kl"]
        if is_likelihood(config):
            row[f"{split}_neg_elbo_nats"] = terms["recon"] + terms["kl"]
    row["seconds"] = seconds
    row["train_images_per_second"] = images_per_second
    return row


def describe(config, terms, kld_weight):
    if not is_likelihood(config):
        return (f"loss {terms['loss']:.5f} (MSE {terms['recon']:.5f}/pixel + "
                f"{kld_weight:g} x KL {terms['kl']:.2f} nats)")
    text = (f"-ELBO {terms['recon'] + terms['kl']:.2f} nats/image "
            f"(recon {terms['recon']:.2f} + KL {terms['kl']:.2f})")
    if kld_weight != 1.0:
        text += f", objective {terms['loss']:.2f}"
    return text


def non_finite_loss(epoch, settings):
    return NonFiniteLoss(f"the training loss became NaN or infinite in epoch {epoch}; "
                         f"{settings.checkpoint_path} keeps the last good weights")


def check_finite_weights(model, checkpoint_path):
    """The loss is checked before each step; this catches the last step of an epoch blowing
    the weights up, so a checkpoint is never replaced by broken weights."""
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise NonFiniteLoss(f"the weights became NaN or infinite; {checkpoint_path} keeps the "
                            "last good weights")


TRAVERSAL_IMAGES = 1000  # test images that rank the latent dimensions for a save's traversal


def watch_samples(model, train_images, settings, epoch, priors=None):
    """(uint8 samples, where they come from in words) for a save's sample grid: from the prior
    --sample will use where the final `priors` are given (the last save), else from a mixture
    of WATCH_COMPONENTS full-covariance Gaussians fitted to WATCH_CODES training codes, about
    a second of EM. The same seed at every save: grids differ by the weights and the fit only."""
    import priors as latent_priors
    import sampling
    seed = settings.record.seed
    if priors is not None:
        name = best_prior(priors, epoch)
        state, words = priors.get(name), f"the {name} prior, as --sample draws"
    else:
        rows = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed + 3))
        codes = metrics.posterior_means(model, train_images[rows[:WATCH_CODES].to(train_images.device)])
        k = min(WATCH_COMPONENTS, max(1, codes.shape[0] // GMM_CODES_PER_COMPONENT))
        try:
            state = latent_priors.fit_gmm(codes, k, seed, f"{codes.shape[0]} training codes")
            words = f"a {k}-component gmm fitted to {codes.shape[0]} training codes"
        except ValueError:  # codes EM cannot fit (too few, all alike): the grid still shows the decoder
            state, words = None, "N(0, I): no mixture could be fitted to the codes"
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed + 2)
    return sampling.prior_samples_uint8(model, settings.run.num_samples, generator, state), words


def save_outputs(model, epoch, settings, train_images, test_images, history, priors=None):
    """Prior samples (watch_samples), test images above their reconstructions, the latent
    traversal, CSV, curves; after the last epoch the samples' animation. Returns
    {name: path} and {name: grid tensor} (for TensorBoard)."""
    from pictures import save_animation, save_traversal  # Pillow drawing; only needed here
    from plots import plot_loss_curves  # matplotlib is slow to import; only needed here
    samples, samples_from = watch_samples(model, train_images, settings, epoch, priors)
    model.eval()
    with torch.no_grad():
        k = min(8, test_images.shape[0])
        x = to_float(test_images[:k], next(model.parameters()).device)
        pairs = torch.cat([x, model.reconstruct(x)])
    model.train()
    paths = {"samples": f"{settings.run_dir}/samples_epoch_{epoch:04d}.png",
             "reconstructions": f"{settings.run_dir}/reconstructions_epoch_{epoch:04d}.png",
             "traversals": f"{settings.run_dir}/traversals_epoch_{epoch:04d}.png"}
    grids = {"samples": save_image_grid(samples.float() / 255, paths["samples"]),
             "reconstructions": save_image_grid(pairs, paths["reconstructions"], nrow=k)}
    _, grids["traversals"] = save_traversal(model, test_images[:TRAVERSAL_IMAGES], paths["traversals"],
                                            f"epoch {epoch}")
    write_csv(f"{settings.run_dir}/history.csv", history)
    plot_loss_curves(history, f"{settings.run_dir}/loss_curves.png", kld_weight=settings.record.kld_weight)
    if epoch == settings.run.n_epochs:
        animation = f"{settings.run_dir}/samples_over_training.gif"
        if save_animation(settings.run_dir, epoch, animation):
            paths["animation"] = animation
    paths["samples_from"] = samples_from
    return paths, grids


def save_outputs_or_warn(model, epoch, settings, train_images, test_images, history, priors=None):
    """save_outputs(), or (None, {}) and one warning line if the disk refuses: pictures and logs
    never cost the training (the checkpoint is saved already), and the next save writes them
    all again."""
    try:
        return save_outputs(model, epoch, settings, train_images, test_images, history, priors)
    except (OSError, RuntimeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        where = getattr(e, "filename", None) or settings.run_dir
        print(f"VanVAE.py: warning: could not write the pictures and history of epoch {epoch} "
              f"({where}: {reason}); training goes on, and the next save writes them again",
              file=sys.stderr, flush=True)
        return None, {}


def without_priors(finish, checkpoint_path, epoch):
    """What the file holds after the last epoch's first save, and the commands that do the rest."""
    names = getattr(finish, "names", ())
    commands = " and ".join(f"python VanVAE.py --fit_prior {name} --checkpoint {checkpoint_path}" for name in names)
    return (f"{checkpoint_path} holds all {epoch} trained epochs (the complete training state) without the "
            f"{' and '.join(names)} prior{'s' if len(names) != 1 else ''}; fit {'them' if len(names) > 1 else 'it'} "
            f"with: {commands}") if names else f"{checkpoint_path} holds all {epoch} trained epochs"


@contextlib.contextmanager
def board_for(settings, first_step):
    """A TensorBoard writer for the block on rank 0 with --tensorboard, else None."""
    board = distributed.on_main(lambda: Board(settings.run_dir, first_step)) if settings.run.tensorboard else None
    try:
        yield board
    finally:
        if board is not None:
            board.close()


def train(model, train_images, test_images, settings, resume=None, finish=None):
    """Train with Adam on uint8 image tensors; checkpoint, sample and log as settings say.

    `resume` is the checkpoint.TrainingState to continue from (the model holds its weights
    already: same optimizer, random streams, history), so an interrupted run ends exactly where
    an uninterrupted one does.
    `finish`, if given, is called on rank 0 after the last epoch's save as finish(model) ->
    {name: prior state}, fitted to the final weights and saved with them; it also tells its
    time, finish.seconds(encode seconds per image), for the run's time left, and its prior
    `names`. If it fails or is stopped, the file holds the trained weights without it.
    After the last epoch's save a stop raises util.Stopped at once, saying what it leaves."""
    device = next(model.parameters()).device
    step_fn = TrainStep(model, settings, device)
    train_images, test_images = images_on_device(train_images, device), images_on_device(test_images, device)
    shuffle_gen = torch.Generator().manual_seed(settings.record.seed)
    state = {"epoch": 0, "step": 0, "history": [], "partial": None}
    if resume is None:
        model.init_decoder_scale(train_images)
    else:
        # checkpoint.resume_state checked each entry's form; what only the objects themselves
        # can check (Adam's state against these parameters, a generator's state) is checked here.
        try:
            built = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                     for g in step_fn.optimizer.param_groups]
            step_fn.optimizer.load_state_dict(resume.optimizer)
            check_adam_state(step_fn.optimizer, built)
            shuffle_gen.set_state(resume.shuffle_at_epoch_start)
            step_fn.noise_gen.set_state(resume.noise)
            if step_fn.scaler is not None and resume.scaler:  # fp16's loss scale goes on as it was
                step_fn.scaler.load_state_dict(resume.scaler)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise UserError(f"{settings.checkpoint_path} holds a training state that does not fit its "
                            f"model (optimizer, rng or scaler: {first_line(e)})",
                            remedy=("weights_only", {})) from None
        state.update(epoch=resume.epoch, step=resume.step, history=list(resume.history), partial=resume.partial)
    n_batches = batches_per_epoch(train_images.shape[0], settings.record.batch_size)
    batch = min(settings.record.batch_size, train_images.shape[0])
    rows = distributed.batch_rows(batch)  # this process's share of every global batch
    model.train()

    def save(priors=None):
        check_finite_weights(model, settings.checkpoint_path)
        where = checkpoint.TrainingState(
            step_fn.optimizer.state_dict(), state["epoch"], state["step"], state["history"], state["partial"],
            state["shuffle_at_epoch_start"], step_fn.noise_gen.get_state(),
            step_fn.scaler.state_dict() if step_fn.scaler is not None else None)
        distributed.on_main(lambda: checkpoint.save(settings.checkpoint_path, model, settings.record, where,
                                                    settings.flags, priors))

    first_global_step = state["epoch"] * n_batches + state["step"]
    epoch_overhead = None  # seconds of the last epoch's test pass and saves, for the run's time left
    finish_seconds = None  # the finish's time, estimated after the first test pass
    with _SignalFlag() as stop, board_for(settings, first_global_step) as board:
        for epoch in range(state["epoch"] + 1, settings.run.n_epochs + 1):
            state["shuffle_at_epoch_start"] = shuffle_gen.get_state()
            # Drawn on the CPU as on every device (the same order everywhere), then moved once an
            # epoch to where the images are, so a step on a GPU indexes them with no host copy.
            order = torch.randperm(train_images.shape[0], generator=shuffle_gen).to(train_images.device)
            first_step, partial = state["step"], state["partial"]
            # Saved sums cover all processes, so only rank 0 resumes with them.
            sums = (partial["sums"].to(device) if partial is not None and distributed.is_main()
                    else torch.zeros(3, device=device, dtype=torch.float64))
            seconds_before = partial["seconds"] if partial is not None else 0.0
            start = time.perf_counter()
            epochs_after = settings.run.n_epochs - epoch

            def run_left(epoch_left, epochs_after=epochs_after):
                per_epoch = n_batches * batch / max(bar.rate(), 1e-9) + (epoch_overhead or 0.0)
                return f"run {duration(epoch_left + epochs_after * per_epoch + (finish_seconds or 0.0))} left"

            bar = Progress(f"epoch {epoch}/{settings.run.n_epochs}", n_batches * batch, "image",
                           done=first_step * batch, interval=settings.run.progress_seconds,
                           more=run_left, enabled=settings.progress)
            for step in range(first_step, n_batches):
                global_step = (epoch - 1) * n_batches + step  # optimizer steps before this one
                recipe = schedules.at_step(settings, global_step, n_batches)
                sums += step_fn(train_images, order[step * batch:(step + 1) * batch], batch, rows, *recipe)
                postfix = None
                if step % 25 == 0 or step == n_batches - 1:
                    # The only host sync in the loop: a running loss for the progress line and
                    # TensorBoard, and an early stop before NaN weights could ever be saved.
                    running = distributed.all_reduce_sum(sums)[2].item() / ((step + 1) * batch)
                    if not math.isfinite(running):
                        raise non_finite_loss(epoch, settings)
                    postfix = f"step {step + 1}/{n_batches}, loss {running:.4g}"
                    if board is not None:
                        board.running_loss(global_step + 1, running)
                bar.update((step + 1) * batch, postfix)
                stop_name = distributed.agreed_signal(stop.name)  # all processes stop at one step
                if stop_name is not None and step < n_batches - 1:
                    sums = distributed.all_reduce_sum(sums)
                    if not torch.isfinite(sums).all():
                        raise non_finite_loss(epoch, settings)
                    state.update(epoch=epoch - 1, step=step + 1,
                                 partial={"sums": sums.cpu(),
                                          "seconds": seconds_before + time.perf_counter() - start})
                    save()
                    raise StopRequested(stop_name, settings.checkpoint_path)
            bar.close()
            sums = distributed.all_reduce_sum(sums)
            if not torch.isfinite(sums).all():
                raise non_finite_loss(epoch, settings)
            seconds = seconds_before + time.perf_counter() - start
            overhead_start = time.perf_counter()
            n_seen = n_batches * batch
            recon, kl, loss = (sums / n_seen).tolist()
            train_terms = {"recon": recon, "kl": kl, "loss": loss}
            # The test objective weighs KL as warm-up has reached by the epoch's end; its -ELBO,
            # like the train one, is recon + KL whatever the weight.
            _, kl_weight = schedules.at_step(settings, epoch * n_batches, n_batches)
            test_start = time.perf_counter()
            test_terms = metrics.mean_elbo_terms(model, test_images, kl_weight,
                                                 settings.record.batch_size, settings.record.seed)
            if finish is not None and finish_seconds is None:
                per_image = (time.perf_counter() - test_start) / test_images.shape[0]
                finish_seconds = distributed.on_main(lambda: finish.seconds(per_image)) or 0.0
            row = epoch_row(model.config, epoch, train_terms, test_terms, seconds, n_seen / seconds)
            state["history"].append(row)
            state.update(epoch=epoch, step=0, partial=None)
            print(f"epoch {epoch}/{settings.run.n_epochs}  "
                  f"train {describe(model.config, train_terms, kl_weight)}"
                  f"  test {describe(model.config, test_terms, kl_weight)}"
                  f"  {seconds:.1f} s, {n_seen / seconds:.0f} images/s", flush=True)
            if board is not None:
                board.epoch(epoch * n_batches, row, step_fn.optimizer.param_groups[0]["lr"])
            last = epoch == settings.run.n_epochs
            stop_name = distributed.agreed_signal(stop.name)
            if epoch % settings.run.sample_and_save_frequency == 0 or last or stop_name is not None:
                state["shuffle_at_epoch_start"] = shuffle_gen.get_state()
                save()  # first, whatever follows: a kill after this loses no trained epoch
                priors = None
                # After the last epoch nothing is left to resume, so a stop needs no step boundary:
                # from here it raises util.Stopped at once, and says what the file holds.
                left = without_priors(finish, settings.checkpoint_path, epoch)
                try:
                    if last:
                        stop.raise_from_now()
                        if finish is not None:
                            priors = distributed.on_main(lambda: finish(model))
                            save(priors)
                        left = (f"{settings.checkpoint_path} is complete ({epoch} epochs"
                                f"{' and the priors' if finish is not None else ''}); the pictures of "
                                f"epoch {epoch} may not all be written")
                    paths, grids = distributed.on_main(
                        lambda: save_outputs_or_warn(model, epoch, settings, train_images, test_images,
                                                     state["history"], priors)) or (None, {})
                except Stopped as e:
                    e.left = e.left or left
                    raise
                if board is not None:
                    board.images(epoch * n_batches, grids)
                if distributed.is_main():
                    print(f"saved {settings.checkpoint_path}"
                          + (f", {paths['samples']} (samples from {paths['samples_from']}), "
                             f"{paths['reconstructions']}, {paths['traversals']}" if paths else "")
                          + (f"; the samples over training: {paths['animation']}"
                             if paths and "animation" in paths else ""), flush=True)
            if stop_name is not None and not last:  # after the last epoch there is nothing to resume
                raise StopRequested(stop_name, settings.checkpoint_path)
            epoch_overhead = time.perf_counter() - overhead_start
    return state["history"]
