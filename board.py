"""TensorBoard event files of a training run (--tensorboard), in the run folder beside
history.csv, so `tensorboard --logdir runs` shows every run side by side.

Every scalar is logged at the global step (optimizer steps since the run began): the running
training loss as it goes, and at each epoch's end every history.csv column under its own name
and unit, the learning rate and images/s. A resumed run opens its writer with TensorBoard's
purge_step just after the step it resumes from, so anything a killed run logged after its
last checkpoint is dropped by the reader and each curve has one value per step (what was
logged at the checkpoint's own step belongs to the saved state and stays).

torch.utils.tensorboard writes the files (TensorBoard's PyPI package provides the format); it
is imported only when the flag is given. The caller makes one Board on rank 0 only."""

RUNNING_LOSS_TAG = "step/train_loss_running"


class Board:
    def __init__(self, run_dir, first_step):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(run_dir, purge_step=first_step + 1 if first_step > 0 else None)

    def running_loss(self, step, value):
        self.writer.add_scalar(RUNNING_LOSS_TAG, value, step)

    def epoch(self, step, row, lr):
        """One history.csv row (its columns are the tags) and the learning rate."""
        for name, value in row.items():
            if name != "epoch":
                self.writer.add_scalar(name, value, step)
        self.writer.add_scalar("lr", lr, step)
        self.writer.flush()

    def images(self, step, grids):
        """{tag: (C, H, W) float grid in [0, 1]}, such as the sample grid and the traversals."""
        for tag, grid in grids.items():
            self.writer.add_image(tag, grid, step)
        self.writer.flush()

    def close(self):
        self.writer.close()
