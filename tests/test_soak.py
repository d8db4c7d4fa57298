"""A soak on tiny data: hundreds of epochs with a save every epoch, then a thousand --sample calls,
in one process: its resident memory and open file descriptors stay flat, and no temporary file
is left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakedata import write_dataset
from helpers import TINY_MODEL

pytestmark = pytest.mark.long  # minutes of tiny epochs: the long tier (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
# The caches fill over the first ~200 saves (measured below), so the first reading comes after
# WARM_EPOCHS and the flat stretch measured is the 150 epochs after it. (A first reading at epoch
# 150 measured part of the filling: +27 to +33 MiB alone, at session 5's code and at this one.)
WARM_EPOCHS, EPOCHS, SAMPLE_CALLS = 200, 350, 1000

SOAK = """
import json, os, sys
import VanVAE

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def open_fds():
    return len(os.listdir("/proc/self/fd"))

data, out, warm, epochs, calls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tiny = json.loads(sys.argv[6])
readings = []
# The first `warm` epochs warm every cache (matplotlib's and Pillow's text caches fill over the
# first ~200 saves, measured: +25 MiB between epochs 50 and 200, +0 between 200 and 300); the rest
# must not grow.
for stop in (warm, epochs):
    resume = ["--resume"] if readings else []
    assert VanVAE.main(["--train", *resume, "--data_dir", data, "--output_dir", out, "--n_epochs", str(stop),
                        "--sample_and_save_frequency", "1", *tiny]) == 0
    readings.append(("train", stop, rss_mib(), open_fds()))
ckpt = os.path.join(out, "models", "VanillaVAE", "VanillaVAE_mnist.pt")
for call in range(1, calls + 1):
    assert VanVAE.main(["--sample", "--checkpoint", ckpt, "--output_dir", out, "--num_samples", "4",
                        "--seed", str(call % 7)]) == 0
    if call in (calls // 4, calls):
        readings.append(("sample", call, rss_mib(), open_fds()))
print("READINGS " + json.dumps(readings))
"""


def test_hundreds_of_saves_and_a_thousand_samples_keep_memory_and_descriptors_flat(tmp_path):
    write_dataset("mnist", tmp_path / "data", n_train=16, n_test=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SOAK, str(tmp_path / "data"), str(tmp_path / "out"),
                             str(WARM_EPOCHS), str(EPOCHS), str(SAMPLE_CALLS),
                             json.dumps([*TINY_MODEL, "--seed", "0", "--threads", "1"])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    readings = json.loads(result.stdout.split("READINGS ", 1)[1])
    print("soak (phase, count, resident MiB, open fds):", readings)
    (_, _, train_early, fds_early), (_, _, train_late, fds_late) = readings[:2]
    (_, _, sample_early, fds_s_early), (_, _, sample_late, fds_s_late) = readings[2:]
    assert train_late - train_early < 25, readings  # MiB over 150 epochs and saves
    assert sample_late - sample_early < 25, readings  # MiB over 750 --sample calls
    assert fds_late == fds_early and fds_s_late == fds_s_early, readings
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".lock")]
    assert leftovers == []
