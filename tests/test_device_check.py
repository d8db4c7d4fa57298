"""benchmarks/device_check.py's dry run: every step of the prepared GPU check on the CPU with
tiny sizes, so the first minutes someone has a GPU are spent measuring, not mending the script."""

import subprocess
import sys

import pytest
import torch

from fakedata import gzip_fashion_into
from helpers import ENV, ROOT, WAIT_S


@pytest.mark.long
def test_the_device_checks_dry_run_passes_every_step_and_leaves_samples_to_score(tmp_path):
    gzip_fashion_into(tmp_path / "gz", n_train=600, n_test=50)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--dry-run", "--out", tmp_path / "out",
                           "--fashion_gz", tmp_path / "gz", "--wheels", tmp_path / "no_wheels",
                           "--work", tmp_path / "work"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=WAIT_S)
    log = (tmp_path / "out" / "device_check.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "every step passed" in log
    for step in ("machine", "wheels", "data", "device tests", "bench", "train, fit, sample", "torchrun and resume"):
        assert f"== {step} (" in log
    assert " passed" in log.split("== device tests")[1].split("== bench")[0]  # the device tests ran, not skipped
    for prior in ("riemannian", "gmm", "standard"):
        samples = torch.load(tmp_path / "out" / f"samples_{prior}.pt", weights_only=True)
        assert samples.shape == (100, 1, 28, 28) and samples.dtype == torch.uint8
