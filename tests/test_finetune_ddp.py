"""Two-process CPU (gloo) fine-tuning under torchrun through DDP: replicas identical, rank 0 alone writes, and the
loss trace equals a one-process run over the same global batch (2 processes x 2 accumulated = 1 process x 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config
from finetune_cli import finetune_argv, run_ok, write_run_inputs

from flowmap_convert.model import FlowMap

pytestmark = pytest.mark.e2e  # every test here drives the flowmap command line


def finetune_cmd(tmp_path, out, procs, grad_accum, steps=3):
    """A 3-step run over 2-sample micro-batches: `procs` processes x `grad_accum` micro-batches per step."""
    return finetune_argv(
        tmp_path,
        out,
        depth=1,
        steps=steps,
        batch_size=2,
        procs=procs,
        grad_accum=grad_accum,
        lr="1e-3",
        mg_scale=0.5,
        checkpoint_every=2,
        device="cpu",
        log_every=1,
    )


def write_inputs(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, 1, 16, 16, generator=g).numpy()
    write_run_inputs(tmp_path, randomize(FlowMap(tiny_config(num_blocks=2))), latents, np.arange(16) % 10)


def test_two_process_gloo_ddp_run_matches_one_process_with_the_same_global_batch(tmp_path):
    from flowmap_convert.model import read_model_dir
    from flowmap_convert.outputs import is_model_dir

    write_inputs(tmp_path)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    r = run_ok(finetune_cmd(tmp_path, ddp, 2, 2))
    assert "(DistributedDataParallel, gloo)" in r.stderr  # the loss went through DDP's forward
    assert "replicas identical across 2 processes" in r.stderr
    run_ok(finetune_cmd(tmp_path, one, 1, 4))

    a = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in a] == [1, 2, 3]  # one writer: no duplicated lines
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (x, y)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, y["grad_norm"]), (x, y)
    wa, wb = read_model_dir(ddp / "raw").state_dict(), read_model_dir(one / "raw").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5

    assert is_model_dir(ddp) and read_model_dir(ddp).config.training["processes"] == 2
    files = sorted(str(p.relative_to(ddp)) for p in ddp.rglob("*") if p.is_file())
    assert files == [
        ".flowmap-output.json",  # the run's marker: a later run may reuse this directory, nothing else is touched
        "README.md",
        "checkpoints/latest.pt",
        "checkpoints/previous.pt",
        "config.json",
        "grid.png",
        "metrics.jsonl",
        "model.safetensors",
        "raw/README.md",
        "raw/config.json",
        "raw/grid.png",
        "raw/model.safetensors",
        "recipe.json",  # the resolved recipe a resume continues
    ]
    assert torch.load(ddp / "checkpoints" / "latest.pt", weights_only=True)["world"] == 2


@pytest.mark.slow
def test_two_process_run_resumed_from_a_checkpoint_reproduces_the_uninterrupted_trace(tmp_path):
    write_inputs(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_ok(finetune_cmd(tmp_path, ref, 2, 2))
    run_ok(finetune_cmd(tmp_path, run, 2, 2, steps=2))  # stops after its step-2 checkpoint
    r = run_ok([*finetune_cmd(tmp_path, run, 2, 2), "--resume"])
    assert "resumed from" in r.stderr and "replicas identical across 2 processes" in r.stderr
    a = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-6 for x, y in zip(a, b)), (a, b)
