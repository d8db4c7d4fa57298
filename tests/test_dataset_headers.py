"""Dataset files with broken headers, as a class (issue 24): for each on-disk format read, a
truncated file, a wrong magic number or dtype, a header that disagrees with the file's length.
Each is one line naming the file and what is wrong with it, exit 2, and no training starts."""

import struct

import numpy as np
import pytest

import data
from fakedata import write_dataset
from helpers import TINY_MODEL, assert_one_line_error, run_main

IDX_BREAKS = {
    "truncated": (lambda b: b[:-3], "but it has"),
    "too short for a header": (lambda b: b[:3], "too short"),
    "a wrong magic number": (lambda b: b"\x08\x03" + b[2:], "not an IDX file"),
    "a wrong dtype byte": (lambda b: b[:2] + b"\x0d" + b[3:], "dtype byte is 0x0d"),
    "a header that disagrees with the length": (lambda b: b[:4] + struct.pack(">I", 99999) + b[8:],
                                                "header says 99999"),
    "another number of dimensions": (lambda b: b[:3] + b"\x02" + b[4:], "dimensions"),
}


@pytest.mark.parametrize("file", data.IDX_FILES)
@pytest.mark.parametrize("how", IDX_BREAKS)
def test_an_idx_file_with_a_broken_header_is_named(capsys, tmp_path, file, how):
    write_dataset("mnist", tmp_path / "data", n_train=16, n_test=8)
    idx = tmp_path / "data" / "MNIST" / "raw" / file
    brake, words = IDX_BREAKS[how]
    idx.write_bytes(brake(idx.read_bytes()))
    code, _, err = run_main(capsys, "--train", "--data_dir", tmp_path / "data", "--output_dir", tmp_path / "out",
                            *TINY_MODEL)
    assert_one_line_error(code, err, f"mnist: {idx} is not a readable IDX file", words)
    assert not (tmp_path / "out").exists()


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def not_the_format(path):
    path.write_bytes(b"\x00" * 64)


OTHER_FORMATS = {  # dataset: (the file to break, relative to data_dir)
    "pneumoniamnist": "pneumoniamnist.npz",
    "cifar10": "cifar-10-batches-py/data_batch_1",
    "svhn": "train_32x32.mat",
}


@pytest.mark.parametrize("dataset", OTHER_FORMATS)
@pytest.mark.parametrize("brake", [truncated, not_the_format], ids=["truncated", "not the format"])
def test_a_broken_file_of_every_other_format_is_named(capsys, tmp_path, dataset, brake):
    write_dataset(dataset, tmp_path / "data", n_train=16, n_test=8)
    path = tmp_path / "data" / OTHER_FORMATS[dataset]
    brake(path)
    code, _, err = run_main(capsys, "--train", "--dataset", dataset, "--data_dir", tmp_path / "data",
                            "--output_dir", tmp_path / "out", *TINY_MODEL)
    assert_one_line_error(code, err, f"{dataset}: could not read {path}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how, words", [
    ("truncated", "truncated"), ("float images", "uint8"), ("not an array file", "not"),
])
def test_a_broken_array_file_of_ones_own_images_is_named(capsys, tmp_path, how, words):
    path = tmp_path / "faces.npy"
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.save(path, images.astype(np.float32) if how == "float images" else images)
    if how == "truncated":
        truncated(path)
    elif how == "not an array file":
        not_the_format(path)
    code, _, err = run_main(capsys, "--train", "--dataset", path, "--data_dir", tmp_path / "cache",
                            "--output_dir", tmp_path / "out", *TINY_MODEL)
    assert_one_line_error(code, err, str(path), words)
    assert not (tmp_path / "out").exists()
