"""Every path flag, every way a path fails, in every mode (issue 24): one line naming the flag,
the path and the reason, exit 2, nothing created. The cases are generated: each flag a mode
uses, times each failure that applies to what the flag needs (a folder or a file; to read, to
create or both). Root passes every permission check, so those cases run as a real process of
the unprivileged user `nobody`; a read-only filesystem is a real tmpfs mounted read-only."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import VanVAE
from helpers import ENV, ROOT, WAIT_S, assert_one_line_error, run_main, snapshot

MODES = {"--train": [], "--sample": [], "--eval": ["--fid_samples", 0], "--fit_prior": ["gmm"],
         "--outlier_detection": [], "--train --resume": []}


def flags_of(mode):
    """The path flags `mode` reads, as VanVAE.path_checks sees them: {flag: (kind, need)}."""
    args = VanVAE.build_parser().parse_args([*mode.split(), *map(str, MODES[mode]), "--checkpoint", "c.pt"])
    args.dataset, args.out_dataset = "some/images", "other/images"
    flags = {flag: (kind, need) for flag, _, kind, need in VanVAE.path_checks(args)}
    flags["--data_dir"] = ("folder", "write")  # a missing one is created: its failures are creation's
    return flags


def failures(kind, need):
    """The ways a path of this kind and need can fail, as the cases name them."""
    names = ["a broken symbolic link", "a name too long"]
    names += ["missing"] if need != "write" else ["below a file (cannot be created)", "below a broken link"]
    names += {"folder": ["a file where a folder belongs"], "file": ["a folder where a file belongs"]}.get(kind, [])
    return names


def broken_paths(tmp, kind, need):
    """{failure: path} of every failure(kind, need), made under tmp."""
    (tmp / "a_file").write_text("x")
    (tmp / "a_folder").mkdir()
    os.symlink(tmp / "nowhere", tmp / "dangling")
    paths = {"a broken symbolic link": tmp / "dangling", "a name too long": tmp / ("n" * 300),
             "missing": tmp / "missing",
             "below a file (cannot be created)": tmp / "a_file" / "sub" / ("x.pt" if kind == "file" else "d"),
             "below a broken link": tmp / "dangling" / "sub",
             "a file where a folder belongs": tmp / "a_file", "a folder where a file belongs": tmp / "a_folder"}
    return {name: paths[name] for name in failures(kind, need)}


REASONS = {"a broken symbolic link": "broken symbolic link", "a name too long": "bytes long",
           "missing": "no such", "below a file (cannot be created)": "is a file, not a folder",
           "below a broken link": "broken symbolic link", "a file where a folder belongs": "is a file",
           "a folder where a file belongs": "is a folder"}


CASES = [(mode, flag, failure) for mode in MODES for flag, (kind, need) in flags_of(mode).items()
         for failure in failures(kind, need)]


@pytest.mark.parametrize("mode, flag, failure", CASES)
def test_a_path_flag_that_cannot_serve_is_one_line_in_every_mode(capsys, tmp_path, mode, flag, failure):
    kind, need = flags_of(mode)[flag]
    path = broken_paths(tmp_path, kind, need)[failure]
    before = snapshot(tmp_path)
    outliers = ["--out_dataset", "mnist"] if "outlier" in mode and flag != "--out_dataset" else []
    words = [*mode.split(), *MODES[mode], *outliers, flag, path]
    if flag != "--output_dir":
        words += ["--output_dir", tmp_path / "out"]
    code, _, err = run_main(capsys, *words)
    assert_one_line_error(code, err, f"{flag} {path}", REASONS[failure])
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- what root never sees

@pytest.fixture
def world_readable(tmp_path):
    """A scratch folder every user can enter (pytest's own is root's alone), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="vanvae-perm-"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=True)


def as_nobody(*args):
    """VanVAE.py as a real process of the user nobody (exit status, stderr)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become the unprivileged user nobody")
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, str(ROOT / "VanVAE.py"), *map(str, args)], cwd=ROOT,
                          env={**ENV, "HOME": "/nonexistent"}, capture_output=True, text=True, timeout=WAIT_S)
    return done.returncode, done.stderr


def locked(folder, mode):
    """A folder of root's that nobody may only do `mode` with (0o755: read and enter)."""
    folder.mkdir()
    folder.chmod(mode)
    return folder


PERMISSION_CASES = {
    # flag: (mode, path maker, the reason's words)
    "--output_dir": ("--sample", lambda f: locked(f / "ro", 0o755) / "out", "permission denied"),
    "--data_dir": ("--train", lambda f: locked(f / "secret", 0o700), "cannot be read"),
    "--dataset": ("--train", lambda f: locked(f / "photos", 0o700), "cannot be read"),
    "--checkpoint": ("--sample", lambda f: _private_file(f / "c.pt"), "cannot be read"),
    "--checkpoint for --fit_prior": ("--fit_prior", lambda f: _file_in_locked(f), "permission denied"),
}


def _private_file(path):
    path.write_bytes(b"x")
    path.chmod(0o600)
    return path


def _file_in_locked(folder):
    path = _private_file(locked(folder / "models", 0o777) / "c.pt")
    path.chmod(0o644)  # readable, but its folder...
    path.parent.chmod(0o755)  # ...takes no new file, so it cannot be replaced
    return path


@pytest.mark.parametrize("case", PERMISSION_CASES)
def test_a_path_the_user_may_not_use_is_one_line(world_readable, case):
    mode, make, words = PERMISSION_CASES[case]
    flag = case.split()[0]
    path = make(world_readable)
    out = world_readable / "out_ok"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    extra = ["gmm"] if mode == "--fit_prior" else []
    others = [] if flag == "--output_dir" else ["--output_dir", out]
    if flag != "--data_dir":  # the default ./data may not exist, and nobody cannot create it
        others += ["--data_dir", out / "data"]
    code, err = as_nobody(mode, *extra, flag, path, *others)
    assert_one_line_error(code, err, f"{flag} {path}", words)
    assert list(out.iterdir()) == []  # not even the data folder


def test_a_read_only_filesystem_is_named(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        for mode, flag in (("--train", "--output_dir"), ("--train", "--data_dir"), ("--train", "--checkpoint")):
            path = folder / ("c.pt" if flag == "--checkpoint" else "sub")
            code, _, err = run_main(capsys, mode, flag, path, *([] if flag == "--output_dir" else
                                                                 ["--output_dir", tmp_path / "out"]))
            assert_one_line_error(code, err, f"{flag} {path}", "read-only filesystem")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
    assert not (tmp_path / "out").exists()
