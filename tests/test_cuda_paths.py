"""The CUDA-only branches, run on a CPU: what they decide is checked with torch.cuda's answers
stood in for (no GPU has been lent to this project; docs/BENCHMARKS.md says what ran where)."""

import pytest
import torch

import modes
import training
from util import UserError

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert training.resolve_precision("auto", CUDA) == expected
    assert training.resolve_precision("fp16", CUDA) == "fp16"  # an explicit choice stands


def test_fp16_needs_cuda_and_bf16_needs_a_gpu_that_has_it(monkeypatch):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        training.check_precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="no bf16 support"):
        training.check_precision("bf16", CUDA)
    training.check_precision("fp16", CUDA)  # allowed: CUDA with loss scaling


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_fp16_brings_a_grad_scaler_and_the_others_none():
    model = torch.nn.Linear(2, 2)
    model.encoder = model.decoder = model.final_layer = torch.nn.Identity()
    assert training.prepare_model(model, "bf16", channels_last=False, compile_=False) is None
    assert training.prepare_model(model, "fp32", channels_last=False, compile_=False) is None
    assert isinstance(training.prepare_model(model, "fp16", channels_last=False, compile_=False), torch.amp.GradScaler)


def test_asking_for_cuda_without_one_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is available here"):
        modes.pick_device("cuda")


def test_torchrun_with_more_processes_than_gpus_names_the_limit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="give --nproc_per_node at most 1"):
        modes.pick_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert modes.pick_device("cuda") == CUDA  # one GPU per process: cuda:LOCAL_RANK
    assert modes.pick_device("auto") == CUDA
