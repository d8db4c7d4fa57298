"""The faults a real user meets (issue: nothing lost, nothing silent), each made real where this
machine allows: a full filesystem (a tmpfs of a few KiB), a second process on one checkpoint,
Ctrl-C while the libraries import, a folder where a file belongs, a killed writer's leftovers."""

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import checkpoint
import util
import VanVAE
from fakedata import write_dataset
from helpers import (
    CHECKPOINT,
    ENV,
    ROOT,
    TINY_MODEL,
    WAIT_S,
    assert_one_line_error,
    run_cli,
    run_main,
    snapshot,
    start_cli,
    wait_for_lines,
)


def train_flags(data_dir, out, *more):
    return ["--train", "--data_dir", data_dir, "--output_dir", out, *TINY_MODEL, "--seed", 0, *more]


# ---------------------------------------------------------------- a real full disk

@pytest.fixture
def small_filesystem(tmp_path):
    """mount(kib): a tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(kib):
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here to fill ({done.stderr.strip() or 'not root'})")
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def tiny_filesystem(small_filesystem):
    """64 KiB: a checkpoint of the small model (about 200 KiB) cannot fit."""
    return small_filesystem(64)


def test_a_real_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, small_data, tiny_filesystem):
    result = run_cli(*train_flags(small_data, tiny_filesystem, "--n_epochs", 1))
    # "o space left": torch's zip writer hides the OSError, which VanVAE words as the OS does.
    assert_one_line_error(result.returncode, result.stderr, "could not save", "o space left on device")
    models = tiny_filesystem / CHECKPOINT.parent
    assert not models.exists() or list(models.iterdir()) == []  # no half file, no temporary


@pytest.mark.long
def test_a_full_disk_for_the_pictures_only_warns_and_training_goes_on(tmp_path, small_data, small_filesystem):
    """The checkpoint goes to a roomy disk, the run folder (pictures, CSV) to a full one."""
    disk = small_filesystem(1024)
    ckpt = tmp_path / "roomy" / "model.pt"
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 4096))  # leave too little for a PNG
    run = Path(checkpoint.run_dir(disk, ckpt))
    result = run_cli(*train_flags(small_data, disk, "--n_epochs", 2, "--checkpoint", ckpt,
                                  "--sample_and_save_frequency", 1))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line]
    assert len(warnings) == 2 and all("warning: could not write the pictures" in w for w in warnings), warnings
    assert "Traceback" not in result.stderr
    assert util.load_torch_file(ckpt)["epoch"] == 2
    filler.unlink()  # room again: the next save writes every picture and the whole history
    result = run_cli("--train", "--resume", "--checkpoint", ckpt, "--data_dir", small_data,
                     "--output_dir", disk, "--n_epochs", 3, "--sample_and_save_frequency", 1)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (run / "history.csv").read_text().count("\n") == 4  # header and three epochs


def test_a_picture_path_taken_by_a_folder_only_warns(capsys, tmp_path, small_data):
    run = tmp_path / "runs" / "VanillaVAE_mnist"
    (run / "samples_epoch_0001.png").mkdir(parents=True)  # a folder where the grid would go
    code, out, err = run_main(capsys, *train_flags(small_data, tmp_path, "--n_epochs", 2,
                                                   "--sample_and_save_frequency", 1))
    assert code == 0 and "Traceback" not in err, err
    assert err.count("warning: could not write the pictures") == 1
    assert (run / "samples_epoch_0002.png").is_file() and "done:" in out


# ---------------------------------------------------------------- two runs, one checkpoint

@pytest.mark.long
def test_a_second_run_on_a_checkpoint_in_use_is_refused(tmp_path, long_data):
    first = start_cli(*train_flags(long_data, tmp_path, "--n_epochs", 3))
    try:
        wait_for_lines(first, "mnist: ")  # training has begun: the first run owns the checkpoint
        second = run_cli(*train_flags(long_data, tmp_path, "--n_epochs", 1, "--overwrite"))
        assert_one_line_error(second.returncode, second.stderr, "in use by another VanVAE run",
                              f"process {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=WAIT_S)
    assert first.returncode == 130  # stopped by us, with its state saved: not disturbed


def test_two_checkpoints_keep_their_own_run_folders(capsys, tmp_path, small_data):
    for name in ("a", "b"):
        assert run_main(capsys, *train_flags(small_data, tmp_path, "--n_epochs", 1, "--checkpoint",
                                             tmp_path / name / "model.pt"))[0] == 0
    runs = {Path(checkpoint.run_dir(tmp_path, tmp_path / name / "model.pt")) for name in ("a", "b")}
    assert len(runs) == 2 and all((run / "history.csv").is_file() for run in runs)


# ---------------------------------------------------------------- --resume and its flags

@pytest.fixture
def one_epoch(capsys, tmp_path, small_data):
    assert run_main(capsys, *train_flags(small_data, tmp_path, "--n_epochs", 1))[0] == 0
    return tmp_path


@pytest.mark.parametrize("flag, value, recorded", [
    ("--lr", "0.01", "0.0002"), ("--batch_size", "16", "8"), ("--kld_weight", "0.5", "1.0"),
    ("--latent_dim", "8", "4"), ("--seed", "7", "0"), ("--recon_loss", "bernoulli", "gaussian"),
    ("--binarize", None, "False"), ("--lr_schedule", "cosine", "constant"), ("--kl_warmup_epochs", "1", "0"),
])
def test_resume_refuses_a_flag_that_contradicts_the_checkpoint(capsys, one_epoch, small_data, flag, value,
                                                              recorded):
    before = snapshot(one_epoch)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data, "--output_dir", one_epoch,
                            "--n_epochs", 2, flag, *([value] if value else []))
    assert_one_line_error(code, err, f"{flag}", "contradicts", f"trained with {recorded}")
    assert snapshot(one_epoch) == before


def test_resume_accepts_a_flag_that_agrees_and_records_what_it_used(capsys, one_epoch, small_data):
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data, "--output_dir", one_epoch,
                            "--n_epochs", 2, "--batch_size", 8, "--lr", "0.0002")
    assert code == 0, err
    flags = util.load_torch_file(one_epoch / CHECKPOINT)["args"]
    assert (flags["batch_size"], flags["lr"], flags["latent_dim"], flags["seed"]) == (8, 2e-4, 4, 0)


def test_resume_of_a_finished_run_says_how_to_train_longer(capsys, one_epoch, small_data):
    before = snapshot(one_epoch)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data, "--output_dir", one_epoch,
                            "--n_epochs", 1)
    assert_one_line_error(code, err, "has finished 1 epoch", "--n_epochs above 1")
    assert snapshot(one_epoch) == before


def test_resume_on_other_data_is_refused(capsys, one_epoch, tmp_path_factory):
    other = tmp_path_factory.mktemp("other_data")
    write_dataset("mnist", other, n_train=48, n_test=16)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", other, "--output_dir", one_epoch,
                            "--n_epochs", 2)
    assert_one_line_error(code, err, "was trained on 64 train / 16 test", "48 / 16")


def test_the_printed_resume_command_repeats_how_the_run_computes():
    args = VanVAE.build_parser().parse_args(["--train", "--threads", "1", "--precision", "fp32",
                                             "--no-channels_last", "--checkpoint", "c.pt",
                                             "--prior_components", "7", "--prior_codes", "0"])
    words = VanVAE.resume_command(args, "c.pt").split()
    # how it computes, and the prior it fits after its last epoch
    for flag in ("--threads 1", "--precision fp32", "--no-channels_last", "--prior_components 7",
                 "--prior_codes 0"):
        assert flag in " ".join(words)
    assert "--compile" not in words and "--no-compile" not in words  # left at its default


# ---------------------------------------------------------------- what cannot train or save

@pytest.mark.parametrize("flags, words", [
    (["--batch_size", "1"], "BatchNorm needs at least 2"),
    (["--resume", "--overwrite"], "give one"),
])
def test_what_cannot_train_is_refused_before_any_work(capsys, tmp_path, small_data, flags, words):
    code, _, err = run_main(capsys, "--train", "--data_dir", small_data, "--output_dir", tmp_path,
                            *TINY_MODEL[:5], *flags)
    assert_one_line_error(code, err, words)
    assert snapshot(tmp_path) == {}


def test_a_checkpoint_path_that_is_a_folder_is_refused_before_any_work(capsys, tmp_path, small_data):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for mode in (["--train", "--overwrite"], ["--sample"], ["--eval"]):
        code, _, err = run_main(capsys, *mode, "--checkpoint", folder, "--data_dir", small_data,
                                "--output_dir", tmp_path)
        assert_one_line_error(code, err, "is a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["a_folder"]


def test_a_symlink_loop_is_named_as_such(capsys, tmp_path):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    code, _, err = run_main(capsys, "--sample", "--checkpoint", loop, "--output_dir", tmp_path)
    assert_one_line_error(code, err, "symbolic link")


def test_no_empty_folders_are_left_by_a_run_that_could_not_start(capsys, tmp_path):
    code, _, err = run_main(capsys, "--train", "--data_dir", tmp_path / "nothing_here", "--dataset", "svhn",
                            "--output_dir", tmp_path / "out", "--n_epochs", 1)
    assert code == 2, err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


# ---------------------------------------------------------------- Ctrl-C from the first instant

def test_flags_are_checked_without_importing_torch():
    probe = ("import sys, VanVAE\n"
             "VanVAE.build_parser().parse_args(['--train', '--dataset', 'fashionmnist'])\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'medmnist') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=WAIT_S)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_libraries_import_stops_the_run(tmp_path, small_data, signum):
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "VanVAE.py",
                             *map(str, train_flags(small_data, tmp_path, "--n_epochs", 50))],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # -X importtime reports each import on stderr: wait for torch's to begin, then interrupt.
    seen = b""
    while b"torch" not in seen:
        chunk = proc.stderr.read1(65536)
        assert chunk, seen[-2000:]
        seen += chunk
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=WAIT_S)
    lines = [line for line in err.decode().splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 130, lines
    assert lines == [f"VanVAE.py: --train stopped by {signal.Signals(signum).name}; no epoch had ended, "
                     "so nothing was saved"], lines
    assert not (tmp_path / CHECKPOINT).exists()


# ---------------------------------------------------------------- files as the user expects them

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        util.atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "f.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "f.pt").stat().st_mode & 0o777 == mode


def test_a_save_removes_the_temporaries_of_dead_writers_only(tmp_path):
    host = util._HOST
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".tmp-{host}-{dead}-abc.pt"
    alive = tmp_path / f".tmp-{host}-{os.getpid()}-def.pt"
    elsewhere = tmp_path / f".tmp-{uuid.uuid4().hex[:8]}x-{dead}-ghi.pt"  # another machine's
    for path in (stale, alive, elsewhere):
        path.write_bytes(b"half")
    util.atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "f.pt")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([alive.name, elsewhere.name, "f.pt"])
