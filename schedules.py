"""The training recipe as functions of the global step (optimizer steps taken since the run
began): Adam's learning rate (--lr_schedule) and the KL term's weight (--kl_warmup_epochs).

Each value is computed from the step number alone and holds no state, so a run resumed at any
step, mid-epoch too, sets exactly the values the uninterrupted run set. Imports no torch."""

import math


def learning_rate(schedule, lr, step, total_steps):
    """The learning rate of 0-based optimizer step `step` of `total_steps`: `lr` throughout
    (constant), or cosine annealing from `lr` to 0 (cosine; Loshchilov and Hutter 2017, eq. 5,
    without restarts): lr (1 + cos(pi step / total_steps)) / 2."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def kl_weight(kld_weight, step, warmup_steps):
    """The KL term's weight in the objective at step `step`: rising linearly from 0 to
    `kld_weight` over the first `warmup_steps` steps, then `kld_weight` (the warm-up of Sonderby
    et al. 2016, Ladder VAEs; Bowman et al. 2016's KL annealing); `kld_weight` throughout when
    warmup_steps is 0."""
    if step >= warmup_steps:
        return kld_weight
    return kld_weight * step / warmup_steps


def at_step(settings, step, steps_per_epoch):
    """(learning rate, KL weight) of `step` under TrainSettings `settings`: the cosine spans this
    invocation's n_epochs, the warm-up the record's kl_warmup_epochs."""
    record = settings.record
    return (learning_rate(record.lr_schedule, record.lr, step, settings.run.n_epochs * steps_per_epoch),
            kl_weight(record.kld_weight, step, record.kl_warmup_epochs * steps_per_epoch))
