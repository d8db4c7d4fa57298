import sys
from pathlib import Path

import pytest

# Tests import the project's flat modules (data, util, ...) and tests/fakedata.py by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _mnist(tmp_path_factory, name, n_train):
    from fakedata import write_dataset  # importable once the path above is set
    folder = tmp_path_factory.mktemp(name)
    write_dataset("mnist", folder, n_train=n_train, n_test=16)
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 steps of 8 images per epoch."""
    return _mnist(tmp_path_factory, "small_data", 64)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """300 steps per epoch: seconds long, so a signal sent as an epoch begins lands mid-epoch."""
    return _mnist(tmp_path_factory, "long_data", 2400)


# The long tier: tests of more than about 10 s alone on the developers' 2-core CPU (pytest
# --durations), mostly whole training runs in real processes (the soak, the bit-identical resumes
# after a real signal, a killed torchrun node) and the sweep of every checkpoint field. The
# README's test command leaves them out (-m "not long"), so the everyday tier stays under 10
# minutes on a slower 2-core CPU as well; .ci/run runs both tiers.
def pytest_configure(config):
    config.addinivalue_line("markers", "long: the long tier; run with pytest -m long (.ci/run runs it)")
    config.addinivalue_line("markers", "device: the accelerator's paths (tests/test_device.py), run on "
                                       "VANVAE_TEST_DEVICE by benchmarks/device_check.py")
