"""Never lose a run, never trust a file blindly (issue 5).

Faults are produced for real where that is possible: real processes stopped by real signals or
kill -9, a real divergence. Disk-full is simulated by making os.replace or torch.save fail. Bad
input runs through VanVAE.main in-process (fast), and a few representative cases again as real
processes to show the exit status and that no traceback reaches the user."""

import errno
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import training
import util
import vae
import VanVAE
from fakedata import NoMd5CIFAR10, write_dataset
from helpers import (
    CHECKPOINT,
    ENV,
    ROOT,
    TINY_MODEL,
    WAIT_S,
    assert_one_line_error,
    assert_same_training_state,
    one_thread,  # noqa: F401 -- autouse: each test here runs on one thread
    resume_command_from,
    run_cli,
    run_main,
    sigint_in_epoch_2,
    snapshot,
    start_cli,
    wait_for_lines,
)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, small_data):
    """A checkpoint after one epoch, made in-process once for the module."""
    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and back: later test modules compare runs at the default count
    assert VanVAE.main(["--train", "--data_dir", str(small_data), "--output_dir", str(out),
                        *TINY_MODEL, "--n_epochs", "1", "--seed", "0"]) == 0
    torch.set_num_threads(threads)
    return out / CHECKPOINT


@pytest.fixture
def run_folder(tmp_path, good_checkpoint):
    """tmp_path/out holding a copy of the good checkpoint at its default place."""
    target = tmp_path / "out" / CHECKPOINT
    target.parent.mkdir(parents=True)
    target.write_bytes(good_checkpoint.read_bytes())
    return tmp_path / "out"


# ---------------------------------------------------------------- resume

@pytest.mark.long
def test_resume_at_an_epoch_boundary_ends_bit_identical(tmp_path, small_data):
    common = ["--train", "--data_dir", small_data, *TINY_MODEL, "--seed", "3"]
    assert run_cli(*common, "--output_dir", tmp_path / "a", "--n_epochs", 2).returncode == 0
    assert run_cli(*common, "--output_dir", tmp_path / "b", "--n_epochs", 1).returncode == 0
    resumed = run_cli(*common, "--output_dir", tmp_path / "b", "--n_epochs", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert_same_training_state(util.load_torch_file(tmp_path / "a" / CHECKPOINT),
                               util.load_torch_file(tmp_path / "b" / CHECKPOINT))




@pytest.mark.long
def test_sigint_mid_epoch_then_the_printed_resume_command_ends_bit_identical(tmp_path, long_data):
    common = ["--train", "--data_dir", long_data, *TINY_MODEL, "--seed", "5", "--n_epochs", 2]
    assert run_cli(*common, "--output_dir", tmp_path / "a").returncode == 0

    err = sigint_in_epoch_2(*common, "--output_dir", tmp_path / "b")
    stopped = util.load_torch_file(tmp_path / "b" / CHECKPOINT)
    assert stopped["epoch"] == 1 and stopped["step"] > 0, "the stop was not mid-epoch"

    resumed = run_cli(*resume_command_from(err))
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch 1, step {stopped['step']}" in resumed.stdout
    assert_same_training_state(util.load_torch_file(tmp_path / "a" / CHECKPOINT),
                               util.load_torch_file(tmp_path / "b" / CHECKPOINT))


@pytest.mark.long
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_prints_one_line_with_the_resume_command(tmp_path, long_data, signum):
    proc = start_cli("--train", "--data_dir", long_data, "--output_dir", tmp_path, *TINY_MODEL,
                     "--n_epochs", 3, "--seed", 1)
    wait_for_lines(proc, "epoch 1/3")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=WAIT_S)
    err = err.decode()
    assert proc.returncode == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    path = tmp_path / CHECKPOINT
    assert f"stopped by {signal.Signals(signum).name}; saved {path}" in err
    assert "--resume" in err and f"--checkpoint {path}" in err
    ckpt = checkpoint.load(str(path), "mnist")
    checkpoint.resume_state(ckpt)  # whole: --resume can continue it
    assert checkpoint.resume_state(ckpt).epoch >= 1  # epoch 1, or more on a machine slow to deliver the signal


