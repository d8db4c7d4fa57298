"""What many test files share: running the command line (in this process or as a real one),
reading its output, asserting the one-line error, comparing saved states, and the tiny model
every CLI test trains (a few seconds of CPU, real files)."""

import fcntl
import os
import pty
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import VanVAE
from fakedata import write_dataset

ROOT = Path(__file__).resolve().parents[1]
# The tiny model of every CLI test: two conv layers, 4 latent dimensions, 8 images a step.
TINY_MODEL = ["--hidden_dims", "8", "16", "--latent_dim", "4", "--batch_size", "8"]
# One thread: quick on a shared machine, and the same arithmetic in every process compared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CHECKPOINT = Path("models", "VanillaVAE", "VanillaVAE_mnist.pt")
WAIT_S = 300  # bound on any wait for a child process; never reached when things work


def run_cli(*args, cwd=ROOT):
    """VanVAE.py as a real process started in `cwd`: its exit status, stdout and stderr."""
    return subprocess.run([sys.executable, str(ROOT / "VanVAE.py"), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=WAIT_S)


def start_cli(*args):
    return subprocess.Popen([sys.executable, "VanVAE.py", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(proc, prefix, count=1):
    """Read the child's stdout until `count` lines starting with `prefix` have appeared.

    Lines the loop prints itself mark points where the signal handlers are surely installed;
    a bounded wait on them replaces any sleep."""
    wait_for_text(proc, proc.stdout.fileno(), "\n" + prefix, count, start=b"\n")


def wait_for_text(proc, fd, text, count=1, start=b""):
    """Read fd until `text` has appeared `count` times; return everything read."""
    buffer = start
    while buffer.decode(errors="replace").count(text) < count:
        ready, _, _ = select.select([fd], [], [], WAIT_S)
        chunk = read_or_eof(fd) if ready else b""
        if not chunk:
            proc.kill()
            raise AssertionError(f"child ended or stalled before printing {text!r}: {buffer!r}")
        buffer += chunk
    return buffer


def read_or_eof(fd):
    try:
        return os.read(fd, 65536)
    except OSError:  # a pty whose other end has closed reads as EIO
        return b""


def start_cli_on_a_terminal(*args):
    """Start the CLI with stderr on a pseudo-terminal, so it draws its progress bar: the bar
    appears as an epoch begins, after the signal handlers are in place."""
    controller, terminal = pty.openpty()
    # 24 x 80: tqdm draws nothing on a terminal zero columns wide, which is what openpty gives.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "VanVAE.py", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    return proc, controller


def run_main(capsys, *args):
    """VanVAE.main in this process: (exit status, stdout, stderr). An uncaught exception (what
    a user would see as a traceback) fails the test by propagating."""
    try:
        code = VanVAE.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse rejects a flag value
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("VanVAE.py: error:"), err
    for word in words:
        assert word in lines[0], err


def snapshot(folder):
    """Every file under folder with its bytes, so a test can say nothing was written."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_same_training_state(a, b):
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"] == 0
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert_nested_equal(a["optimizer"], b["optimizer"])
    assert torch.equal(a["rng"]["noise"], b["rng"]["noise"])
    assert torch.equal(a["rng"]["shuffle_at_epoch_start"], b["rng"]["shuffle_at_epoch_start"])
    timing = ("seconds", "train_images_per_second")
    assert [{k: v for k, v in row.items() if k not in timing} for row in a["history"]] == \
           [{k: v for k, v in row.items() if k not in timing} for row in b["history"]]


def assert_nested_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


def resume_command_from(err):
    """The command the stop message tells the user to run, as argv for this interpreter."""
    words = shlex.split(err.split("Resume with: ", 1)[1].splitlines()[0])
    assert words[:2] == ["python", "VanVAE.py"]
    return words[2:]


def train_tiny(folder, *flags, n_train=48, n_test=16):
    """One epoch of a tiny model on generated MNIST in folder/data, with its automatic gmm
    prior; returns the checkpoint's path."""
    write_dataset("mnist", folder / "data", n_train=n_train, n_test=n_test)
    assert VanVAE.main(["--train", "--data_dir", str(folder / "data"), "--output_dir", str(folder),
                        "--n_epochs", "1", *TINY_MODEL, "--threads", "1", *map(str, flags)]) == 0
    return folder / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"


@pytest.fixture(autouse=True)
def one_thread():
    """Imported into a test module, runs each of its tests on one thread: quick on a shared
    machine, and the same arithmetic in every process compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sigint_in_epoch_2(*args):
    """Start the CLI on a terminal, send SIGINT once epoch 2's bar (300 steps) is up, and
    return what the terminal showed, carriage returns as newlines; it must stop with 130."""
    proc, terminal = start_cli_on_a_terminal(*args)
    shown = wait_for_text(proc, terminal, "epoch 2/2")
    proc.send_signal(signal.SIGINT)
    while chunk := read_or_eof(terminal):
        shown += chunk
    os.close(terminal)
    proc.communicate(timeout=WAIT_S)
    err = shown.decode(errors="replace").replace("\r", "\n")
    assert proc.returncode == 130, err
    return err
