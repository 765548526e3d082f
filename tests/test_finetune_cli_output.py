"""What `flowmap finetune` prints: defaults and notes up front, the thread choice, plain progress lines when piped."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config
from typer.testing import CliRunner


@pytest.fixture
def base(tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=3)), std=0.05), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", latents=torch.randn(16, 1, 16, 16, generator=g).numpy(), labels=np.arange(16) % 10)
    return tmp_path


def run(base, *extra):
    from flowmap_convert.cli import app

    args = ["finetune", str(base / "base"), "--data", str(base / "d.npz"), "--depth", "2", "--batch-size", "2"]
    r = CliRunner().invoke(app, [*args, "--out", str(base / "run"), "--device", "cpu", *extra])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.e2e
def test_piped_run_prints_the_plan_threads_estimate_and_plain_progress_lines(base):
    out = run(base, "--steps", "4", "--log-every", "2", "--threads", "1")
    assert "CPU threads: 1 (--threads; --threads N to change)" in out
    flat = " ".join(out.split())
    assert "fine-tune: dmf on" in flat and "depth 2 of 3 (--depth), 4 steps, batch 2 x 1 process(es), cpu" in flat
    assert re.search(r"estimated time: \d:\d\d:\d\d for the remaining 1 steps \([\d.]+ s/step\)", out), out
    step = r"[\d.]+ (s/step|step/s), elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d, loss -?[\d.]+, grad [\d.]+, fm"
    assert re.search(rf"^fine-tune: 2/4 step \(50%\), {step}", out, re.M), out
    assert re.search(rf"^fine-tune: 4/4 step \(100%\), {step}", out, re.M), out
    assert len(re.findall(r"^fine-tune: \d/4 step", out, re.M)) == 2  # steps 2 and 4, each once
    assert "\r" not in out and "━" not in out  # no bar drawn into a pipe


@pytest.mark.e2e
def test_default_thread_rule_on_a_small_machine_says_what_it_chose(base, monkeypatch):
    from flowmap_convert import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    torch.set_num_threads(2)
    out = run(base, "--steps", "1", "--log-every", "1")
    assert "CPU threads: 1 (2 cores, shared-machine default; --threads N to change)" in out
    assert torch.get_num_threads() == 1


def test_builtin_recipe_and_guidance_note():
    from flowmap_convert.api import load
    from flowmap_convert.finetuning import guidance_note
    from flowmap_convert.finetuning.recipes import default_recipe, get, resolve

    name, why = default_recipe(load("builtin:digits-sit").config, "builtin:digits-sit")
    assert name == "digits" and "builtin" in why
    rec = resolve(get("digits"), {})[0].recipe
    assert (rec.steps, rec.batch_size) == (200, 32)
    assert resolve(get("digits"), {"steps": 50, "batch_size": 8})[0].recipe.steps == 50
    assert "FINETUNE.md" in guidance_note("builtin:digits-sit", 0.6)
    assert guidance_note("builtin:digits-sit", 0.0) is None and guidance_note("some/model", 0.6) is None


@pytest.mark.e2e
def test_builtin_dry_run_says_its_defaults_depth_origin_and_guidance_note():
    from flowmap_convert.cli import app

    r = CliRunner().invoke(app, ["finetune", "--mg-scale", "0.6", "--dry-run", "--threads", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "recipe: digits (a builtin model)" in flat
    assert "steps 200 recipe digits: benchmarks/digits/FINETUNE.md" in flat
    assert "batch_size 32 recipe digits: benchmarks/digits/FINETUNE.md" in flat
    assert "mg_scale 0.6 option" in flat and "lr 0.0001 default" in flat
    assert "model guidance makes the converged builtin:digits-sit worse" in flat and "FINETUNE.md" in flat
    assert "depth 5 of 6 (the depth search-depth chose, carried by the model)" in flat
    assert "nothing written (dry run)" in flat
