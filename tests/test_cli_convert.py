"""`flowmap convert` end to end: round trip through the CLI, and every bad input ends in one line, exit code 2."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from dit_reference import make_sd, ref_forward
from safetensors.torch import save_file
from typer.testing import CliRunner

from flowmap_convert.cli import app

pytestmark = pytest.mark.e2e  # every test here drives the flowmap command line


def run_cli(*args, env=None):
    """The real console entry point in a fresh interpreter."""
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def test_convert_export_load_sample_round_trip(tmp_path):
    sd = make_sd(channels=3, size=8, seed=30)  # a pixel-space model (identity latent) so sampling needs no VAE
    args = argparse.Namespace(model="SiT-B/2", enc_type="dinov2-vit-b", encoder_depth=2, proj_coeff=0.5)
    ckpt = tmp_path / "0100000.pt"
    torch.save({"model": sd, "ema": sd, "args": args, "opt": {}}, ckpt)
    out = tmp_path / "converted"
    r = run_cli("convert", ckpt, "--depth", 3, "--num-heads", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    for word in ("family      repa", "depth       3 of 4", "weights     ema", "sha256"):
        assert word in r.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".flowmap-output.json",
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["depth"] == 3 and cfg["provenance"]["family"] == "repa" and cfg["provenance"]["weights"] == "ema"
    import flowmap_convert as fm

    model = fm.load(str(out))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 0.9]), torch.tensor([2, 10])
    assert (model(x, t, t, y) - ref_forward(sd, x, t, y, heads=4)).abs().max().item() <= 1e-5
    samples = tmp_path / "samples"
    r = run_cli("sample", out, "--nfe", 2, "--num-samples", 4, "--classes", "1,2", "--out", samples)
    assert r.returncode == 0, r.stderr
    assert (samples / "grid.png").is_file() and len(list(samples.glob("*.png"))) >= 4


@pytest.fixture
def files(tmp_path):
    """Bad and good inputs on disk."""
    good = tmp_path / "SiT-S-2-16x16.pt"  # a learn_sigma file: the release name says SiT (DiT has the same keys)
    torch.save(make_sd(learn_sigma=True, seed=31), good)
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[:4000])
    corrupt = tmp_path / "corrupt.safetensors"
    save_file(make_sd(seed=32), str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    evil = tmp_path / "global.pt"
    torch.save({"ema": make_sd(seed=33), "created": datetime.datetime(2025, 1, 1)}, evil)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return dict(good=good, trunc=trunc, corrupt=corrupt, junk=junk, evil=evil, blocker=blocker, tmp=tmp_path)


CASES = {
    "unknown source": (["not a source"], "cannot understand the source"),
    "depth 0": (["{good}", "--depth", "0", "--num-heads", "4"], r"--depth must be an integer in \[1, 1024\], got 0"),
    "depth > N": (["{good}", "--depth", "5", "--num-heads", "4"], "depth 5 is out of range"),
    "missing file": (["{tmp}/missing.pt"], "no such file"),
    "corrupt safetensors": (["{corrupt}"], "not a readable safetensors file"),
    "truncated pt": (["{trunc}"], "truncated or corrupted"),
    "not a checkpoint": (["{junk}"], "not a PyTorch or safetensors checkpoint"),
    "disallowed global": (["{evil}"], "needs datetime.datetime.*--trust-pickle"),
    "shape mismatch": (["{good}", "--family", "repa", "--num-heads", "4"], "learn_sigma head"),
    "unknown family": (["{good}", "--family", "nope"], "unknown --family"),
    "bad weights": (["{good}", "--weights", "ema"], "plain state dict"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(files, case):
    argv, message = CASES[case]
    out = files["tmp"] / "out"
    argv = [a.format(**files) for a in argv]
    result = CliRunner().invoke(app, ["convert", *argv, "--out", str(out)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    lines = result.stderr.strip().splitlines()  # notes (what was detected) may precede the one error line
    assert lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1
    assert "Traceback" not in result.output
    assert not out.exists() and not any(p.name.startswith(".out.") for p in files["tmp"].iterdir())


def test_trust_pickle_opt_in_loads_the_file(files):
    out = files["tmp"] / "trusted"
    result = CliRunner().invoke(
        app, ["convert", str(files["evil"]), "--trust-pickle", "--num-heads", "4", "--depth", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_real_process_errors_offline_and_unwritable_out(files, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "FLOWMAP_CACHE": str(tmp_path / "fc")}
    r = run_cli("convert", "acme/not-cached", "--out", tmp_path / "o1", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not in the local Hub cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    bad_out = files["blocker"] / "sub" / "out"  # the parent is a regular file: unwritable even for root
    r = run_cli("convert", files["good"], "--num-heads", "4", "--depth", "2", "--out", bad_out, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot write to" in r.stderr
    assert not (tmp_path / "o1").exists()


def test_bad_out_fails_before_any_loading_and_leaves_foreign_files_alone(files):
    foreign = files["tmp"] / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    for out, message in (
        (files["blocker"] / "x" / "out", "is a file, not a directory"),
        (foreign, "is not a flowmap output"),
    ):
        result = CliRunner().invoke(app, ["convert", str(files["good"]), "--out", str(out)])
        assert (
            result.exit_code == 2 and message in result.stderr and "family" not in result.stderr
        )  # nothing was loaded
    assert (foreign / "cat.jpg").read_bytes() == b"meow" and [p.name for p in foreign.iterdir()] == ["cat.jpg"]
