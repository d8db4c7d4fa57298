"""The datasets: find them on disk (or download them), load each split once into a uint8
tensor, and the test-time transforms (a fixed binarisation, another dataset's shape).

A dataset is one of DATASETS by name, or the path of the user's own images (a folder or a
.npy/.npz file), which images.py decodes; load_splits and load_test_images take either.

Every dataset is read by its own library (torchvision or medmnist) from `data_dir`:
MNIST in data_dir/MNIST/raw, Fashion-MNIST in data_dir/FashionMNIST/raw, CIFAR-10 in
data_dir/cifar-10-batches-py, SVHN as data_dir/{train,test}_32x32.mat, MedMNIST as
data_dir/<flag>.npz (28 px) or data_dir/<flag>_<size>.npz.
"""

import gzip
import os
import pickle
import shutil
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets

import images as image_files  # the user's own images (`images` names tensors here)
from settings import DATASETS, TEST_FRACTION
from util import UserError, first_line, stops_held

MEDMNIST_SIZES = (28, 64, 128, 224)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist

# Looked up at call time, so a test can swap in a subclass whose md5 entries are None.
TORCHVISION_CLASSES = {"mnist": datasets.MNIST, "fashionmnist": datasets.FashionMNIST,
                       "cifar10": datasets.CIFAR10, "svhn": datasets.SVHN}
# medmnist is imported only when one of these is read (medmnist_class): its import pulls in
# pandas and scikit-learn, which a user of the other datasets (or a GPU machine) need not have.
MEDMNIST_CLASS_NAMES = {"chestmnist": "ChestMNIST", "octmnist": "OCTMNIST", "tissuemnist": "TissueMNIST",
                        "pneumoniamnist": "PneumoniaMNIST"}
NATIVE_SHAPES = {"mnist": (1, 28, 28), "fashionmnist": (1, 28, 28),
                 "cifar10": (3, 32, 32), "svhn": (3, 32, 32)}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BINARIZE_TEST_SEED = 0  # every model is evaluated on the same binarisation of the test set


def is_named(dataset):
    """Whether `dataset` is one of the named datasets (else it is the path of the user's images)."""
    return dataset in DATASETS


def dataset_name(dataset):
    """The name a model, checkpoint and run folder carry: the dataset's, or the folder's or
    file's base name for the user's own images."""
    return dataset if is_named(dataset) else image_files.source_name(dataset)


def load_splits(dataset, data_dir, image_size=None, own_images=None):
    """(train images, test images, test labels, source) of a named dataset or the user's images.

    own_images: {"channels", "test_fraction", "strict"} for a path (None: their defaults).
    source is None for a named dataset; for a path it describes the files and the options
    they were read with (TrainingRecord.data_source), so the same split can be read again and a
    changed folder noticed. Decoded user images are cached in data_dir."""
    if is_named(dataset):
        train = load_split(dataset, "train", data_dir, image_size)[0]
        test, labels = load_split(dataset, "test", data_dir, image_size)
        return train, test, labels, None
    options = {"channels": None, "test_fraction": TEST_FRACTION, "strict": False, **(own_images or {})}
    loaded = image_files.load_source(dataset, image_size=image_size, cache_dir=data_dir, **options)
    info = loaded["info"]
    source = {"path": info["path"], "kind": info["kind"], "fingerprint": info["fingerprint"],
              "n_train": int(info["n_train"]), "n_test": int(info["n_test"]),
              "image_shape": [int(v) for v in info["image_shape"]], "image_size": image_size,
              "channels": options["channels"], "test_fraction": float(options["test_fraction"]),
              "classes": list(info.get("classes") or [])}
    return loaded["train"], loaded["test"], loaded["test_labels"], source


def source_options(source):
    """The own_images options a recorded data_source was read with."""
    return {"channels": source["channels"], "test_fraction": source["test_fraction"]}


def medmnist_module():
    with stops_held():  # its import's bare `except:` would swallow a Ctrl-C
        import medmnist
    return medmnist