@pytest.mark.long
def test_kill_9_leaves_a_checkpoint_that_loads_samples_and_resumes(tmp_path, small_data):
    proc = start_cli("--train", "--data_dir", small_data, "--output_dir", tmp_path, *TINY_MODEL,
                     "--n_epochs", 1000, "--seed", 2, "--sample_and_save_frequency", 1)
    wait_for_lines(proc, "saved ", count=2)
    proc.kill()  # SIGKILL: no handler runs, whatever the process was doing (maybe saving)
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGKILL

    path = tmp_path / CHECKPOINT
    # A save cut short can leave its hidden temporary file; nothing else is there, and
    # nothing reads it: the checkpoint is only ever the complete file under its own name.
    # So can the lock of the run that owned the checkpoint: the kernel released it with the
    # process, and the next run takes it over.
    others = [p.name for p in path.parent.iterdir() if p != path]
    assert all(name.startswith(".tmp-") or name == f".{path.name}.lock" for name in others), others
    ckpt = util.load_torch_file(path)
    assert ckpt["epoch"] >= 2 and ckpt["step"] == 0

    sampled = run_cli("--sample", "--checkpoint", path, "--output_dir", tmp_path,
                      "--num_samples", 4, "--seed", 0)
    assert sampled.returncode == 0, sampled.stderr
    resumed = run_cli("--train", "--resume", "--data_dir", small_data, "--output_dir", tmp_path,
                      "--n_epochs", ckpt["epoch"] + 1)
    assert resumed.returncode == 0, resumed.stderr
    assert util.load_torch_file(path)["epoch"] == ckpt["epoch"] + 1
    # The next save removed whatever temporary file the killed process had left.
    assert [p.name for p in path.parent.iterdir() if p != path] == []


def test_a_process_killed_in_the_middle_of_writing_leaves_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    util.atomic_torch_save({"weights": torch.arange(4.0)}, path)
    old = path.read_bytes()
    # The child writes half a file, then dies as kill -9 would, before the rename.
    crash = (
        "import os, signal, torch, util\n"
        "def half_then_die(obj, f):\n"
        "    f.write(b'PK' * 1000); f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = half_then_die\n"
        f"util.atomic_torch_save({{'weights': torch.zeros(4)}}, {str(path)!r})\n")
    child = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, env=ENV, timeout=WAIT_S)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old
    assert torch.equal(util.load_torch_file(path)["weights"], torch.arange(4.0))
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")


# ---------------------------------------------------------------- non-finite loss

def test_a_diverging_run_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, small_data,
                                                                           good_checkpoint):
    path = tmp_path / CHECKPOINT
    path.parent.mkdir(parents=True)
    path.write_bytes(good_checkpoint.read_bytes())
    before = snapshot(tmp_path)
    result = run_cli("--train", "--overwrite", "--data_dir", small_data, "--output_dir", tmp_path,
                     *TINY_MODEL, "--lr", "1e30", "--n_epochs", 3, "--sample_and_save_frequency", 1)
    assert_one_line_error(result.returncode, result.stderr, "NaN or infinite", str(path))
    assert snapshot(tmp_path) == before


def test_nan_loss_while_resuming_keeps_the_checkpoint(capsys, monkeypatch, run_folder, small_data):
    before = snapshot(run_folder)
    real_loss = vae.VanillaVAE.loss

    def nan_loss(self, *args, **kwargs):
        terms = real_loss(self, *args, **kwargs)
        return {**terms, "loss": terms["loss"] * float("nan")}
    monkeypatch.setattr(vae.VanillaVAE, "loss", nan_loss)
    monkeypatch.setattr(vae.VanillaVAE, "forward", nan_loss)  # training calls the module
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data,
                            "--output_dir", run_folder, "--n_epochs", 2)
    assert_one_line_error(code, err, "NaN or infinite", "keeps the last good weights")
    assert snapshot(run_folder) == before


