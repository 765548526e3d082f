"""Two-process CPU (gloo) fine-tuning under torchrun: trains, replicas stay identical, rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from conftest import randomize, tiny_config


def test_two_process_gloo_run(tmp_path):
    from flowmap_convert.io import export, is_model_dir
    from flowmap_convert.model import FlowMap, read_model_dir

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=2))), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", latents=torch.randn(16, 1, 16, 16, generator=g).numpy(), labels=np.arange(16) % 10)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
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
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--train",
        "all",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replicas identical across 2 processes" in r.stderr
    assert is_model_dir(out)
    assert read_model_dir(out).config.training["processes"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # one writer: no duplicated lines
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "checkpoints/latest.pt",
        "config.json",
        "grid.png",
        "metrics.jsonl",
        "model.safetensors",
        "raw/README.md",
        "raw/config.json",
        "raw/grid.png",
        "raw/model.safetensors",
    ]
    assert torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["world"] == 2
