"""The training recipe, --lr_schedule and --kl_warmup_epochs: the learning rate and KL weight
each step really gets, a stopped and resumed run that gets them exactly as an uninterrupted one,
a checkpoint that keeps them, and figures that stay the true ELBO while the objective is warmed."""

import contextlib
import io
import math
import shutil

import pytest
import torch

import checkpoint
import data
import metrics
import schedules
import training
import util
import VanVAE
from helpers import (
    CHECKPOINT,
    TINY_MODEL,
    assert_one_line_error,
    assert_same_training_state,
    one_thread,  # noqa: F401 -- autouse: this module's tests run on one thread too
    resume_command_from,
    run_cli,
    run_main,
    sigint_in_epoch_2,
    snapshot,
)

LR, KLD_WEIGHT = 0.01, 0.5
STEPS_PER_EPOCH = 8  # small_data: 64 images in batches of 8
RECIPE = ["--lr", LR, "--kld_weight", KLD_WEIGHT, "--lr_schedule", "cosine", "--kl_warmup_epochs", 2]


def cosine(step, total_steps):
    return LR * 0.5 * (1 + math.cos(math.pi * step / total_steps))


def train_recording(*flags):
    """VanVAE.main(flags) in this process: (exit status, stdout, and per optimizer step the
    learning rate Adam stepped with, read back from the optimizer, and the KL weight given)."""
    steps, real_step = [], training.TrainStep.__call__

    def recording(self, images, idx, batch, rows, lr, kl_weight):
        sums = real_step(self, images, idx, batch, rows, lr, kl_weight)
        steps.append((self.optimizer.param_groups[0]["lr"], kl_weight))
        return sums
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(training.TrainStep, "__call__", recording)
        code = VanVAE.main([str(flag) for flag in flags])
    return code, out.getvalue(), steps