def test_weights_broken_by_the_last_step_of_an_epoch_are_never_saved(capsys, monkeypatch,
                                                                     run_folder, small_data):
    """The loss is checked before each step; a step that blows up the weights at the very end
    of an epoch shows only in the weights themselves."""
    before = snapshot(run_folder)
    real_step = torch.optim.Adam.step

    def step_then_break(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            next(p for p in self.param_groups[0]["params"] if p.requires_grad).fill_(float("inf"))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_break)
    monkeypatch.setattr(training, "batches_per_epoch", lambda n_images, batch_size: 1)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data,
                            "--output_dir", run_folder, "--n_epochs", 2)
    assert_one_line_error(code, err, "NaN or infinite", "keeps the last good weights")
    assert snapshot(run_folder) == before


# ---------------------------------------------------------------- failed saves

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written_then_disk_full(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 100)
    disk_full()


@pytest.mark.parametrize("where", ["os.replace", "torch.save"])
def test_a_failed_save_says_so_and_leaves_the_previous_checkpoint(capsys, monkeypatch, run_folder,
                                                                  small_data, where):
    before = snapshot(run_folder)
    if where == "os.replace":
        monkeypatch.setattr(util.os, "replace", disk_full)
    else:
        monkeypatch.setattr(torch, "save", half_written_then_disk_full)  # util imports torch lazily
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data,
                            "--output_dir", run_folder, "--n_epochs", 2)
    path = run_folder / CHECKPOINT
    assert_one_line_error(code, err, f"could not save {path}", "No space left on device",
                          "left intact")
    monkeypatch.undo()
    assert snapshot(run_folder) == before  # and no temporary file left behind


# ---------------------------------------------------------------- bad checkpoints

def evil_object(marker):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # would create `marker` when unpickled
    return Evil()


