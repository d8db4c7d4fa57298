"""images.py: a user's own folders and array files, written here with Pillow and numpy."""

import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import image_arrays
import image_decode
import image_results
import images
import settings
from util import UserError


def save(path, picture, **kwargs):
    """Write a Pillow image or a uint8 array as an image file, making its folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    picture.save(path, **kwargs)


def numbered_pngs(folder, numbers, size=(8, 8)):
    """Grey PNGs whose first two pixels spell their number, so a test can find each in a split."""
    for number in numbers:
        pixels = np.zeros((size[1], size[0]), np.uint8)
        pixels[0, 0], pixels[0, 1] = divmod(number, 256)
        save(os.path.join(folder, f"img{number:04d}.png"), pixels)


def numbers_in(batch):
    return {int(image[0, 0, 0]) * 256 + int(image[0, 0, 1]) for image in batch}


def truncated_png(path):
    save(path, np.full((16, 16), 200, np.uint8))
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) // 2])


@pytest.fixture
def no_hang():
    """Fail a test that runs for more than 60 s instead of hanging the run."""
    def fail(*_):
        raise TimeoutError("the load did not finish in 60 s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- folders ----

def test_mixed_sizes_are_resized_then_centre_cropped(tmp_path):
    wide = np.zeros((10, 40), np.uint8)
    wide[:, 13:28] = 255  # the centre 10 px square, with 3 px to spare for the filter's reach
    save(tmp_path / "f" / "wide.png", wide)
    save(tmp_path / "f" / "deep" / "er" / "tall.png", np.full((30, 10), 255, np.uint8))
    save(tmp_path / "f" / "deep" / "square.bmp", np.full((16, 16), 255, np.uint8))

    result = images.load_source(tmp_path / "f", image_size=5, test_fraction=0)

    assert result["train"].shape == (3, 1, 5, 5) and result["train"].dtype == torch.uint8
    assert result["train"].is_contiguous()
    assert (result["train"] == 255).all()  # the black sides of wide.png were cropped away
    assert result["test"].shape == (0, 1, 5, 5) and result["test_labels"].shape == (0,)
    assert result["info"]["image_shape"] == (1, 5, 5) and result["info"]["n_test"] == 0


def test_sorted_by_path_with_colour_and_class_subfolders(tmp_path):
    for folder, number in (("a", 2), ("a", 10), ("b", 1)):
        pixels = np.zeros((6, 12, 3), np.uint8)
        pixels[..., 0] = number
        save(tmp_path / "f" / folder / f"{number}.png", pixels)
    (tmp_path / "f" / "a" / "notes.txt").write_text("not an image")

    result = images.load_source(tmp_path / "f", test_fraction=0)

    assert result["train"].shape == (3, 3, 6, 12)  # the shared size, height then width
    assert result["train"][:, 0, 0, 0].tolist() == [10, 2, 1]  # a/10.png < a/2.png < b/1.png
    assert result["train_labels"].tolist() == [0, 0, 1]
    assert result["info"]["classes"] == ["a", "b"] and result["info"]["kind"] == "folder"


def test_train_and_test_folders_are_the_splits(tmp_path):
    for rel in ("train/cat/x.png", "train/dog/y.png", "test/cat/z.png", "elsewhere/w.png"):
        save(tmp_path / "f" / rel, np.zeros((8, 8), np.uint8))

    result = images.load_source(tmp_path / "f", test_fraction=0.9)

    info = result["info"]
    assert (info["n_train"], info["n_test"], info["classes"]) == (2, 1, ["cat", "dog"])
    assert result["train_labels"].tolist() == [0, 1] and result["test_labels"].tolist() == [0]


def test_every_mode_becomes_rgb_with_transparency_on_white(tmp_path):
    f = tmp_path / "f"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # every other pixel: black, fully transparent
    save(f / "a_rgba.png", rgba)
    save(f / "b_grey16.png", np.array([[65535, 32896, 0, 0]] * 4, np.uint16))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.putpixel((0, 0), 1)
    save(f / "c_palette.gif", palette, transparency=0)
    save(f / "d_cmyk.tif", Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    save(f / "e_cmyk.jpg", Image.new("CMYK", (4, 4), (0, 255, 255, 0)))

    rgba_, grey16, gif, tif, jpg = images.load_source(f, test_fraction=0)["train"]

    assert rgba_[:, 0, 0].tolist() == [255, 0, 0] and (rgba_[:, 1:, :] == 255).all()
    assert grey16[:, 0, :3].T.tolist() == [[255] * 3, [128] * 3, [0] * 3]
    assert gif[:, 0, 0].tolist() == [0, 0, 255] and (gif[:, 1:, :] == 255).all()
    assert tif[:, 0, 0].tolist() == [255, 0, 0]
    assert (jpg[0] > 230).all() and (jpg[1:] < 25).all()  # JPEG: red, give or take its loss


def test_grey_images_of_every_kind_give_one_channel(tmp_path):
    f = tmp_path / "f"
    save(f / "l.png", np.full((4, 4), 7, np.uint8))
    save(f / "i16.png", np.full((4, 4), 65535, np.uint16))
    save(f / "la.png", Image.new("LA", (4, 4), (0, 0)))
    grey_palette = Image.new("P", (4, 4), 1)
    grey_palette.putpalette([0, 0, 0, 90, 90, 90])
    save(f / "p.gif", grey_palette)

    result = images.load_source(f, test_fraction=0)

    assert result["info"]["image_shape"] == (1, 4, 4)
    i16, grey, la, gif = result["train"][:, 0, 0, 0].tolist()  # in file name order
    assert (i16, grey, la, gif) == (255, 7, 255, 90)  # transparent LA: white


def test_jpeg_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[image_decode.EXIF_ORIENTATION] = 6  # stored on its side: a viewer turns it upright
    save(tmp_path / "f" / "photo.jpg", np.zeros((6, 12), np.uint8), exif=exif)

    result = images.load_source(tmp_path / "f", test_fraction=0)

    assert result["info"]["image_shape"] == (1, 12, 6)


def test_mixed_sizes_without_image_size_name_the_sizes(tmp_path):
    numbered_pngs(tmp_path / "f", range(3), size=(8, 8))
    save(tmp_path / "f" / "odd.png", np.zeros((6, 10), np.uint8))

    with pytest.raises(UserError, match=r"2 sizes .*8x8 \(3 images\), 10x6 \(1 image\)") as caught:
        images.load_source(tmp_path / "f")
    assert caught.value.remedies == [("one_image_size", {})]  # the command line words it (test_own_images)


def test_unreadable_images_are_skipped_with_one_warning(tmp_path, capsys):
    f = tmp_path / "f"
    numbered_pngs(f, range(5))
    truncated_png(f / "cut.png")  # its header reads; its pixels do not
    (f / "fake.png").write_text("not a picture")  # not even a header
    (f / "readme.txt").write_text("ignored: not an image extension")

    for image_size in (None, 8):  # with image_size and channels given, no header pass runs
        result = images.load_source(f, image_size=image_size, channels=1, test_fraction=0)
        assert numbers_in(result["train"]) == set(range(5)) and result["info"]["skipped"] == 2
        warning = capsys.readouterr().err.strip()
        assert len(warning.splitlines()) == 1 and warning.startswith("warning: skipped 2")
        assert "cut.png" in warning and "fake.png" in warning and "readme" not in warning

    with pytest.raises(UserError, match="2 image file.*cut.png.*fake.png"):
        images.load_source(f, image_size=8, channels=1, strict=True)


def test_strict_refuses_a_cached_result_with_skipped_files(tmp_path):
    numbered_pngs(tmp_path / "f", range(3))
    truncated_png(tmp_path / "f" / "cut.png")
    images.load_source(tmp_path / "f", cache_dir=tmp_path / "cache")

    with pytest.raises(UserError, match="cut.png"):
        images.load_source(tmp_path / "f", cache_dir=tmp_path / "cache", strict=True)


def test_held_out_split_is_stable_when_images_are_added(tmp_path):
    numbered_pngs(tmp_path / "f", range(300))
    before = images.load_source(tmp_path / "f", test_fraction=0.2)
    numbered_pngs(tmp_path / "f", range(300, 400))
    after = images.load_source(tmp_path / "f", test_fraction=0.2)

    held_out_before, held_out_after = numbers_in(before["test"]), numbers_in(after["test"])
    assert 30 < len(held_out_before) < 90  # about a fifth
    assert held_out_after & set(range(300)) == held_out_before
    assert numbers_in(before["train"]) | held_out_before == set(range(300))


def test_parallel_decoding_gives_the_serial_result(tmp_path, monkeypatch):
    numbered_pngs(tmp_path / "f", range(60))
    truncated_png(tmp_path / "f" / "cut.png")
    serial = images.load_source(tmp_path / "f", workers=1)
    monkeypatch.setattr(image_decode, "SERIAL_BELOW_FILES", 0)

    parallel = images.load_source(tmp_path / "f", workers=2)

    for key in ("train", "test", "train_labels", "test_labels"):
        assert torch.equal(parallel[key], serial[key])
    assert parallel["info"] == serial["info"] and parallel["info"]["skipped"] == 1


def test_symlink_loop_does_not_hang(tmp_path, no_hang):
    numbered_pngs(tmp_path / "a", range(3))
    numbered_pngs(tmp_path / "a" / "b", [3])
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "up")

    result = images.load_source(tmp_path / "a", test_fraction=0)

    assert numbers_in(result["train"]) == {0, 1, 2, 3} and result["info"]["n_train"] == 4


# ---- the cache ----

def test_cache_is_used_then_rebuilt_when_a_file_changes(tmp_path):
    numbered_pngs(tmp_path / "f", range(10))
    cache = tmp_path / "cache"
    first = images.load_source(tmp_path / "f", cache_dir=cache)
    second = images.load_source(tmp_path / "f", cache_dir=cache)

    assert not first["info"]["cached"] and second["info"]["cached"]
    for key in ("train", "test", "train_labels", "test_labels"):
        assert torch.equal(first[key], second[key])
    assert {**second["info"], "cached": False} == first["info"]

    changed = tmp_path / "f" / "img0004.png"
    numbered_pngs(tmp_path / "changed", [99])
    os.replace(tmp_path / "changed" / "img0099.png", changed)
    os.utime(changed, ns=(1, 1))
    third = images.load_source(tmp_path / "f", cache_dir=cache)

    assert not third["info"]["cached"] and 4 not in numbers_in(torch.cat([third["train"],
                                                                         third["test"]]))
    assert len(os.listdir(cache)) == 1  # the stale cache went
    (tmp_path / "f" / "img0000.png").unlink()
    assert not images.load_source(tmp_path / "f", cache_dir=cache)["info"]["cached"]


def test_cache_that_cannot_be_written_only_warns(tmp_path, capsys):
    numbered_pngs(tmp_path / "f", range(4))
    (tmp_path / "a_file").write_text("a cache folder cannot live below a file")

    result = images.load_source(tmp_path / "f", cache_dir=tmp_path / "a_file" / "cache")

    assert result["info"]["n_train"] + result["info"]["n_test"] == 4
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1 and warning.startswith("warning: images not cached")


def test_memory_refusal_comes_before_decoding(tmp_path, monkeypatch):
    numbered_pngs(tmp_path / "f", range(4))
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.uint8))
    monkeypatch.setattr(image_results, "_available_memory_bytes", lambda: 100)
    monkeypatch.setattr(image_decode, "_decode_chunk", None)  # decoding anything would fail loudly

    for source in ("f", "a.npy"):
        with pytest.raises(UserError, match="GB of memory, but only 0.00 GB is available"):
            images.load_source(tmp_path / source, image_size=32)


# ---- array files ----

@pytest.mark.parametrize("layout", ["NHW", "NHWC1", "NHWC3", "NCHW1", "NCHW3"])
def test_npy_in_each_layout(tmp_path, layout):
    rng = np.random.default_rng(0)
    channels = 3 if layout.endswith("3") else 1
    nchw = rng.integers(0, 256, (20, channels, 5, 7), dtype=np.uint8)
    stored = {"NHW": nchw[:, 0], "NCHW1": nchw, "NCHW3": nchw}.get(layout, nchw.transpose(0, 2, 3, 1))
    np.save(tmp_path / "x.npy", stored)

    whole = images.load_source(tmp_path / "x.npy", test_fraction=0)
    split = images.load_source(tmp_path / "x.npy", test_fraction=0.3)

    assert torch.equal(whole["train"], torch.from_numpy(nchw)) and whole["info"]["kind"] == "array"
    assert split["train"].is_contiguous() and split["test"].is_contiguous()
    assert 0 < split["info"]["n_test"] < 20
    together = torch.cat([split["train"], split["test"]])
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, nchw))


@pytest.mark.parametrize("train, test", image_arrays.SPLIT_PAIRS)
def test_npz_with_named_splits(tmp_path, train, test):
    np.savez(tmp_path / "d.npz", **{train: np.zeros((6, 4, 4, 3), np.uint8),
                                    test: np.ones((2, 4, 4, 3), np.uint8)})

    result = images.load_source(tmp_path / "d.npz")

    assert result["train"].shape == (6, 3, 4, 4) and (result["train"] == 0).all()
    assert result["test"].shape == (2, 3, 4, 4) and (result["test"] == 1).all()
    assert result["info"]["name"] == "d"


def test_npz_of_one_array_is_split_by_index(tmp_path):
    np.savez(tmp_path / "one.npz", pictures=np.zeros((40, 4, 4), np.uint8))

    info = images.load_source(tmp_path / "one.npz", test_fraction=0.25)["info"]

    assert info["n_train"] + info["n_test"] == 40 and 0 < info["n_test"] < 20


def test_arrays_are_converted_exactly_as_image_files(tmp_path):
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 16, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", hwc.transpose(0, 3, 1, 2))
    for i, pixels in enumerate(hwc):
        save(tmp_path / "f" / f"{i}.png", pixels)

    from_array = images.load_source(tmp_path / "x.npy", image_size=8, channels=1,
                                    test_fraction=0, cache_dir=tmp_path / "cache")
    from_files = images.load_source(tmp_path / "f", image_size=8, channels=1, test_fraction=0)

    assert from_array["train"].shape == (5, 1, 8, 8)
    assert torch.equal(from_array["train"], from_files["train"])
    assert images.load_source(tmp_path / "x.npy", image_size=8, channels=1, test_fraction=0,
                              cache_dir=tmp_path / "cache")["info"]["cached"]


# ---- what a user gets wrong ----

@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such folder or file"),
    (lambda p: p.mkdir() or p, "no image files"),
    (lambda p: p.mkdir() or (p / "a.txt").write_text("x") and p, "no image files"),
    (lambda p: (p / "x.png").parent.mkdir() or (p / "x.png").write_text("x") and p,
     "none of its 1 image files could be read"),
    (lambda p: p.with_suffix(".csv").write_text("x") and p.with_suffix(".csv"),
     "neither a folder of images nor a .npy or .npz file"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 4, 4), np.float32)) or
     p.with_suffix(".npy"), "float32 values; expected uint8"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 4, 4, 4), np.uint8)) or
     p.with_suffix(".npy"), r"shape \(2, 4, 4, 4\)"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 4, 4), np.uint8)) or
     p.with_suffix(".npy"), "holds no images"),
    (lambda p: np.savez(p.with_suffix(".npz"), a=np.zeros(2), b=np.zeros(2)) or
     p.with_suffix(".npz"), r"holds 2 arrays \(a, b\)"),
])
def test_bad_sources_raise_one_line_user_errors(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as caught:
        images.load_source(make(tmp_path / "source"))
    assert "\n" not in str(caught.value)


def test_path_or_name_and_the_name_it_gives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not settings.is_path_dataset("mnist")
    assert settings.is_path_dataset("photos/") and settings.is_path_dataset("faces.npz")
    (tmp_path / "local").mkdir()
    assert settings.is_path_dataset("local")
    assert images.source_name("my photos (2024)/") == "my_photos_2024"
    assert images.source_name(tmp_path / "faces.v2.npz") == "faces.v2"
    assert images.source_name(".") == tmp_path.name
    assert images.source_name("/tmp/..!!/") == "images"


def test_a_small_folder_always_holds_out_at_least_one_test_image(tmp_path):
    """A folder where no image's hash falls below the default 0.05 (48 images did, and were
    refused for an empty test split) holds out its image of least hash; once an image's hash
    does fall below the fraction, the split is the plain hash split again."""
    def by_hash(numbers):
        return {i for i in numbers if image_results.held_out_by_hash([f"img{i:04d}.png"], 0.05)[0]}
    start = next(s for s in range(0, 5000, 20) if not by_hash(range(s, s + 20)))
    numbered_pngs(tmp_path / "f", range(start, start + 20))
    result = images.load_source(tmp_path / "f")
    assert result["test"].shape[0] == 1 and result["train"].shape[0] == 19
    end = next(e for e in range(start + 21, start + 2000) if by_hash(range(start, e)))
    numbered_pngs(tmp_path / "f", range(start + 20, end))
    assert numbers_in(images.load_source(tmp_path / "f")["test"]) == by_hash(range(start, end))
    assert images.load_source(tmp_path / "f", test_fraction=0)["test"].shape[0] == 0
