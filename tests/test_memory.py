"""util.keep_freed_memory: the large blocks a decoding pass frees are reused by the next pass,
not returned to the kernel and faulted in afresh (bench.py measures the time this saves)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DECODE = """
import resource, sys
import torch
import util, vae
if sys.argv[1] == "keep":
    assert util.keep_freed_memory()
torch.manual_seed(0)
model = vae.VanillaVAE(vae.VAEConfig("mnist", (1, 28, 28))).eval()  # the default network
z = torch.randn(256, 128)
def step():
    with torch.no_grad():
        model.decode(z)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode):
    result = subprocess.run([sys.executable, "-c", DECODE, mode], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_decoding_passes_reuse_freed_memory_instead_of_faulting_it_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    print(f"page faults over 10 decodings of 256 samples: {default} by default, {kept} kept")
    assert kept * 10 < default