def write_bad_checkpoint(kind, path, good, marker):
    """Write a checkpoint file of the given kind of badness at `path`."""
    good_bytes = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(good_bytes[:len(good_bytes) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "plain tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict without format_version":
        torch.save({"model": {}}, path)
    elif kind == "a newer format version":
        torch.save({**util.load_torch_file(good), "format_version": 99}, path)
    elif kind == "config missing a key":
        ckpt = util.load_torch_file(good)
        del ckpt["config"]["latent_dim"], ckpt["config"]["hidden_dims"]
        torch.save(ckpt, path)
    elif kind == "weights of another shape":
        ckpt = util.load_torch_file(good)
        ckpt["config"]["latent_dim"] = 5
        torch.save(ckpt, path)
    elif kind == "code in a torch file":
        torch.save({"format_version": checkpoint.FORMAT_VERSION, "x": evil_object(marker)}, path)
    elif kind == "code in a raw pickle":
        path.write_bytes(pickle.dumps(evil_object(marker)))
    elif kind == "missing":
        pass
    else:
        raise ValueError(kind)


BAD_CHECKPOINTS = {  # kind -> words the one-line error must contain
    "missing": "checkpoint not found",
    "truncated": "truncated or corrupted",
    "empty": "is not a",
    "random bytes": "is not a",
    "plain tensor": "not a VanVAE checkpoint (no format_version)",
    "dict without format_version": "not a VanVAE checkpoint (no format_version)",
    "a newer format version": "has checkpoint format 99; this VanVAE reads formats 1 and 2",
    "config missing a key": "does not describe a VanVAE model",
    "weights of another shape": "does not describe a VanVAE model",
    "code in a torch file": "refused to load it",
    "code in a raw pickle": "refused to load it",
}


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_changes_nothing(capsys, tmp_path, small_data,
                                                          good_checkpoint, kind, mode):
    path, marker = tmp_path / "given.pt", tmp_path / "MARKER"
    write_bad_checkpoint(kind, path, good_checkpoint, marker)
    before = snapshot(tmp_path)
    flags = ["--sample"] if mode == "--sample" else ["--train", "--resume", "--data_dir", small_data]
    code, _, err = run_main(capsys, *flags, "--checkpoint", path, "--output_dir", tmp_path)
    assert_one_line_error(code, err, BAD_CHECKPOINTS[kind], str(path))
    assert not marker.exists(), "unpickling ran code from the file"
    assert snapshot(tmp_path) == before


def test_a_weights_only_checkpoint_samples_but_does_not_resume(capsys, tmp_path, small_data,
                                                               good_checkpoint):
    ckpt = util.load_torch_file(good_checkpoint)
    path = tmp_path / "weights_only.pt"
    torch.save({key: ckpt[key] for key in ("format_version", "config", "model")}, path)
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data,
                            "--checkpoint", path, "--output_dir", tmp_path)
    assert_one_line_error(code, err, "not the training state to resume", "--sample")
    assert snapshot(tmp_path) == before
    with pytest.raises(util.UserError) as caught:  # as a notebook meets it: in words about values
        checkpoint.resume_state(checkpoint.load(path))
    assert "not the training state to resume" in str(caught.value) and "--" not in str(caught.value)
    code, out, err = run_main(capsys, "--sample", "--checkpoint", path, "--output_dir", tmp_path,
                              "--num_samples", 2)
    assert code == 0, err


@pytest.mark.parametrize("flags, words", [
    (["--train", "--resume", "--dataset", "fashionmnist"], ("error: --dataset fashionmnist: ", "was trained on mnist")),
    (["--sample", "--dataset", "cifar10"], ("error: --dataset cifar10: ", "was trained on mnist")),
    (["--train", "--resume", "--dataset", "mnist", "--image_size", "32"], ("mnist images are 28x28",)),
])
def test_a_checkpoint_that_contradicts_the_flags_is_refused(capsys, run_folder, small_data,
                                                            flags, words):
    before = snapshot(run_folder)
    code, _, err = run_main(capsys, *flags, "--checkpoint", run_folder / CHECKPOINT,
                            "--data_dir", small_data, "--output_dir", run_folder)
    assert_one_line_error(code, err, *words)
    assert snapshot(run_folder) == before


def test_a_checkpoint_of_another_image_shape_is_refused(capsys, tmp_path, small_data):
    model = vae.VanillaVAE(vae.VAEConfig("mnist", (1, 32, 32), latent_dim=4, hidden_dims=(8, 16)))
    path = tmp_path / "shape32.pt"
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "config": model.config.as_dict(),
                "model": model.state_dict()}, path)
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, "--train", "--resume", "--checkpoint", path,
                            "--data_dir", small_data, "--output_dir", tmp_path)
    assert_one_line_error(code, err, "is for (1, 32, 32) images", "give (1, 28, 28)")
    assert snapshot(tmp_path) == before


def test_an_existing_checkpoint_is_not_replaced_without_overwrite(capsys, run_folder, small_data):
    before = snapshot(run_folder)
    code, _, err = run_main(capsys, "--train", "--data_dir", small_data, "--output_dir", run_folder,
                            *TINY_MODEL, "--n_epochs", 1)
    assert_one_line_error(code, err, "already exists", "--resume", "--overwrite")
    assert snapshot(run_folder) == before


# ---------------------------------------------------------------- bad flag values

@pytest.mark.parametrize("flags, words", [
    (["--batch_size", "0"], "--batch_size: must be at least 1"),
    (["--batch_size", "-8"], "--batch_size: must be at least 1"),
    (["--n_epochs", "0"], "--n_epochs: must be at least 1"),
    (["--latent_dim", "0"], "--latent_dim: must be a whole number from 1 to 65536, not 0"),
    (["--num_samples", "0"], "--num_samples: must be at least 1"),
    (["--num_samples", "-1"], "--num_samples: must be at least 1"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "-0.001"], "--lr: must be a positive number"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--lr", "inf"], "--lr: must be a positive number"),
    (["--lr", "abc"], "--lr: 'abc' is not a number"),
    (["--batch_size", "2.5"], "--batch_size: '2.5' is not a whole number"),
    (["--kld_weight", "-1"], "--kld_weight: must be zero or a positive number"),
    (["--hidden_dims", "8", "0"], "--hidden_dims: must be a whole number from 1 to 65536, not 0"),
    (["--sample_and_save_frequency", "0"], "must be at least 1"),
    (["--kl_warmup_epochs", "-1"], "--kl_warmup_epochs: must be zero or more"),
    (["--kl_warmup_epochs", "1.5"], "--kl_warmup_epochs: '1.5' is not a whole number"),
    (["--lr_schedule", "linear"], "--lr_schedule: invalid choice: 'linear'"),
])
def test_a_bad_flag_value_is_one_line_exit_2(capsys, tmp_path, small_data, flags, words):
    code, _, err = run_main(capsys, "--train", "--data_dir", small_data, "--output_dir", tmp_path,
                            *flags)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert snapshot(tmp_path) == {}