def medmnist_class(name):
    return getattr(medmnist_module(), MEDMNIST_CLASS_NAMES[name])


def image_shape(name, image_size=None):
    """(C, H, W) of the dataset's images; image_size picks a MedMNIST resolution (default 28)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name in MEDMNIST_CLASS_NAMES:
        size = 28 if image_size is None else image_size
        if size not in MEDMNIST_SIZES:
            raise UserError(f"{name} comes in sizes {', '.join(map(str, MEDMNIST_SIZES))}, "
                            f"not {size}")
        return (1, size, size)
    shape = NATIVE_SHAPES[name]
    if image_size is not None and image_size != shape[1]:
        raise UserError(f"{name} images are {shape[1]}x{shape[2]}; only MedMNIST has other sizes "
                        f"(asked for {image_size})")
    return shape


def load_split(name, split, data_dir, image_size=None, download=True):
    """Images uint8 (N, C, H, W), contiguous, and labels int64 (N,) of one split ("train" or "test").

    Files are looked for in data_dir first; Fashion-MNIST is then taken from Debian's
    dataset-fashion-mnist package if installed; only then, if download is true, does the
    library download them. ChestMNIST is multi-label (14 findings): its label here is 1 if
    any finding is present, else 0. SVHN's label 10 (digit 0) is 0, as torchvision gives it.
    Any missing, unreadable or undownloadable file raises UserError naming it."""
    shape = image_shape(name, image_size)
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', not {split!r}")
    data_dir = os.fspath(data_dir)
    size = shape[-1]
    needed = _needed_files(name, split, data_dir, size)
    if name == "fashionmnist" and _missing(needed):
        _copy_debian_fashion_mnist(os.path.dirname(needed[0]))
    missing = _missing(needed)
    folder = os.path.dirname(needed[0])
    if name in ("mnist", "fashionmnist") and not missing:  # torchvision would only assert
        for path in needed:
            problem = _idx_problem(path)
            if problem:
                raise UserError(f"{name}: {path} is not a readable IDX file: {problem}")
    if missing and not download:
        raise UserError(f"{name}: no copy in {folder} ({os.path.basename(missing[0])} is missing) "
                        f"and downloading is off; allow the download or copy the files there"
                        f"{_how_to_get(name)}")
    # What exists before a download, so a failed one can remove the folders it made (walked only
    # then: data_dir may hold large folders of the user's images).
    folders_before = _folders(data_dir) if missing else None
    if missing:
        os.makedirs(data_dir, exist_ok=True)  # medmnist refuses a root that does not exist
    try:
        images, labels = _read(name, split, data_dir, size, download=bool(missing))
    except Exception as error:  # the libraries raise anything from AssertionError to KeyError
        if _missing(needed):
            if folders_before is not None:
                _remove_new_empty_folders(data_dir, folders_before)
            raise UserError(f"{name}: no copy in {folder} and the download failed "
                            f"(no internet? {first_line(error)}); run once on a machine that is "
                            f"online and copy the files there{_how_to_get(name)}") from None
        bad_file = _unreadable_file(name, needed) or folder
        raise UserError(f"{name}: could not read {bad_file}: {first_line(error)}") from None
    if images.shape[1:] != shape or images.dtype != torch.uint8 or len(labels) != len(images):
        raise UserError(f"{name}: the {split} split in {data_dir} holds {tuple(images.shape)} "
                        f"{images.dtype} images and {len(labels)} labels; expected uint8 "
                        f"(N, {', '.join(map(str, shape))}) and one label per image")
    return images.contiguous(), labels


def _folders(data_dir):
    """Every folder from the root down to data_dir and below it that exists now."""
    path, found = os.path.abspath(data_dir), set()
    while True:
        found.add(path)
        if os.path.dirname(path) == path:
            break
        path = os.path.dirname(path)
    for root, dirs, _ in os.walk(data_dir):
        found.update(os.path.abspath(os.path.join(root, d)) for d in dirs)
    return {p for p in found if os.path.isdir(p)}


def _remove_new_empty_folders(data_dir, before):
    """After a failed download: remove the empty folders it created (torchvision makes
    data_dir/MNIST/raw before it learns it is offline), deepest first, so a run that could not
    start leaves nothing behind. Folders that were there before, or hold anything, stay."""
    created = sorted(_folders(data_dir) - before, key=len, reverse=True)
    for folder in created:
        try:
            os.rmdir(folder)  # only if empty
        except OSError:
            pass


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")  # batches.meta's label_names, known without reading the files


def class_names(dataset, source=None):
    """The names of the test labels load_test_images returns, by label: a named dataset's
    classes (MedMNIST's from medmnist.INFO; ChestMNIST's multi-label set is reduced to 'no
    finding'/'any finding' as its labels are), the subfolder names of the user's images, or
    None where the labels have no names."""
    if dataset == "fashionmnist":
        return list(datasets.FashionMNIST.classes)
    if dataset in ("mnist", "svhn"):
        return [str(d) for d in range(10)]
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    if dataset == "chestmnist":
        return ["no finding", "any finding"]
    if dataset in MEDMNIST_CLASS_NAMES:
        labels = medmnist_module().INFO[dataset]["label"]
        return [labels[str(i)] for i in range(len(labels))]
    classes = (source or {}).get("classes")
    return list(classes) if classes else None


def load_test_images(dataset, data_dir, image_size=None, n_images=None, shape=None, binarize=False,
                     binarize_seed=BINARIZE_TEST_SEED, own_images=None, every_image=False):
    """The first n_images of a test split (all if None), brought to `shape` if given and
    binarised with a fixed seed if asked: the images --eval and --outlier_detection score.
    every_image: the user's own images all count (outliers no model was trained on)."""
    if is_named(dataset):
        images, labels = load_split(dataset, "test", data_dir, image_size)
    elif every_image:
        own_images = {**(own_images or {}), "test_fraction": 0.0}
        images, _, _, _ = load_splits(dataset, data_dir, image_size, own_images)
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
    else:
        _, images, labels, _ = load_splits(dataset, data_dir, image_size, own_images)
    if images.shape[0] == 0:
        raise UserError(f"{dataset} has no test images", remedy=("more_test_images", {}))
    images, labels = images[:n_images], labels[:n_images]
    if shape is not None:
        images = match_shape(images, shape)
    return (binarize_fixed(images, binarize_seed) if binarize else images), labels


def binarize_fixed(images_uint8, seed=BINARIZE_TEST_SEED):
    """A fixed (seeded) binarisation of uint8 images, returned as uint8 in {0, 255}: each pixel
    is 1 with probability its intensity (Salakhutdinov and Murray 2008)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images_uint8.float().div(255), generator=generator).mul(255).to(torch.uint8)


def match_shape(images, shape):
    """uint8 (N, C, H, W) images brought to (C', H', W') `shape`, the one way outlier detection
    compares datasets: RGB to grey by the mean of the channels, grey to RGB by repeating it,
    then a bilinear resize (antialiased when shrinking), rounded back to uint8."""
    channels, height, width = shape
    x = images.float()
    if x.shape[1] != channels:
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise UserError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")
    if tuple(x.shape[2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                          antialias=height < x.shape[2] or width < x.shape[3])
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _needed_files(name, split, data_dir, size):
    """Every file the library insists on before it reads `split`."""
    if name in ("mnist", "fashionmnist"):
        raw = os.path.join(data_dir, TORCHVISION_CLASSES[name].__name__, "raw")
        return [os.path.join(raw, f) for f in IDX_FILES]  # torchvision wants all four for either split
    if name == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        return [os.path.join(data_dir, "cifar-10-batches-py", f) for f in batches]
    if name == "svhn":
        return [os.path.join(data_dir, f"{split}_32x32.mat")]
    suffix = "" if size == 28 else f"_{size}"
    return [os.path.join(data_dir, f"{medmnist_class(name).flag}{suffix}.npz")]


def _missing(paths):
    return [p for p in paths if not os.path.isfile(p)]


def _read(name, split, data_dir, size, download):
    """The split's arrays taken straight from the library's dataset object."""
    if name in MEDMNIST_CLASS_NAMES:
        # Never len(dataset): medmnist asserts the official sample count there.
        dataset = medmnist_class(name)(split=split, root=data_dir, download=download, size=size)
        images = torch.from_numpy(np.ascontiguousarray(dataset.imgs)).unsqueeze(1)
        labels = dataset.labels.any(axis=1) if name == "chestmnist" else dataset.labels[:, 0]
        return images, torch.from_numpy(labels.astype(np.int64))
    cls = TORCHVISION_CLASSES[name]
    if name == "svhn":
        dataset = cls(data_dir, split=split, download=download)
        return torch.from_numpy(dataset.data), torch.from_numpy(dataset.labels).long()
    dataset = cls(data_dir, train=(split == "train"), download=download)
    if name == "cifar10":  # torchvision hands CIFAR out as (N, H, W, C)
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.tensor(dataset.targets)
    return dataset.data.unsqueeze(1), dataset.targets.long()


def _copy_debian_fashion_mnist(raw_folder):
    """Decompress Debian's four .gz files into raw_folder; torchvision rejects their md5s as .gz."""
    sources = [os.path.join(DEBIAN_FASHION_MNIST, f + ".gz") for f in IDX_FILES]
    if _missing(sources):
        return
    for source, name in zip(sources, IDX_FILES):
        target = os.path.join(raw_folder, name)
        if os.path.isfile(target):
            continue
        tmp_path = None
        try:
            os.makedirs(raw_folder, exist_ok=True)
            fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=raw_folder)
            with gzip.open(source, "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp_path, target)  # an interrupted copy leaves no half file under the real name
            tmp_path = None
        except (OSError, EOFError) as error:
            raise UserError(f"fashionmnist: could not copy {source} into {raw_folder}: "
                            f"{first_line(error)}") from None
        finally:
            if tmp_path is not None and os.path.exists(tmp_path):
                os.remove(tmp_path)


def _unreadable_file(name, paths):
    """After the library failed: the first file that is plainly broken, or None if none is."""
    if len(paths) == 1:
        return paths[0]
    for path in paths:
        try:
            if name == "cifar10":
                with open(path, "rb") as f:
                    pickle.load(f, encoding="latin1")
            elif not _idx_size_matches(path):
                return path
        except Exception:
            return path
    return None


def _idx_size_matches(path):
    return _idx_problem(path) is None


def _idx_problem(path):
    """What is wrong with an IDX file of unsigned bytes (LeCun's format: 0, 0, the dtype byte 0x08,
    the number of dimensions, then each size as a big-endian uint32, then one byte per element:
    3 dimensions for images, 1 for labels), in words; None when nothing is."""
    expected_ndim = 1 if "labels" in os.path.basename(path) else 3
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4:
            return f"{size} bytes: too short for an IDX header (truncated?)"
        if header[:2] != b"\0\0":
            return f"it starts {header[:2].hex(' ')}, not 00 00: not an IDX file"
        if header[2] != 0x08:
            return f"its dtype byte is 0x{header[2]:02x}, not 0x08 (unsigned bytes)"
        if header[3] != expected_ndim:
            return f"it has {header[3]} dimensions, not {expected_ndim}"
        dims = np.frombuffer(f.read(4 * header[3]), dtype=">u4")
    if len(dims) != header[3]:
        return f"{size} bytes: its header is cut short (truncated?)"
    expected = 4 + 4 * len(dims) + int(np.prod(dims, dtype=np.int64))
    if size != expected:
        shape = " x ".join(map(str, dims))
        return f"its header says {shape} ({expected} bytes) but it has {size} bytes"
    return None


def _how_to_get(name):
    if name == "fashionmnist":
        return ", or `apt-get install dataset-fashion-mnist`"
    return ""
