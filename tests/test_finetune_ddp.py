"""Two-process CPU (gloo) fine-tuning under torchrun through DDP: replicas identical, rank 0 alone writes, and the
loss trace equals a one-process run over the same global batch (2 processes x 2 accumulated = 1 process x 4)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_cmd(tmp_path, out, procs, grad_accum):
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    return [
        sys.executable,
        *(launch if procs > 1 else []),
        "-m",
        "flowmap_convert.cli",
        "finetune",
        str(tmp_path / "base"),
        "--data",
        str(tmp_path / "d.npz"),
        "--depth",
        "1",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        str(grad_accum),
        "--lr",
        "1e-3",
        "--mg-scale",
        "0.5",
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--log-every",
        "1",
    ]


def test_two_process_gloo_ddp_run_matches_one_process_with_the_same_global_batch(tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap, read_model_dir
    from flowmap_convert.outputs import is_model_dir

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=2))), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", latents=torch.randn(16, 1, 16, 16, generator=g).numpy(), labels=np.arange(16) % 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    r = subprocess.run(finetune_cmd(tmp_path, ddp, 2, 2), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(DistributedDataParallel, gloo)" in r.stderr  # the loss went through DDP's forward
    assert "replicas identical across 2 processes" in r.stderr
    r1 = subprocess.run(finetune_cmd(tmp_path, one, 1, 4), capture_output=True, text=True, env=env, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]

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
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=2))), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", latents=torch.randn(16, 1, 16, 16, generator=g).numpy(), labels=np.arange(16) % 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = subprocess.run(finetune_cmd(tmp_path, ref, 2, 2), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first = finetune_cmd(tmp_path, run, 2, 2)
    first[first.index("--steps") + 1] = "2"
    r = subprocess.run(first, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [*finetune_cmd(tmp_path, run, 2, 2), "--resume"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "replicas identical across 2 processes" in r.stderr
    a = [json.loads(x)["loss"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-6 for x, y in zip(a, b)), (a, b)