def test_hidden_dims_too_deep_for_the_image_size(capsys, tmp_path, small_data):
    code, _, err = run_main(capsys, "--train", "--data_dir", small_data, "--output_dir", tmp_path,
                            "--hidden_dims", "8", "8", "8", "8", "8", "8", "--latent_dim", "4")
    assert_one_line_error(code, err, "--hidden_dims has 6 layers, too deep for 28x28 images")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("mode", ["--train", "--sample"])
def test_an_output_folder_that_cannot_be_created_is_one_line(capsys, tmp_path, small_data,
                                                             good_checkpoint, mode):
    # A path below a plain file fails even for root, for whom permissions never do.
    (tmp_path / "afile").write_text("not a folder")
    flags = ["--checkpoint", good_checkpoint] if mode == "--sample" else [*TINY_MODEL]
    code, _, err = run_main(capsys, mode, *flags, "--data_dir", small_data,
                            "--output_dir", tmp_path / "afile" / "sub")
    assert_one_line_error(code, err, "--output_dir", "cannot create it", f"{tmp_path / 'afile'} is a file")
    assert snapshot(tmp_path) == {Path("afile"): b"not a folder"}


# ---------------------------------------------------------------- bad dataset files

def test_a_truncated_idx_file_is_named(capsys, tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=16, n_test=8)
    idx = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    idx.write_bytes(idx.read_bytes()[:-100])
    code, _, err = run_main(capsys, "--train", "--data_dir", tmp_path / "data",
                            "--output_dir", tmp_path / "out", *TINY_MODEL)
    assert_one_line_error(code, err, f"{idx} is not a readable IDX file", "bytes")
    assert not (tmp_path / "out" / CHECKPOINT).exists()


def test_an_npz_without_the_expected_arrays_is_named(capsys, tmp_path):
    write_dataset("pneumoniamnist", tmp_path / "data", n_train=16, n_test=8)
    npz = tmp_path / "data" / "pneumoniamnist.npz"
    arrays = dict(np.load(npz))
    np.savez(npz, **{k: v for k, v in arrays.items() if not k.startswith("train_")})
    code, _, err = run_main(capsys, "--train", "--dataset", "pneumoniamnist",
                            "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out",
                            *TINY_MODEL)
    assert_one_line_error(code, err, f"could not read {npz}")


