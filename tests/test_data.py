import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import data
from fakedata import NoMd5CIFAR10, NoMd5SVHN, gzip_fashion_into, write_dataset
from util import UserError

MEDMNIST = ("chestmnist", "octmnist", "tissuemnist", "pneumoniamnist")


@pytest.fixture
def no_md5(monkeypatch):
    """Generated CIFAR-10/SVHN files fail the real md5s; read them with the unchanged code otherwise."""
    monkeypatch.setitem(data.TORCHVISION_CLASSES, "cifar10", NoMd5CIFAR10)
    monkeypatch.setitem(data.TORCHVISION_CLASSES, "svhn", NoMd5SVHN)


@pytest.fixture
def offline(monkeypatch):
    """Every library downloads through urllib; make it fail as it does with no network."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))


def expected_labels(name, stored):
    if name == "svhn":
        return np.where(stored == 10, 0, stored)
    if name == "chestmnist":
        return stored.any(axis=1)  # 1 when any of the 14 findings is present
    return stored


def assert_loads_as_written(name, data_dir, written, image_size=None):
    for split, (images, stored_labels) in written.items():
        loaded_images, loaded_labels = data.load_split(name, split, data_dir, image_size,
                                                       download=False)
        assert loaded_images.dtype == torch.uint8 and loaded_images.is_contiguous()
        assert loaded_images.shape == (len(images), *data.image_shape(name, image_size))
        assert torch.equal(loaded_images, torch.from_numpy(images))
        assert loaded_labels.dtype == torch.int64 and loaded_labels.shape == (len(images),)
        assert loaded_labels.tolist() == expected_labels(name, stored_labels).astype(int).tolist()


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10", "svhn"])
def test_torchvision_datasets_load_exactly_what_was_written(name, tmp_path, no_md5, no_debian):
    written = write_dataset(name, tmp_path, n_train=12, n_test=7)
    assert_loads_as_written(name, tmp_path, written)


def test_cifar_planes_become_channels(tmp_path, no_md5):
    written = write_dataset("cifar10", tmp_path, n_train=5, n_test=3)
    images, _ = data.load_split("cifar10", "test", tmp_path, download=False)
    row = written["test"][0][1].reshape(-1)  # as pickled: 1024 R, 1024 G, 1024 B
    assert images[1, 1].flatten().tolist() == row[1024:2048].tolist()


def test_svhn_digit_zero_is_label_zero(tmp_path, no_md5):
    written = write_dataset("svhn", tmp_path, n_train=10, n_test=10)
    assert 10 in written["train"][1]
    _, labels = data.load_split("svhn", "train", tmp_path, download=False)
    assert sorted(labels.tolist()) == list(range(10))


@pytest.mark.parametrize("size", [28, 64])
@pytest.mark.parametrize("name", MEDMNIST)
def test_medmnist_loads_exactly_what_was_written(name, size, tmp_path):
    written = write_dataset(name, tmp_path, n_train=9, n_test=5, image_size=size)
    assert_loads_as_written(name, tmp_path, written, image_size=size)


def test_chestmnist_label_is_any_finding(tmp_path):
    written = write_dataset("chestmnist", tmp_path, n_train=30, n_test=5)
    _, labels = data.load_split("chestmnist", "train", tmp_path, download=False)
    assert labels[0] == 0 and set(labels.tolist()) == {0, 1}
    assert labels.tolist() == [int(row.any()) for row in written["train"][1]]


@pytest.mark.parametrize("name,shape", [
    ("mnist", (1, 28, 28)), ("fashionmnist", (1, 28, 28)), ("cifar10", (3, 32, 32)),
    ("svhn", (3, 32, 32)), ("chestmnist", (1, 28, 28)), ("octmnist", (1, 28, 28)),
    ("tissuemnist", (1, 28, 28)), ("pneumoniamnist", (1, 28, 28))])
def test_image_shape(name, shape):
    assert data.image_shape(name) == shape
    assert data.image_shape(name, shape[-1]) == shape


def test_image_shape_medmnist_sizes():
    assert [data.image_shape("octmnist", s) for s in data.MEDMNIST_SIZES] == \
        [(1, s, s) for s in data.MEDMNIST_SIZES]


@pytest.mark.parametrize("name,size", [("imagenet", None), ("cifar10", 64), ("mnist", 32),
                                       ("chestmnist", 32)])
def test_image_shape_refuses_what_does_not_exist(name, size):
    with pytest.raises(UserError, match=name):
        data.image_shape(name, size)


def test_bad_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="split"):
        data.load_split("mnist", "val", tmp_path, download=False)


def test_fashion_mnist_comes_from_debian_folder_when_data_dir_is_empty(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    written = gzip_fashion_into(debian, n_train=8, n_test=4)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(debian))
    data_dir = tmp_path / "data"
    assert_loads_as_written("fashionmnist", data_dir, written)
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(data.IDX_FILES)  # decompressed, no temp files left


@pytest.mark.parametrize("name", data.DATASETS)
def test_missing_dataset_without_download_names_dataset_and_folder(name, tmp_path, no_debian):
    data_dir = tmp_path / "empty"
    with pytest.raises(UserError) as error:
        data.load_split(name, "train", data_dir, download=False)
    message = str(error.value)
    assert message.startswith(f"{name}:") and str(data_dir) in message and "\n" not in message


@pytest.mark.parametrize("name", ["mnist", "fashionmnist", "cifar10", "svhn", "chestmnist"])
def test_offline_download_is_one_user_error(name, tmp_path, offline, no_debian):
    data_dir = tmp_path / "data"
    with pytest.raises(UserError) as error:
        data.load_split(name, "test", data_dir, download=True)
    message = str(error.value)
    assert message.startswith(f"{name}:") and "download failed" in message
    assert str(data_dir) in message and "\n" not in message
    assert not data_dir.exists()  # the failed download left no empty folders behind


def test_any_download_error_is_a_user_error(tmp_path, monkeypatch):
    def broken_download(self):
        raise OSError("disk full")
    monkeypatch.setattr(data.TORCHVISION_CLASSES["mnist"], "download", broken_download)
    with pytest.raises(UserError, match="mnist: .*download failed.*disk full"):
        data.load_split("mnist", "train", tmp_path, download=True)


def test_truncated_idx_file_is_named(tmp_path):
    write_dataset("mnist", tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(UserError, match="train-labels-idx1-ubyte is not a readable IDX file: its header says"):
        data.load_split("mnist", "train", tmp_path, download=False)


def test_npz_without_expected_arrays_is_named(tmp_path):
    np.savez(tmp_path / "octmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match="could not read .*octmnist.npz"):
        data.load_split("octmnist", "test", tmp_path, download=False)


def test_cifar_batch_that_does_not_unpickle_is_named(tmp_path, no_md5):
    write_dataset("cifar10", tmp_path, n_train=10, n_test=5)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="could not read .*data_batch_3"):
        data.load_split("cifar10", "train", tmp_path, download=False)


def test_stock_cifar_rejects_files_that_fail_md5_as_user_error(tmp_path):
    write_dataset("cifar10", tmp_path, n_train=10, n_test=5)
    with pytest.raises(UserError, match="cifar10: could not read .*cifar-10-batches-py"):
        data.load_split("cifar10", "test", tmp_path, download=False)


def test_unreadable_mat_is_named(tmp_path, no_md5):
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not read .*test_32x32.mat"):
        data.load_split("svhn", "test", tmp_path, download=False)


def test_npz_of_wrong_size_is_a_user_error(tmp_path):
    write_dataset("pneumoniamnist", tmp_path, n_train=4, n_test=2, image_size=64)
    # A 64 px file under the 28 px name.
    os.replace(tmp_path / "pneumoniamnist_64.npz", tmp_path / "pneumoniamnist.npz")
    with pytest.raises(UserError, match="pneumoniamnist: .*expected"):
        data.load_split("pneumoniamnist", "train", tmp_path, download=False)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = data.load_split("fashionmnist", split, tmp_path, download=False)
        assert images.shape == (count, 1, 28, 28) and images.dtype == torch.uint8
        assert images.max() == 255 and sorted(labels.unique().tolist()) == list(range(10))
