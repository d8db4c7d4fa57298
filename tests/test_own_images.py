"""--dataset PATH end to end through the command line: a folder of image files or an array
file trains, samples from --checkpoint alone, evaluates on its held-out split and scores outliers;
what cannot work is one line and exit 2."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import TINY_MODEL, assert_one_line_error, run_main
from util import load_torch_file

TINY = [*TINY_MODEL, "--seed", "1",
        "--n_epochs", "1", "--threads", "1"]


def write_pngs(folder, n, size=(28, 28), seed=0, mode="L"):
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"part{i % 3}"  # nested, as a real collection is
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(sub / f"img{i:03d}.png")




def test_a_folder_trains_samples_and_evaluates_on_its_held_out_split(tmp_path, capsys):
    folder = tmp_path / "tiles"
    write_pngs(folder, 60)
    (folder / "README.txt").write_text("not an image")
    code, out, err = run_main(capsys, "--train", "--dataset", folder, "--data_dir", tmp_path / "cache",
                         "--output_dir", tmp_path, "--test_fraction", "0.2", *TINY)
    assert code == 0, err
    path = tmp_path / "models" / "VanillaVAE" / "VanillaVAE_tiles.pt"
    ckpt = load_torch_file(path)
    source = ckpt["training"]["data_source"]
    assert ckpt["config"]["image_shape"] == [1, 28, 28] and source["path"] == str(folder)
    assert source["n_train"] + source["n_test"] == 60 and 0 < source["n_test"] < 30
    assert f"tiles: {source['n_train']} train / {source['n_test']} test images" in out

    code, out, err = run_main(capsys, "--sample", "--checkpoint", path, "--output_dir", tmp_path,
                         "--num_samples", 4, "--seed", 0)
    assert code == 0, err
    samples = load_torch_file(tmp_path / "runs" / "VanillaVAE_tiles" / "gmm_prior_samples_n4_seed0.pt",
                              "samples")
    assert samples.shape == (4, 1, 28, 28)

    code, out, err = run_main(capsys, "--eval", "--checkpoint", path, "--output_dir", tmp_path,
                         "--data_dir", tmp_path / "cache", "--iw_samples", 2, "--fid_samples", 0)
    assert code == 0, err
    report = json.loads((tmp_path / "runs" / "VanillaVAE_tiles" / "eval.json").read_text())
    assert report["n_images"] == source["n_test"]

    other = tmp_path / "others"
    write_pngs(other, 12, size=(32, 32), seed=9, mode="RGB")
    code, out, err = run_main(capsys, "--outlier_detection", "--checkpoint", path, "--out_dataset", other,
                         "--output_dir", tmp_path, "--data_dir", tmp_path / "cache", "--iw_samples", 2)
    assert code == 0, err
    outliers = json.loads((tmp_path / "runs" / "VanillaVAE_tiles" / "outliers_others.json").read_text())
    assert outliers["n_in"] == source["n_test"] and outliers["n_out"] == 12  # every image of a folder


def test_an_npz_with_its_own_splits_trains(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "sprites.npz", x_train=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
             x_test=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    code, out, err = run_main(capsys, "--train", "--dataset", tmp_path / "sprites.npz", "--output_dir", tmp_path,
                         "--data_dir", tmp_path / "cache", *TINY)
    assert code == 0, err
    ckpt = load_torch_file(tmp_path / "models" / "VanillaVAE" / "VanillaVAE_sprites.pt")
    assert ckpt["config"]["image_shape"] == [3, 16, 16]
    assert (ckpt["training"]["data_source"]["n_train"], ckpt["training"]["data_source"]["n_test"]) == (24, 8)


def test_resuming_on_a_changed_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "cells"
    write_pngs(folder, 30)
    common = ["--dataset", folder, "--output_dir", tmp_path, "--data_dir", tmp_path / "cache",
              "--test_fraction", "0.2"]
    assert run_main(capsys, "--train", *common, *TINY)[0] == 0
    path = tmp_path / "models" / "VanillaVAE" / "VanillaVAE_cells.pt"
    before = path.read_bytes()
    write_pngs(folder / "new", 3, seed=4)
    code, _, err = run_main(capsys, "--train", "--resume", "--checkpoint", path, "--n_epochs", 2,
                       "--output_dir", tmp_path, "--data_dir", tmp_path / "cache")
    assert_one_line_error(code, err, "changed since this run started")
    assert path.read_bytes() == before


def test_mixed_sizes_need_image_size(tmp_path, capsys):
    folder = tmp_path / "mixed"
    write_pngs(folder, 10, size=(20, 20))
    write_pngs(folder / "big", 10, size=(30, 24), seed=1)
    code, _, err = run_main(capsys, "--train", "--dataset", folder, "--output_dir", tmp_path,
                       "--data_dir", tmp_path / "cache", *TINY)
    assert_one_line_error(code, err, "20x20", "30x24", "--image_size")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.pt"))
    code, out, err = run_main(capsys, "--train", "--dataset", folder, "--output_dir", tmp_path,
                         "--data_dir", tmp_path / "cache", "--image_size", 16, "--test_fraction", "0.3", *TINY)
    assert code == 0, err
    assert load_torch_file(tmp_path / "models" / "VanillaVAE" / "VanillaVAE_mixed.pt")["config"]["image_shape"] \
        == [1, 16, 16]


@pytest.mark.parametrize("case, words", [
    ("missing", "no such folder or file"),
    ("empty", "no"),
    ("too small", "too deep for 4x4 images"),
    ("float array", "uint8"),
    ("no test images", "test images"),
])
def test_what_cannot_train_is_one_line(tmp_path, capsys, case, words):
    path = tmp_path / "data_here"
    flags = []
    if case == "empty":
        path.mkdir()
    elif case == "too small":
        write_pngs(path, 20, size=(4, 4))
        flags = ["--hidden_dims", "8", "16", "32", "64", "--test_fraction", "0.3"]
    elif case == "float array":
        path = tmp_path / "floats.npy"
        np.save(path, np.zeros((10, 8, 8), dtype=np.float32))
    elif case == "no test images":
        write_pngs(path, 6)
        flags = ["--test_fraction", "0"]
    code, _, err = run_main(capsys, "--train", "--dataset", f"{path}{os.sep}" if case == "missing" else path,
                       "--output_dir", tmp_path / "out", "--data_dir", tmp_path / "cache", *flags)
    assert_one_line_error(code, err, words)
    assert not (tmp_path / "out" / "models").exists() or not any((tmp_path / "out").rglob("*.pt"))


def test_an_unknown_dataset_name_is_refused_by_the_parser(capsys):
    code, _, err = run_main(capsys, "--train", "--dataset", "imagenet")
    assert code == 2 and "neither a dataset" in err and len(err.strip().splitlines()) == 1