@pytest.fixture(scope="module")
def warmed_cosine_run(tmp_path_factory, small_data):
    """Two epochs of cosine and KL warm-up, made in-process once for the module."""
    out = tmp_path_factory.mktemp("recipe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and back: later test modules compare runs at the default count
    code, printed, steps = train_recording("--train", "--data_dir", small_data, "--output_dir", out,
                                           *TINY_MODEL, "--seed", 0, "--n_epochs", 2, *RECIPE)
    torch.set_num_threads(threads)
    assert code == 0, printed
    return out, printed, steps


def copy_of(run, target):
    """A copy of a run's output folder, for a test that changes it."""
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------- the schedules themselves

def test_the_cosine_rate_falls_from_lr_to_0_and_constant_stays():
    assert schedules.learning_rate("cosine", LR, 0, 100) == LR
    assert schedules.learning_rate("cosine", LR, 50, 100) == pytest.approx(LR / 2)
    assert schedules.learning_rate("cosine", LR, 75, 100) == pytest.approx(LR * (1 - math.sqrt(0.5)) / 2)
    assert schedules.learning_rate("cosine", LR, 100, 100) == pytest.approx(0, abs=1e-18)
    assert schedules.learning_rate("constant", LR, 75, 100) == LR


def test_the_kl_weight_rises_linearly_over_the_warm_up_then_stays():
    assert [schedules.kl_weight(0.5, step, 4) for step in range(6)] == [0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert schedules.kl_weight(0.5, 0, 0) == 0.5  # no warm-up


# ---------------------------------------------------------------- what a run does

def test_every_step_gets_the_cosine_rate_and_the_warmed_kl_weight(warmed_cosine_run):
    _, _, steps = warmed_cosine_run
    total = 2 * STEPS_PER_EPOCH
    assert steps == [pytest.approx((cosine(step, total), KLD_WEIGHT * step / total), rel=1e-12)
                     for step in range(total)]


def test_with_warm_up_the_figures_stay_the_true_elbo_and_only_the_loss_is_warmed(warmed_cosine_run,
                                                                                small_data):
    out, printed, _ = warmed_cosine_run
    saved = util.load_torch_file(out / CHECKPOINT)
    history = saved["history"]
    for row in history:
        for split in ("train", "test"):
            neg_elbo = row[f"{split}_recon_nats"] + row[f"{split}_kl_nats"]
            assert row[f"{split}_neg_elbo_nats"] == neg_elbo
            assert f"{split} -ELBO {neg_elbo:.2f} nats/image" in printed
    # The test objective weighs KL as far as warm-up has come: half way after epoch 1 of 2.
    for row, weight in zip(history, (KLD_WEIGHT / 2, KLD_WEIGHT)):
        assert row["test_loss"] == pytest.approx(row["test_recon_nats"] + weight * row["test_kl_nats"])
    # And the test -ELBO is the model's true one, recon + KL with weight 1, from the saved weights.
    ckpt = checkpoint.load(out / CHECKPOINT)
    test_images = data.load_splits("mnist", small_data)[1]
    recon, kl = metrics.elbo_per_image(ckpt.model, test_images, batch_size=8, seed=0)
    assert history[-1]["test_neg_elbo_nats"] == pytest.approx(float((recon + kl).mean()), rel=1e-4)
    assert ckpt.training.lr_schedule == "cosine" and ckpt.training.kl_warmup_epochs == 2
    assert saved["args"]["lr_schedule"] == "cosine" and saved["args"]["kl_warmup_epochs"] == 2


def test_a_cosine_run_resumed_with_more_epochs_takes_the_longer_curve(tmp_path, warmed_cosine_run,
                                                                      small_data):
    """The rule: the cosine spans the --n_epochs of the invocation, so the rate rises again."""
    out = copy_of(warmed_cosine_run[0], tmp_path / "out")
    code, printed, steps = train_recording("--train", "--resume", "--data_dir", small_data,
                                           "--output_dir", out, "--n_epochs", 3)
    assert code == 0, printed
    total = 3 * STEPS_PER_EPOCH
    assert steps == [pytest.approx((cosine(step, total), KLD_WEIGHT), rel=1e-12)
                     for step in range(2 * STEPS_PER_EPOCH, total)]
    assert steps[0][0] > cosine(2 * STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH)


@pytest.mark.parametrize("flag, value, recorded", [("--lr_schedule", "constant", "cosine"),
                                                   ("--kl_warmup_epochs", "0", "2")])
def test_resume_with_another_recipe_is_one_line(capsys, tmp_path, warmed_cosine_run, small_data,
                                                flag, value, recorded):
    out = copy_of(warmed_cosine_run[0], tmp_path / "out")
    before = snapshot(out)
    code, _, err = run_main(capsys, "--train", "--resume", "--data_dir", small_data, "--output_dir", out,
                            "--n_epochs", 3, flag, value)
    assert_one_line_error(code, err, f"{flag} {value} contradicts", f"trained with {recorded}")
    assert snapshot(out) == before


@pytest.mark.long
def test_sigint_mid_epoch_with_cosine_and_warm_up_resumes_bit_identical(tmp_path, long_data):
    common = ["--train", "--data_dir", long_data, *TINY_MODEL, "--seed", 5, "--n_epochs", 2, *RECIPE]
    assert run_cli(*common, "--output_dir", tmp_path / "a").returncode == 0

    err = sigint_in_epoch_2(*common, "--output_dir", tmp_path / "b")
    stopped = util.load_torch_file(tmp_path / "b" / CHECKPOINT)
    assert stopped["epoch"] == 1 and stopped["step"] > 0, "the stop was not mid-epoch"

    command = resume_command_from(err)
    assert "--lr_schedule" not in command and "--kl_warmup_epochs" not in command  # from the file
    resumed = run_cli(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(util.load_torch_file(tmp_path / "a" / CHECKPOINT),
                               util.load_torch_file(tmp_path / "b" / CHECKPOINT))


# ---------------------------------------------------------------- the checkpoint's record

def test_an_older_format_2_file_without_a_recipe_resumes_as_constant_with_no_warm_up(warmed_cosine_run,
                                                                                    tmp_path):
    raw = util.load_torch_file(warmed_cosine_run[0] / CHECKPOINT)
    for key in ("lr_schedule", "kl_warmup_epochs"):
        del raw["training"][key]  # as VanVAE wrote format 2 before these flags
    torch.save(raw, tmp_path / "older.pt")
    record = checkpoint.load(tmp_path / "older.pt").training
    assert (record.lr_schedule, record.kl_warmup_epochs, record.lr) == ("constant", 0, LR)


def test_a_checkpoint_with_an_unknown_schedule_is_one_line(warmed_cosine_run, tmp_path):
    raw = util.load_torch_file(warmed_cosine_run[0] / CHECKPOINT)
    raw["training"]["lr_schedule"] = "step"
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(util.UserError, match="does not describe a VanVAE model: "
                                             "training.lr_schedule must be one of constant, cosine, not 'step'"):
        checkpoint.load(tmp_path / "odd.pt")
