"""Every field of a checkpoint, as a class (issue 24): each key and nested key of a real file is
removed or replaced with each wrong kind of value, and every mode that reads checkpoints is run
on the result. The cases come from the file itself, so a field added to the format later is
covered at once. Each run either works, or stops with one line naming the file and the field
and exit status 2, leaving the file as it was."""

import pytest
import torch

import checkpoint
from helpers import run_main, train_tiny

pytestmark = pytest.mark.long  # about 1,700 runs: the long tier (tests/conftest.py)


class Removed:
    """The key taken out."""


def nan_filled(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
        return torch.full_like(value, float("nan"))
    return None  # not a case for this value


def other_dtype(value):
    if isinstance(value, torch.Tensor):
        return value.long() if value.is_floating_point() else value.float()
    return None


def other_shape(value):
    if isinstance(value, torch.Tensor):
        return torch.zeros([s + 1 for s in value.shape] or [2], dtype=value.dtype)
    return None


MUTATIONS = {"removed": lambda v: Removed, "None": lambda v: None, "a list": lambda v: [1, 2],
             "a string": lambda v: "x", "a float NaN": lambda v: float("nan"), "2**70": lambda v: 2**70,
             "a tensor": lambda v: torch.zeros(3, 2, dtype=torch.int32), "NaN-filled": nan_filled,
             "another dtype": other_dtype, "another shape": other_shape}
# A field's value that may be anything: the flags record is for people, and no code reads it.
FREE = {"args"}
# The model's weights and Adam's state are many tensors of the same kind: the first and last
# two of each stand for them all (every key would be ~30 cases each, and no new kind of fault).
SAMPLED = {("model",): 2, ("optimizer", "state"): 1}
# Where training stands: read by --train --resume alone. The other modes are run on each such
# entry removed (they must not need it), not on every way of breaking it. The epochs trained are
# read by every mode (they choose the default prior), so they are broken every way in each.
RESUME_ONLY = tuple(key for key in (*checkpoint.PROGRESS_KEYS, "scaler") if key != "epoch")
MODES = {"--sample": ["--num_samples", 2], "--eval": ["--fid_samples", 0, "--iw_samples", 1, "--eval_images", 4],
         "--fit_prior": ["gmm", "--prior_components", 2], "--train": ["--resume", "--n_epochs", 2]}


def field_paths(value, path=()):
    if path:
        yield path
    if path and path[0] in FREE:
        return
    if isinstance(value, dict):
        keys = list(value)
        if path in SAMPLED:
            keys = keys[:SAMPLED[path]] + keys[-SAMPLED[path]:]
        for key in dict.fromkeys(keys):
            yield from field_paths(value[key], (*path, key))
    elif isinstance(value, list) and value and len(path) < 3:  # one history row, one param group
        yield from field_paths(value[0], (*path, 0))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    if len(path) == 1 and new is Removed:
        del copy[path[0]]
    else:
        copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


def get(value, path):
    for key in path:
        value = value[key]
    return value


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fields")
    path = train_tiny(folder, "--seed", 1, "--recon_loss", "bernoulli")
    return folder, torch.load(path, weights_only=True)


def cases(raw):
    for path in field_paths(raw):
        for name, mutate in MUTATIONS.items():
            new = mutate(get(raw, path))
            if new is not None or name == "None":
                yield path, name, replaced(raw, path, new)


@pytest.mark.parametrize("mode", MODES)
def test_every_field_of_a_checkpoint_broken_every_way_is_one_line_or_works(capsys, tmp_path, good, mode):
    folder, raw = good
    file = tmp_path / "broken.pt"
    failures, runs, worked = [], 0, 0
    for path, how, broken in cases(raw):
        if mode != "--train" and path[0] in RESUME_ONLY and how != "removed":
            continue
        torch.save(broken, file)
        before = file.read_bytes()
        field = ".".join(map(str, path))
        runs += 1
        try:
            code, _, err = run_main(capsys, mode, *MODES[mode], "--checkpoint", file, "--data_dir",
                                    folder / "data", "--output_dir", tmp_path / "out", "--threads", 1)
        except Exception as e:  # what a user would see as a traceback
            failures.append(f"{field} {how}: {type(e).__name__}: {e}"[:300])
            capsys.readouterr()
            continue
        lines = err.strip().splitlines()
        if code == 2:
            # the file, and the field: its key or one of the keys above it ("gmm prior")
            named = bool(lines) and str(file) in lines[-1] and any(str(key) in lines[-1] for key in path)
            if len(lines) != 1 or not named or file.read_bytes() != before:
                failures.append(f"{field} {how}: {lines}")
        elif code == 0:
            worked += 1
        if code not in (0, 2):
            failures.append(f"{field} {how}: exit {code}: {lines[-1:] if lines else ''}")
        elif mode in ("--sample", "--eval") and file.read_bytes() != before:
            failures.append(f"{field} {how}: {mode} changed the file")
    print(f"{mode}: {runs} broken files, {worked} worked, {runs - worked - len(failures)} refused in one line")
    assert runs > 200, runs  # the class really was covered
    assert not failures, "\n".join(failures)
