"""Training under torchrun: two gloo processes on the CPU must train as one process does.

Real torchrun runs on 127.0.0.1 and two-process collectives started with torch.multiprocessing;
every launch has a bounded timeout, so a hang fails the test instead of stalling CI."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint as checkpoint_module
import twoprocess
import VanVAE
from fakedata import write_dataset
from helpers import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
LR = 2e-4
# Gaussian decoder: both kinds of noise (dequantisation and reparameterisation) are exercised.
# fp32: bf16 rounds differently when the batch is split, so only fp32 can match to 1e-5.
TINY = [*TINY_MODEL, "--seed", "5",
        "--recon_loss", "gaussian", "--num_samples", "4", "--lr", str(LR), "--precision", "fp32"]
N_TRAIN = 32  # four steps of a global batch of 8 per epoch
LAUNCH_TIMEOUT_S = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2):
    """Run VanVAE.py under torchrun on this machine only; kill every process it started if it
    runs past the timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--max_restarts=0",
           str(REPO / "VanVAE.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def checkpoint(output_dir):
    return Path(output_dir) / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch of the same tiny training, in one process and under torchrun in two."""
    tmp = tmp_path_factory.mktemp("distributed")
    write_dataset("mnist", tmp / "data", n_train=N_TRAIN, n_test=8)
    flags = ["--train", "--data_dir", tmp / "data", "--n_epochs", "1", *TINY]
    assert VanVAE.main([*map(str, flags), "--output_dir", str(tmp / "one")]) == 0
    two = torchrun(*flags, "--output_dir", tmp / "two")
    assert two.returncode == 0, two.stderr
    return tmp, flags, two


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def bias_feeding_batchnorm(state, key):
    """A conv bias straight before BatchNorm, or that BatchNorm's running mean.

    BatchNorm subtracts the batch mean, so such a bias has no true gradient: Adam turns the
    rounding noise in its gradient into steps of about +-lr (at most 1.03 lr in the first 8
    steps), different for one and two processes. These tensors may differ by up to 2.1 lr per
    step; every other tensor must agree to float precision."""
    if key.endswith(".0.bias"):
        return key[:-len(".0.bias")] + ".1.running_mean" in state
    return key.endswith(".running_mean")


def assert_same_training(one_path, two_path, n_steps):
    one, two = load(one_path), load(two_path)
    assert one.keys() == two.keys() and one["model"].keys() == two["model"].keys()
    assert (one["epoch"], one["step"]) == (two["epoch"], two["step"])
    for key, expected in one["model"].items():
        got = two["model"][key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        atol = 2.1 * LR * n_steps if bias_feeding_batchnorm(one["model"], key) else 1e-5
        assert torch.allclose(got.double(), expected.double(), rtol=1e-4, atol=atol), \
            f"{key}: max difference {(got.double() - expected.double()).abs().max():.3g}"
    for row_one, row_two in zip(one["history"], two["history"], strict=True):
        assert row_two["train_loss"] == pytest.approx(row_one["train_loss"], rel=1e-6)
        # Evaluation uses the running means, which carry those biases' jitter.
        assert row_two["test_loss"] == pytest.approx(row_one["test_loss"], rel=1e-4)


def test_two_processes_train_like_one(runs):
    tmp, _, _ = runs
    assert_same_training(checkpoint(tmp / "one"), checkpoint(tmp / "two"), n_steps=N_TRAIN // 8)


def test_two_processes_binarise_as_one_does(runs):
    """Each process takes its rows of one global batch's binarisation, so the images are the
    same as one process would draw."""
    tmp, flags, _ = runs
    binarized = [*flags, "--binarize", "--recon_loss", "bernoulli"]  # binary pixels need a Bernoulli decoder
    assert VanVAE.main([*map(str, binarized), "--output_dir", str(tmp / "bin_one")]) == 0
    two = torchrun(*binarized, "--output_dir", tmp / "bin_two")
    assert two.returncode == 0, two.stderr
    assert_same_training(checkpoint(tmp / "bin_one"), checkpoint(tmp / "bin_two"), n_steps=N_TRAIN // 8)


def test_a_user_error_under_torchrun_is_printed_once(runs):
    tmp, flags, _ = runs
    again = torchrun(*flags, "--output_dir", tmp / "two")  # its checkpoint exists: refused
    assert again.returncode != 0
    assert again.stderr.count("VanVAE.py: error") == 1 and "already exists" in again.stderr, again.stderr


def test_only_rank_zero_prints_and_writes(runs):
    tmp, _, two = runs
    assert two.stdout.count("epoch 1/1 ") == 1 and two.stdout.count("done: ") == 1
    written = sorted(p.name for p in (tmp / "two").rglob("*") if p.is_file())
    assert written == sorted(p.name for p in (tmp / "one").rglob("*") if p.is_file())
    assert not [name for name in written if name.startswith(".tmp")]


def test_checkpoint_from_two_processes_samples_in_one(runs, capsys):
    tmp, _, _ = runs
    out = tmp / "sampled"
    code = VanVAE.main(["--sample", "--checkpoint", str(checkpoint(tmp / "two")), "--num_samples", "4",
                        "--seed", "1", "--output_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    run = Path(checkpoint_module.run_dir(out, checkpoint(tmp / "two")))
    samples = load(run / "gmm_prior_samples_n4_seed1.pt")  # the best it holds after a short run, by default
    assert samples.dtype == torch.uint8 and samples.shape == (4, 1, 28, 28)
    assert (run / "gmm_prior_samples_n4_seed1.png").is_file()


def test_resume_under_torchrun_continues_like_one_process(runs):
    tmp, flags, _ = runs
    for name in ("one", "two"):
        shutil.copytree(tmp / name, tmp / f"{name}_resumed")
    more = list(flags)
    more[more.index("--n_epochs") + 1] = "2"
    assert VanVAE.main([*map(str, more), "--resume", "--output_dir", str(tmp / "one_resumed")]) == 0
    two = torchrun(*more, "--resume", "--output_dir", tmp / "two_resumed")
    assert two.returncode == 0, two.stderr
    assert_same_training(checkpoint(tmp / "one_resumed"), checkpoint(tmp / "two_resumed"),
                         n_steps=2 * N_TRAIN // 8)


def test_batch_that_does_not_split_over_the_processes_is_a_user_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = VanVAE.main(["--train", "--batch_size", "7", "--data_dir", str(tmp_path),
                        "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "multiple of 2" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- two processes in-process

def spawn_two(worker, *args, timeout_s=120):
    """Run worker(rank, *args) in two processes joined in a gloo group; re-raise a failure."""
    context = mp.start_processes(twoprocess.join_group, args=(worker, free_port(), *args), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two-process test did not finish within {timeout_s} s")


def test_batchnorm_statistics_cover_the_global_batch():
    spawn_two(twoprocess.batchnorm_worker)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    spawn_two(twoprocess.signal_on_one_rank_worker, str(tmp_path))
    assert all((tmp_path / f"rank{r}.done").exists() for r in (0, 1))
    assert (tmp_path / "ckpt.pt").is_file()


def test_a_failed_write_on_rank_zero_stops_every_rank():
    spawn_two(twoprocess.failed_write_worker)


# ---------------------------------------------------------------- two machines, tested on one

def start_node(node_rank, port, *args):
    """One torchrun launch as machine `node_rank` of two, one process each, meeting at port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
           "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "--max_restarts=0",
           str(REPO / "VanVAE.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc):
    try:
        return proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"a node did not finish within {LAUNCH_TIMEOUT_S} s")


def test_two_nodes_train_like_one_process(runs):
    tmp, flags, _ = runs
    port = free_port()
    nodes = [start_node(rank, port, *flags, "--output_dir", tmp / "nodes", "--threads", "1") for rank in (0, 1)]
    outputs = [finish(node) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[0][0].count("done: ") == 1 and "done: " not in outputs[1][0]  # rank 0 speaks
    assert_same_training(checkpoint(tmp / "one"), checkpoint(tmp / "nodes"), n_steps=N_TRAIN // 8)


def kill_node(node):
    """SIGKILL a node as a lost machine dies: torchrun's agent and the workers it started (in
    their own sessions, so killing the agent's group alone would leave them running)."""
    workers = subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True, text=True).stdout.split()
    os.killpg(node.pid, signal.SIGKILL)
    for pid in map(int, workers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.communicate()


@pytest.mark.long
@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_node_stops_the_other_with_one_line_and_an_intact_checkpoint(long_data, tmp_path, killed):
    port, out = free_port(), tmp_path / "out"
    flags = ["--train", "--dataset", "mnist", "--data_dir", long_data, "--output_dir", out, "--n_epochs", 50,
             "--sample_and_save_frequency", 1, "--threads", 1, *TINY]
    nodes = [start_node(rank, port, *flags) for rank in (0, 1)]
    try:
        for line in nodes[0].stdout:  # rank 0 speaks: epoch 1 ended and was saved
            if line.startswith("saved "):
                break
        time.sleep(0.5)  # into epoch 2, mid-step
        kill_node(nodes[killed])
        survivor = nodes[1 - killed]
        start = time.monotonic()
        _, err = finish(survivor)
        seconds = time.monotonic() - start
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
    assert survivor.returncode != 0 and seconds < 60, (seconds, err[-2000:])
    ours = [line for line in err.splitlines() if line.startswith("VanVAE.py:")]
    assert len(ours) == 1 and "lost contact with another process of this torchrun job" in ours[0], err[-2000:]
    assert "resume with: torchrun <its flags> VanVAE.py --train --resume" in ours[0]
    assert f"[rank{1 - killed}]: Traceback" not in err  # no traceback of ours; torchrun's own report stays
    path = checkpoint_module.default_path(out, "mnist")
    saved = checkpoint_module.load(path)  # the last save loads whole
    assert checkpoint_module.resume_state(saved).epoch >= 1
    resume = ["--train", "--resume", "--checkpoint", path, "--data_dir", long_data, "--output_dir", out,
              "--n_epochs", checkpoint_module.resume_state(saved).epoch + 1, "--threads", 2, "--precision", "fp32"]
    resumed = subprocess.run([sys.executable, str(REPO / "VanVAE.py"), *map(str, resume)], cwd=REPO,
                             capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
