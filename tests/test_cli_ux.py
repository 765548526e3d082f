"""The command line's own surface: one-line usage errors with exit code 2, --version, flags shown without a type."""

from __future__ import annotations

import re

import pytest

from flowmap_convert.cli import main


def run(argv, capsys):
    """(exit code, stdout, stderr) of `flowmap ARGV` through the console-script entry point."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.e2e
@pytest.mark.parametrize(
    "argv, says, command",
    [
        (["convert", "--bogus"], "no such option: --bogus", "flowmap convert"),
        (["sample", "--nfe", "x"], "invalid value for '--nfe'", "flowmap sample"),
        (["convert", "--depth"], "option '--depth' requires an argument", "flowmap convert"),
        (["push", "some-dir"], "missing argument 'repo_id'", "flowmap push"),
        (["frobnicate"], "no such command 'frobnicate'", "flowmap"),
    ],
)
def test_usage_errors_are_one_line_with_the_fix(argv, says, command, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and says in lines[0]
    assert lines[0].endswith(f"see `{command} --help`.")
    assert not re.search(r"[╭│╰]|Usage:|Traceback", err)


@pytest.mark.e2e
def test_version(capsys):
    from flowmap_convert import __version__

    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"flowmap-convert {__version__}" and err == ""


@pytest.mark.e2e
def test_bare_flowmap_prints_help_listing_push(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "push" in out and "convert" in out and "--version" in out


@pytest.mark.e2e
def test_help_shows_no_type_for_flags(capsys):
    code, out, _ = run(["sample", "--help"], capsys)
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"^│ --[\w-]+", line)}
    assert "<bool>" not in out
    assert "<int>" in rows["--nfe"] and "<int>" not in rows["--npz"] and "--help" in rows


@pytest.mark.e2e
def test_user_errors_still_exit_2_in_one_line(capsys, tmp_path):
    code, _, err = run(["convert", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such file" in err


@pytest.mark.e2e
def test_builtin_digits_sit_says_what_it_is(capsys, tmp_path):
    code, out, _ = run(["convert", "builtin:digits-sit", "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    assert "family      flowmap (builtin digits SiT, exported by flowmap)" in out and "weights     ema" in out
    assert "weights     -" not in out


@pytest.mark.e2e
def test_the_digits_classifier_is_not_a_model(capsys, tmp_path):
    code, _, err = run(["convert", "builtin:digits-classifier", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "evaluation classifier" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["convert", "builtin:nope", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "builtin:digits-sit" in err and "classifier" not in err
    assert not (tmp_path / "o").exists()


def test_finetune_card_labels_its_grid():
    from conftest import tiny_config

    from flowmap_convert.card import model_card

    cfg = tiny_config().replace(training={"steps": 3}, provenance={"source": "x", "family": "flowmap"})
    card = model_card(cfg, has_grid=True, repo_id="alice/m", figures=["loss.png"])
    assert "Rows: 1 and 2 network evaluations (Euler, seed 0); columns: classes 0..9, one sample each." in card
    assert "![loss](loss.png)" in card and "flowmap sample alice/m --nfe 1" in card
    assert "| family | flowmap (a model exported by flowmap) |" in card
