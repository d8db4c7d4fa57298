"""Multi-process training on PyTorch's own torch.distributed, for runs started by torchrun.

Every function here is a no-op (or the identity) in a plain single-process run, so the training
loop calls them unconditionally. Knows neither models nor datasets."""

import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn

from util import BadValue, UserError

_signal_group = None  # a gloo group, so the per-step stop vote never waits on a GPU


def launched_world_size():
    """Processes in this job, as torchrun announces it before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's rank; torchrun's, before the group is joined or after it is left."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


@contextlib.contextmanager
def process_group(device):
    """Join the torchrun job for the duration (NCCL on CUDA, gloo otherwise); alone, do nothing.

    The group is destroyed however the block ends."""
    global _signal_group
    if launched_world_size() == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        # The default group is gloo already on CPUs.
        _signal_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
        yield
    finally:
        _wait_for_every_rank()
        _signal_group = None
        dist.destroy_process_group()


def _wait_for_every_rank(timeout_s=60):
    """Every rank gets here before any destroys the group. A rank that tore the group down
    while another still had a message in flight made that one abort at exit ("terminate called
    without an active exception"). A rank that is gone ends the wait with an error, ignored."""
    try:
        dist.monitored_barrier(group=_signal_group, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError:
        pass


# What gloo and NCCL say when the other end of a collective is gone: a killed process's sockets
# are closed by its kernel (reset, closed), a vanished machine's run into the group's timeout.
_LOST_PEER_WORDS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                    "Connection refused", "Timed out waiting", "timed out", "NCCL communicator was aborted")


def lost_contact(error):
    """The gist of `error` if it is a collective that failed because another process of the
    torchrun job is gone; else None. torch raises these as RuntimeError (gloo) or DistError."""
    if launched_world_size() == 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if isinstance(error, dist.DistError) or any(words in text for words in _LOST_PEER_WORDS):
        line = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        line = line.split("] ", 1)[-1] if line.startswith("[") else line  # without gloo's source path
        return line.split(". ", 1)[0]  # without its advice
    return None


@contextlib.contextmanager
def stdout_on_main_only():
    """Silence print() on every rank but 0, so each line appears once; errors (stderr) stay."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def from_main(value):
    """Rank 0's integer `value`, on every rank."""
    if world_size() == 1:
        return value
    shared = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(shared, src=0, group=_signal_group)
    return int(shared)


def first_on_each_machine(work):
    """work() on each machine's first process, then on the others, which find its files (a
    downloaded dataset) instead of racing it to write them. If it fails there, every rank
    raises, so none waits."""
    first = launched_local_rank() == 0
    result = _run_then_agree(first, work, "the first process on a machine failed to load the "
                                          "data; see its message")
    return result if first else work()


def check_batch_splits(batch_size, world):
    """Raise BadValue unless a global batch of batch_size images splits evenly over `world`
    processes (checked before any work, and again once the training set's size is known)."""
    if batch_size % world:
        raise BadValue("batch_size", f"{batch_size} (the global batch) does not split evenly over the "
                                     f"{world} processes torchrun started: make it a multiple of {world}")


def batch_rows(batch_size):
    """This rank's rows of a global batch: contiguous, equal slices in rank order."""
    world = world_size()
    check_batch_splits(batch_size, world)
    per_rank = batch_size // world
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


def data_parallel(model, device):
    """`model` for DistributedDataParallel training with BatchNorm statistics over the global
    batch, or `model` itself in a single process. The returned module's forward is `model`'s."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = convert_global_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(tensor):
    """A copy of `tensor` summed over all ranks."""
    total = tensor.clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def agreed_signal(signal_name):
    """The stop signal any rank has received, or None: every rank gets the same answer at
    the same step, so they stop together (signals reach ranks at different moments)."""
    if world_size() == 1:
        return signal_name
    number = torch.tensor([signal.Signals[signal_name].value if signal_name else 0])
    dist.all_reduce(number, op=dist.ReduceOp.MAX, group=_signal_group)
    return signal.Signals(int(number)).name if int(number) else None


def any_rank(flag):
    """True on every rank if `flag` is true on any."""
    if world_size() == 1:
        return bool(flag)
    vote = torch.tensor([int(bool(flag))])
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_signal_group)
    return bool(vote)


def on_main(write):
    """Call write() on rank 0 only (files are written once) and return what it returns there
    (None elsewhere); every rank returns together, and if it failed every rank raises, so
    none is left waiting for rank 0."""
    return _run_then_agree(is_main(), write, "rank 0 failed to write its files; see its message")


def _run_then_agree(here, work, message_elsewhere):
    """work() where `here` is true; then every rank learns whether it failed anywhere, and
    raises if so (the real error where it happened, UserError(message_elsewhere) elsewhere)."""
    error = result = None
    if here:
        try:
            result = work()
        except (Exception, KeyboardInterrupt) as e:  # re-raised below, after the other ranks have heard
            error = e
    if any_rank(error is not None):
        if isinstance(error, UserError) and not is_main():
            raise UserError(str(error), this_rank_only=True)  # rank 0 only says to look here
        raise error if error is not None else UserError(message_elsewhere)
    return result


# ---------------------------------------------------------------- BatchNorm over all ranks

class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: each rank's input feeds every rank's output, so the
    gradient is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch of all ranks.

    nn.SyncBatchNorm does this only for GPU tensors; this works on any device, with the same
    parameters and buffers, so checkpoints are unchanged. Two passes (mean, then squared
    deviations) as single-process BatchNorm does, so no variance is lost to cancellation."""

    def forward(self, x_in):
        if not (self.training and world_size() > 1):
            return super().forward(x_in)
        x = x_in.float()  # statistics in float32 even under autocast, as nn.BatchNorm2d keeps them
        dims = (0, 2, 3)
        count_local = torch.tensor([x.numel() // x.shape[1]], device=x.device, dtype=x.dtype)
        sum_and_count = _AllReduceSum.apply(torch.cat([x.sum(dims), count_local]))
        count = sum_and_count[-1]
        mean = sum_and_count[:-1] / count
        centred = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1 / int(self.num_batches_tracked)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            # The running variance is the unbiased estimate, as in nn.BatchNorm2d.
            self.running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x_in.dtype)


def convert_global_batchnorm(module):
    """Replace every nn.BatchNorm2d inside `module` by a GlobalBatchNorm2d holding its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum,
                                       device=child.weight.device, dtype=child.weight.dtype)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            convert_global_batchnorm(child)
    return module
