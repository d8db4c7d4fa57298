"""What each of two processes runs for test_distributed.py, in a module that imports little,
so that spawning the processes is quick."""

import copy
import os
import signal

import pytest
import torch
import torch.nn as nn

import distributed
import training
import vae
from settings import RunChoices, TrainingRecord, TrainSettings
from util import UserError


def join_group(rank, worker, port, *args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.process_group(torch.device("cpu")):
        worker(rank, *args)


def batchnorm_worker(rank):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 3 + 2
    upstream = torch.randn(8, 3, 5, 5, generator=g)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2, generator=g)
        reference.bias.uniform_(-1, 1, generator=g)
    synced = distributed.convert_global_batchnorm(nn.Sequential(copy.deepcopy(reference)))[0]
    assert isinstance(synced, distributed.GlobalBatchNorm2d)
    full_x = x.clone().requires_grad_()
    full_y = reference(full_x)
    (full_y * upstream).sum().backward()
    rows = slice(4 * rank, 4 * rank + 4)
    part_x = x[rows].clone().requires_grad_()
    part_y = synced(part_x)
    (part_y * upstream[rows]).sum().backward()
    assert torch.allclose(part_y, full_y[rows], atol=1e-5)
    assert torch.allclose(part_x.grad, full_x.grad[rows], atol=1e-5)
    for name in ("weight", "bias"):
        summed = distributed.all_reduce_sum(getattr(synced, name).grad)
        assert torch.allclose(summed, getattr(reference, name).grad, atol=1e-4), name
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(synced, name), getattr(reference, name), atol=1e-6), name


def signal_on_one_rank_worker(rank, root):
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = vae.VanillaVAE(vae.VAEConfig("mnist", (1, 28, 28), latent_dim=4, hidden_dims=(8, 16)))
    settings = TrainSettings(TrainingRecord("mnist", seed=0, batch_size=8), RunChoices(n_epochs=1),
                             checkpoint_path=f"{root}/ckpt.pt", run_dir=f"{root}/runs", progress=False)
    draw_noise, steps = model.draw_noise, []

    def draw_noise_and_signal_rank_1_in_step_2(*args, **kwargs):
        steps.append(len(steps))
        if rank == 1 and len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return draw_noise(*args, **kwargs)

    model.draw_noise = draw_noise_and_signal_rank_1_in_step_2
    with pytest.raises(training.StopRequested) as stop:
        training.train(model, images, images[:8], settings)
    assert stop.value.signal_name == "SIGTERM" and len(steps) == 3  # both stopped after step 2
    if rank == 0:
        saved = torch.load(f"{root}/ckpt.pt", weights_only=True)
        assert (saved["epoch"], saved["step"]) == (0, 3)
    open(f"{root}/rank{rank}.done", "w").close()  # every assertion above held on this rank


def failed_write_worker(rank):
    def write():
        raise UserError("disk full")

    with pytest.raises(UserError, match="disk full" if rank == 0 else "rank 0 failed"):
        distributed.on_main(write)
