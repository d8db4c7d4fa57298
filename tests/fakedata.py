"""Tiny random datasets written in the exact on-disk formats the real libraries read.

write_dataset returns what it wrote, per split: images as (N, C, H, W) uint8 and labels as
stored in the files (SVHN's 1..10, ChestMNIST's (N, 14)), so a test can compare load_split's
output against the raw truth."""

import gzip
import os
import pickle
import struct

import numpy as np
import scipy.io
from torchvision import datasets

CLASS_COUNTS = {"mnist": 10, "fashionmnist": 10, "cifar10": 10, "svhn": 10,
                "octmnist": 4, "tissuemnist": 8, "pneumoniamnist": 2}
MEDMNIST_FLAGS = ("chestmnist", "octmnist", "tissuemnist", "pneumoniamnist")
IDX_FOLDERS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}


class NoMd5CIFAR10(datasets.CIFAR10):
    """The stock reader with its md5 checks off, so it accepts generated files."""
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class NoMd5SVHN(datasets.SVHN):
    """The stock reader with its md5 checks off, so it accepts generated files."""
    split_list = {split: [url, name, None] for split, (url, name, _) in datasets.SVHN.split_list.items()}


def random_split(name, n, image_size=28, seed=0):
    """(images (N, C, H, W) uint8, labels as the files store them), every class present when n allows."""
    rng = np.random.default_rng(seed)
    channels, size = {"cifar10": (3, 32), "svhn": (3, 32), "mnist": (1, 28),
                      "fashionmnist": (1, 28)}.get(name, (1, image_size))
    images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
    if n:
        images[0, 0, 0, 0], images[-1, -1, -1, -1] = 0, 255  # the extremes survive a round trip
    if name == "chestmnist":
        labels = rng.integers(0, 2, size=(n, 14), dtype=np.uint8)
        labels[0] = 0  # at least one image with no finding
        return images, labels
    labels = rng.permutation(np.arange(n) % CLASS_COUNTS[name]).astype(np.uint8)
    if name == "svhn":
        labels = labels + 1  # SVHN stores digit 0 as 10
    return images, labels


def write_dataset(name, root, n_train=20, n_test=10, image_size=28, seed=0):
    """Write dataset `name` under `root` as its library expects; return {"train": ..., "test": ...}."""
    os.makedirs(root, exist_ok=True)
    splits = {"train": random_split(name, n_train, image_size, seed),
              "test": random_split(name, n_test, image_size, seed + 1)}
    if name in IDX_FOLDERS:
        write_idx_files(os.path.join(root, IDX_FOLDERS[name], "raw"), splits)
    elif name == "cifar10":
        write_cifar10(os.path.join(root, "cifar-10-batches-py"), splits)
    elif name == "svhn":
        for split, (images, labels) in splits.items():
            # Real files: X is (H, W, C, N), y is (N, 1).
            scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"),
                             {"X": images.transpose(2, 3, 1, 0), "y": labels[:, None]})
    elif name in MEDMNIST_FLAGS:
        suffix = "" if image_size == 28 else f"_{image_size}"
        val_images, val_labels = random_split(name, 4, image_size, seed + 2)
        arrays = {"val_images": val_images[:, 0], "val_labels": _medmnist_labels(val_labels)}
        for split, (images, labels) in splits.items():
            arrays[f"{split}_images"] = images[:, 0]  # grey MedMNIST images are (N, S, S)
            arrays[f"{split}_labels"] = _medmnist_labels(labels)
        np.savez_compressed(os.path.join(root, f"{name}{suffix}.npz"), **arrays)
    else:
        raise ValueError(f"no fake writer for {name!r}")
    return splits


def _medmnist_labels(labels):
    return labels if labels.ndim == 2 else labels[:, None]


def idx_bytes(array):
    """IDX: 0, 0, 0x08 (uint8), ndim, then each size as a big-endian uint32, then the bytes."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.tobytes()


def write_idx_files(raw_folder, splits, compress=False):
    """The four MNIST-style files; with compress, the .gz versions (as Debian ships them)."""
    os.makedirs(raw_folder, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = splits[split]
        for kind, array in (("images-idx3", images[:, 0]), ("labels-idx1", labels)):
            path = os.path.join(raw_folder, f"{prefix}-{kind}-ubyte")
            opener = gzip.open if compress else open
            with opener(path + ".gz" if compress else path, "wb") as f:
                f.write(idx_bytes(np.ascontiguousarray(array)))


def gzip_fashion_into(folder, n_train=20, n_test=10, seed=0):
    """A stand-in for /usr/share/datasets/fashion-mnist: the four *-ubyte.gz files."""
    splits = {"train": random_split("fashionmnist", n_train, seed=seed),
              "test": random_split("fashionmnist", n_test, seed=seed + 1)}
    write_idx_files(folder, splits, compress=True)
    return splits


def write_cifar10(folder, splits):
    """Pickled dicts whose "data" rows are 1024 R, then 1024 G, then 1024 B values."""
    os.makedirs(folder, exist_ok=True)
    train_images, train_labels = splits["train"]
    batches = [(f"data_batch_{i + 1}", part) for i, part in
               enumerate(np.array_split(np.arange(len(train_images)), 5))]
    for file_name, indices in batches:
        _pickle_batch(os.path.join(folder, file_name), train_images[indices], train_labels[indices])
    _pickle_batch(os.path.join(folder, "test_batch"), *splits["test"])
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=2)


def _pickle_batch(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({"batch_label": os.path.basename(path), "labels": [int(x) for x in labels],
                     "data": images.reshape(len(images), 3 * 32 * 32),
                     "filenames": [f"{i}.png" for i in range(len(images))]}, f, protocol=2)
