"""Beyond one machine: 2 "nodes" x 1 process on 127.0.0.1 (torchrun --nnodes 2 --node_rank 0|1, gloo) get the result
of 1 node x 2 processes. Each node's only process has LOCAL_RANK 0, so anything written per local rank instead of
once per run (global rank 0) would show up here twice."""

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


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(args, nodes: int, timeout=300) -> list[subprocess.CompletedProcess]:
    """Run `flowmap ARGS` as 1 node x 2 processes (nodes=1) or 2 nodes x 1 process (nodes=2), all on this host."""
    port = str(free_port())
    common = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", "--master_port", port]
    tail = ["-m", "flowmap_convert.cli", *args]
    if nodes == 1:
        return [subprocess.run([*common, "--nproc_per_node", "2", *tail], capture_output=True, text=True, env=ENV)]
    procs = [
        subprocess.Popen(
            [*common, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", *tail],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for n in range(2)
    ]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def finetune_args(tmp_path, out, steps=3):
    return [
        "finetune",
        str(tmp_path / "base"),
        "--data",
        str(tmp_path / "d.npz"),
        "--depth",
        "1",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
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


@pytest.fixture
def base(tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=2))), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", latents=torch.randn(16, 1, 16, 16, generator=g).numpy(), labels=np.arange(16) % 10)
    return tmp_path


def files_of(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.mark.e2e
def test_two_nodes_fine_tune_like_one_process_with_the_same_global_batch(base):
    """Fast form: the reference is 1 process x 2 accumulated micro-batches, which tests/test_finetune_ddp.py and the
    slow test below tie to 1 node x 2 processes."""
    from flowmap_convert.model import read_model_dir

    one, two = base / "one", base / "two"
    ref = [sys.executable, "-m", "flowmap_convert.cli", *finetune_args(base, one), "--grad-accum", "2"]
    r = subprocess.run(ref, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = launch(finetune_args(base, two), nodes=2)
    assert all(p.returncode == 0 for p in runs), [p.stderr[-2000:] for p in runs]
    assert "replicas identical across 2 processes" in runs[0].stderr
    assert sum("written" in p.stdout for p in runs) == 1 and "fine-tune:" not in runs[1].stderr  # node 1 is quiet

    a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [1, 2, 3]  # one writer for the whole run, not one per node
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5, (x, y)
    wa, wb = read_model_dir(one / "raw").state_dict(), read_model_dir(two / "raw").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    assert files_of(one) == files_of(two)  # the checkpoint at step 2 and the exports, each once
    assert torch.load(two / "checkpoints" / "latest.pt", weights_only=True)["world"] == 2


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_two_processes_and_resume_its_checkpoint(base):
    one, two, cut = base / "one", base / "two", base / "cut"
    (r,) = launch(finetune_args(base, one), nodes=1)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = launch(finetune_args(base, two), nodes=2)
    assert all(p.returncode == 0 for p in runs), [p.stderr[-2000:] for p in runs]
    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two))
    assert [(m["loss"], m["grad_norm"]) for m in a] == [(m["loss"], m["grad_norm"]) for m in b]  # bit for bit
    first = launch(finetune_args(base, cut, steps=2), nodes=2)  # stops at step 2 (its checkpoint on the shared disk)
    assert all(p.returncode == 0 for p in first), [p.stderr[-2000:] for p in first]
    resumed = launch([*finetune_args(base, cut), "--resume"], nodes=2)  # both nodes read that checkpoint
    assert all(p.returncode == 0 for p in resumed), [p.stderr[-2000:] for p in resumed]
    assert "resumed from" in resumed[0].stderr and "resumed from" not in resumed[1].stderr
    c = [json.loads(x)["loss"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert len(c) == 3 and all(abs(x["loss"] - y) <= 1e-6 for x, y in zip(a, c)), (a, c)


@pytest.mark.slow
def test_two_nodes_encode_and_sample_write_the_files_of_one_node(base, tmp_path):
    from PIL import Image

    for i in range(5):
        d = tmp_path / "imgs" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((18, 20), 30 * i, np.uint8)).save(d / f"{i}.png")
    outs = {}
    for nodes in (1, 2):
        enc = tmp_path / f"lat{nodes}"
        args = ["encode", str(tmp_path / "imgs"), "--model", str(base / "base"), "--out", str(enc), "--shard-size", "2"]
        runs = launch(args, nodes)
        assert all(p.returncode == 0 for p in runs), [p.stderr[-2000:] for p in runs]
        smp = tmp_path / f"smp{nodes}"
        args = ["sample", str(base / "base"), "-n", "6", "--nfe", "1", "--chunk-size", "2", "--out", str(smp)]
        args += ["--device", "cpu", "--npz"]
        runs = launch(args, nodes)
        assert all(p.returncode == 0 for p in runs), [p.stderr[-2000:] for p in runs]
        outs[nodes] = {p.relative_to(tmp_path).parts[1:]: p.read_bytes() for d in (enc, smp) for p in d.rglob("*")}
    assert outs[1] == outs[2] and len(outs[1]) > 10
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
