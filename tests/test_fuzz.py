"""Property test: random bad inputs to `flowmap convert` / `sample` never give a traceback, never touch
a file flowmap did not write, and finish within a bound. Fixed seed; runs the console entry point in-process."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from dit_reference import make_sd
from safetensors.torch import save_file

from flowmap_convert import cli

pytestmark = pytest.mark.e2e  # every test here drives the flowmap command line

CASE_SECONDS = 20
NUMBERS = ["0", "-1", "3", "nan", "inf", "-inf", "1e309", str(2**64), "abc", ""]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(argv, capsys, monkeypatch) -> tuple[int, str]:
    """cli.main() with `argv`; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["flowmap", *map(str, argv)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capsys.readouterr().err


def flip(data: bytes, rng: random.Random, n: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n):
        i = rng.randrange(min(len(buf), 4096))  # the header and the first tensors: where damage is interesting
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def test_random_bad_inputs_end_in_exit_0_or_one_line_exit_2(tmp_path, capsys, monkeypatch):
    rng = random.Random(13)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "user"  # files the tool did not write: must be byte-identical afterwards
    user.mkdir()
    sd = make_sd(channels=3, size=8, seed=40)  # pixel space: sampling needs no VAE
    good_st = user / "model.safetensors"
    save_file(sd, str(good_st))
    good_pt = user / "ckpt.pt"
    torch.save({"ema": sd, "args": {"model": "SiT-B/2"}}, good_pt)
    (user / "notes.txt").write_text("keep me")
    proj = user / "proj"
    proj.mkdir()
    (proj / "config.json").write_text("{}")
    export = tmp_path / "export"
    code, err = run_main(["convert", good_st, "--num-heads", "4", "--out", export], capsys, monkeypatch)
    assert code == 0, err
    base_cfg = json.loads((export / "config.json").read_text())

    work = tmp_path / "work"  # damaged copies, written by the test before each case
    work.mkdir()
    cases = []
    for i in range(16):
        kind = rng.choice(["truncate", "flip", "config", "options"])
        source = work / f"case{i}"
        if kind == "truncate":
            src = rng.choice([good_st, good_pt])
            data = src.read_bytes()
            (source := source.with_suffix(src.suffix)).write_bytes(data[: rng.randrange(len(data))])
        elif kind == "flip":
            src = rng.choice([good_st, good_pt])
            (source := source.with_suffix(src.suffix)).write_bytes(flip(src.read_bytes(), rng, rng.randint(1, 8)))
        elif kind == "config":
            shutil.copytree(export, source)
            cfg = dict(base_cfg)
            key = rng.choice(sorted(k for k in cfg if k != "flowmap_format"))
            cfg[key] = rng.choice([None, "4", -1, 0, 1e308, [1], {"a": 1}, True, float("nan"), 10**30])
            (source / "config.json").write_text(json.dumps(cfg))
        else:
            source = good_st
        options = ["--num-heads", "4"]
        if kind == "options" or rng.random() < 0.25:  # mostly good options, so damaged files reach the readers
            options = ["--num-heads", rng.choice(["4", *NUMBERS])]
            for opt in rng.sample(["--depth", "--encoder-depth"], k=rng.randint(0, 2)):
                options += [opt, rng.choice(NUMBERS)]
        fresh = tmp_path / f"out{i}"
        out = fresh if rng.random() < 0.6 else rng.choice([proj, user / "notes.txt", user, source, export])
        command = rng.choice(["convert", "convert", "sample"])
        if command == "sample":
            argv = ["sample", source, "--nfe", "1", "--num-samples", "2", "--out", out]
        else:
            argv = ["convert", source, *options, "--out", out]
        cases.append(argv)

    before = snapshot(user)
    codes = []
    for argv in cases:
        t0 = time.perf_counter()
        code, err = run_main(argv, capsys, monkeypatch)
        elapsed = time.perf_counter() - t0
        codes.append(code)
        assert code in (0, 2), (argv, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            errors = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (argv, err)
        assert elapsed < CASE_SECONDS, (argv, elapsed)
        assert snapshot(user) == before, argv
    assert 2 in codes  # the cases do reach the error paths
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("value", ["nan", "inf", "-5", str(2**63), "1e9"])
def test_option_numbers_never_trace(value, tmp_path, capsys, monkeypatch):
    for opt in ("--depth", "--num-heads", "--encoder-depth"):
        code, err = run_main(
            ["convert", "builtin:digits-sit", opt, value, "--out", tmp_path / "o"], capsys, monkeypatch
        )
        assert code == 2 and "Traceback" not in err and err.strip().startswith("error:"), (opt, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def numeric_options(command_name: str) -> list[str]:
    """Every int / float option of a command, read from the CLI itself (new options are covered automatically)."""
    import typer

    def numeric(p) -> bool:
        if getattr(p, "type", None) is not None:  # click's parameter types
            return p.type.name in ("integer", "float")
        ann = p.type_descriptor.annotation  # typer >= 0.20 keeps the annotation instead
        return bool({ann, *typing.get_args(ann)} & {int, float})

    cmd = typer.main.get_command(cli.app).commands[command_name]
    return [
        p.opts[0]
        for p in cmd.params
        if p.param_type_name == "option" and not getattr(p, "is_flag", False) and numeric(p)
    ]


BAD_NUMBERS = ["nan", "inf", "-inf", "1e309", "abc", ""]


@pytest.mark.parametrize("command", ["sample", "finetune", "search-depth", "eval"])
def test_random_bad_numbers_are_refused_up_front(command, tmp_path, capsys, monkeypatch):
    """Any non-finite or non-numeric value of any numeric option: one line, exit 2, at once, nothing written."""
    rng = random.Random(f"numbers-{command}")
    opts = numeric_options(command)
    assert len(opts) >= 3, opts
    target = [] if command in ("sample", "finetune", "search-depth") else ["builtin:digits-sit"]
    for i in range(6):
        chosen = rng.sample(opts, k=rng.randint(1, min(3, len(opts))))
        argv = [command, *target]
        for opt in chosen:
            argv += [opt, rng.choice(BAD_NUMBERS)]
        out = tmp_path / f"out{i}"
        t0 = time.perf_counter()
        code, err = run_main([*argv, "--out", out], capsys, monkeypatch)
        assert code == 2 and "Traceback" not in err, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (argv, err)
        assert time.perf_counter() - t0 < CASE_SECONDS, argv
        assert not out.exists(), argv
    assert [p.name for p in tmp_path.iterdir()] == []
