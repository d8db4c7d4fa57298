"""Every flag's value domain, in every mode: a value outside it is one line and exit 2 before
any work (no import of the heavy libraries, no file or folder created), whatever the mode."""

import argparse

import pytest

import VanVAE
from helpers import (
    TINY_MODEL,
    assert_one_line_error,
    run_main,
    snapshot,
)

MODES = {"--train": [], "--sample": [], "--eval": [], "--outlier_detection": ["--out_dataset", "mnist"],
         "--fit_prior": ["gmm"]}
PARSER = VanVAE.build_parser()
NUMBER_FLAGS = {action.option_strings[0]: action for action in PARSER._actions
                if action.option_strings and getattr(action.type, "__name__", "") in ("parse", "fraction_type")}
CHOICE_FLAGS = {action.option_strings[0]: action for action in PARSER._actions
                if action.option_strings and action.choices and not isinstance(action, argparse._StoreTrueAction)
                and action.option_strings[0] not in ("--fit_prior",)}


def bad_numbers(flag):
    """Values no number flag takes, and the ones this flag's own rule refuses."""
    action = NUMBER_FLAGS[flag]
    values = ["abc", "nan", "inf", "-inf", "1e999", ""]
    for candidate in ("-1", "0", "1.5", "-0.5", str(2 ** 64)):
        try:
            action.type(candidate)
        except argparse.ArgumentTypeError:
            values.append(candidate)
    return values


def test_the_matrix_covers_every_number_and_choice_flag():
    assert {"--batch_size", "--n_epochs", "--lr", "--latent_dim", "--hidden_dims", "--num_samples", "--seed",
            "--kld_weight", "--iw_samples", "--fid_samples", "--eval_images", "--prior_components", "--threads",
            "--image_size", "--kl_warmup_epochs", "--progress_seconds", "--test_fraction"} <= set(NUMBER_FLAGS)
    assert {"--device", "--recon_loss", "--precision", "--prior", "--lr_schedule", "--channels"} <= set(CHOICE_FLAGS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", sorted(NUMBER_FLAGS))
def test_a_number_outside_its_domain_is_one_line_in_every_mode(capsys, tmp_path, mode, flag):
    for value in bad_numbers(flag):
        code, _, err = run_main(capsys, mode, *MODES[mode], "--output_dir", tmp_path / "out",
                                "--data_dir", tmp_path / "data", f"{flag}={value}")
        assert_one_line_error(code, err, flag)
        assert snapshot(tmp_path) == {}, (flag, value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", sorted(CHOICE_FLAGS))
def test_a_value_outside_the_choices_is_one_line_in_every_mode(capsys, tmp_path, mode, flag):
    code, _, err = run_main(capsys, mode, *MODES[mode], "--output_dir", tmp_path / "out",
                            "--data_dir", tmp_path / "data", flag,
                            "2" if CHOICE_FLAGS[flag].type is int else "no-such-choice")
    assert_one_line_error(code, err, flag, "invalid choice")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("mode", MODES)
def test_a_dataset_path_that_does_not_exist_is_one_line_in_every_mode(capsys, tmp_path, mode):
    code, _, err = run_main(capsys, mode, *MODES[mode], "--output_dir", tmp_path / "out",
                            "--dataset", tmp_path / "missing-folder")
    assert_one_line_error(code, err, "--dataset", "no such folder or file")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("mode", [m for m in MODES if m != "--train"])
def test_a_missing_checkpoint_is_one_line_in_every_mode_that_reads_one(capsys, tmp_path, mode):
    code, _, err = run_main(capsys, mode, *MODES[mode], "--output_dir", tmp_path / "out",
                            "--data_dir", tmp_path / "data", "--checkpoint", tmp_path / "none.pt")
    assert_one_line_error(code, err, "not found", "none.pt")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", ["--output_dir", "--data_dir", "--checkpoint"])
def test_a_path_of_the_wrong_kind_is_one_line_in_every_mode(capsys, tmp_path, mode, flag):
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "afolder").mkdir()
    wrong = tmp_path / ("afolder" if flag == "--checkpoint" else "afile")
    code, _, err = run_main(capsys, mode, *MODES[mode], flag, wrong)
    assert_one_line_error(code, err, flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "afolder"]
    assert list((tmp_path / "afolder").iterdir()) == []


@pytest.fixture(scope="module")
def empty_splits(tmp_path_factory):
    """MNIST folders in the real IDX format with no test images, and with no training images,
    and a model trained on a normal one."""
    from fakedata import write_dataset
    root = tmp_path_factory.mktemp("splits")
    write_dataset("mnist", root / "no_test", n_train=32, n_test=0)
    write_dataset("mnist", root / "no_train", n_train=0, n_test=8)
    write_dataset("mnist", root / "normal", n_train=32, n_test=8)
    assert VanVAE.main(["--train", "--data_dir", str(root / "normal"), "--output_dir", str(root / "out"),
                        "--n_epochs", "1", *TINY_MODEL,
                        "--seed", "1"]) == 0
    return root


@pytest.mark.parametrize("mode, split", [("--train", "no_test"), ("--train", "no_train"), ("--eval", "no_test"),
                                         ("--outlier_detection", "no_test"), ("--fit_prior", "no_train")])
def test_a_split_of_zero_images_is_one_line_in_every_mode_that_reads_it(capsys, tmp_path, empty_splits, mode, split):
    checkpoint = empty_splits / "out" / "models" / "VanillaVAE" / "VanillaVAE_mnist.pt"
    given = {"--train": ["--output_dir", tmp_path / "out"], "--fit_prior": ["--checkpoint", checkpoint]}.get(
        mode, ["--checkpoint", checkpoint, "--fid_samples", 0])
    capsys.readouterr()
    before = checkpoint.read_bytes()
    code, _, err = run_main(capsys, mode, *MODES[mode], "--data_dir", empty_splits / split, *given)
    assert_one_line_error(code, err, "mnist")
    assert checkpoint.read_bytes() == before and not (tmp_path / "out").exists()