def test_a_cifar_batch_that_does_not_unpickle_is_named(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(data.TORCHVISION_CLASSES, "cifar10", NoMd5CIFAR10)  # generated files
    write_dataset("cifar10", tmp_path / "data", n_train=20, n_test=8)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(b"this is not a pickle")
    code, _, err = run_main(capsys, "--train", "--dataset", "cifar10",
                            "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out",
                            *TINY_MODEL)
    assert_one_line_error(code, err, f"could not read {batch}")


# ---------------------------------------------------------------- the same, as real processes

@pytest.mark.parametrize("case", ["code in a checkpoint", "truncated checkpoint", "lr nan",
                                  "truncated IDX file", "output under a file"])
def test_bad_input_in_a_real_process_is_one_line_exit_2(tmp_path, small_data, good_checkpoint, case):
    marker = tmp_path / "MARKER"
    args = ["--train", "--data_dir", small_data, "--output_dir", tmp_path / "out", *TINY_MODEL]
    if case == "code in a checkpoint":
        torch.save({"format_version": 1, "x": evil_object(marker)}, tmp_path / "evil.pt")
        args = ["--sample", "--checkpoint", tmp_path / "evil.pt", "--output_dir", tmp_path / "out"]
    elif case == "truncated checkpoint":
        (tmp_path / "t.pt").write_bytes(good_checkpoint.read_bytes()[:5000])
        args += ["--resume", "--checkpoint", tmp_path / "t.pt"]
    elif case == "lr nan":
        args += ["--lr", "nan"]
    elif case == "truncated IDX file":
        write_dataset("mnist", tmp_path / "data", n_train=16, n_test=8)
        idx = tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
        idx.write_bytes(idx.read_bytes()[:50])
        args[2] = tmp_path / "data"
    else:
        (tmp_path / "afile").write_text("")
        args[4] = tmp_path / "afile" / "sub"
    before = snapshot(tmp_path)
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- many samples

def peak_mib_of_sampling(checkpoint, output_dir, num_samples):
    """Peak resident memory of one --sample run from the Riemannian sampler (the default after a
    long run, and the one that draws through HMC), measured by a wrapper process so that
    ru_maxrss (RUSAGE_CHILDREN) is that run's alone."""
    command = [sys.executable, "VanVAE.py", "--sample", "--prior", "riemannian", "--checkpoint", str(checkpoint),
               "--output_dir", str(output_dir), "--num_samples", str(num_samples), "--seed", "0"]
    wrapper = ("import resource, subprocess, sys\n"
               "code = subprocess.run(sys.argv[1:]).returncode\n"
               "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("peak_kib")[1]) / 1024


@pytest.mark.long
def test_100000_samples_arrive_whole_in_small_memory(tmp_path, good_checkpoint):
    few_mib = peak_mib_of_sampling(good_checkpoint, tmp_path, 16)
    many_mib = peak_mib_of_sampling(good_checkpoint, tmp_path, 100000)
    print(f"peak resident memory of --sample: {few_mib:.0f} MiB for 16 samples, "
          f"{many_mib:.0f} MiB for 100000")
    stem = Path(checkpoint.run_dir(tmp_path, good_checkpoint)) / "riemannian_prior_samples_n100000_seed0"
    samples = util.load_torch_file(f"{stem}.pt", "sample file")
    assert samples.shape == (100000, 1, 28, 28) and samples.dtype == torch.uint8
    png = Path(f"{stem}.png")
    assert png.stat().st_size < 2_000_000
    with Image.open(png) as grid:  # 256 images: 16 x 16 tiles of 28 px, enlarged to 56, 2 px padding
        assert grid.size == (16 * 58 + 2, 16 * 58 + 2)
    # The samples themselves are 75 MiB of uint8; the libraries' own footprint is the rest.
    assert many_mib - few_mib < 256


def test_every_remedy_a_lower_layer_names_is_worded_by_the_command_line():
    """Lower layers name a way out by key (util.UserError's remedy); VanVAE.REMEDIES words each
    with its flags. A key or a value missing from the table would end a run in a traceback."""
    import re
    import string
    named = {}
    for source in Path(VanVAE.__file__).parent.glob("*.py"):
        for key, values in re.findall(r'remedy=\("(\w+)", \{([^}]*)\}\)', source.read_text()):
            named.setdefault(key, set()).update(re.findall(r'"(\w+)":', values))
    assert named and set(named) == set(VanVAE.REMEDIES)  # each named, and none worded for nothing
    for key, values in named.items():
        fields = {field for _, field, _, _ in string.Formatter().parse(VanVAE.REMEDIES[key]) if field}
        assert fields == values, key
        assert "--" in VanVAE.REMEDIES[key], key
    error = util.BadValue("dataset", "mnist: x.pt was trained on cifar10").extended(
        "; and more", remedy=("refit_prior", {"prior": "gmm", "path": "x.pt"}))
    assert isinstance(error, util.BadValue) and "--" not in str(error)
    assert VanVAE.error_words(error) == ("--dataset mnist: x.pt was trained on cifar10; and more; "
                                         "fit it again with --fit_prior gmm --checkpoint x.pt")
