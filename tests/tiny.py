"""A tiny trained model for tests that need one: a few seconds of CPU, real files."""

import VanVAE
from fakedata import write_dataset

TINY = ["--hidden_dims", "8", "16", "--latent_dim", "4", "--batch_size", "8", "--threads", "1"]


def train_tiny(folder, *flags, n_train=48, n_test=16):
    """One epoch of a tiny model on generated MNIST in folder/data, with its automatic gmm
    prior; returns the checkpoint's path."""
    write_dataset("mnist", folder / "data", n_train=n_train, n_test=n_test)
    assert VanVAE.main(["--train", "--data_dir", str(folder / "data"), "--output_dir", str(folder),
                        "--n_epochs", "1", *TINY, *map(str, flags)]) == 0
    return folder / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
