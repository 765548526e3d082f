"""The `flowmap finetune` command line that the process-level fine-tuning tests run (one process, or torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np


def free_port() -> int:
    """A TCP port nobody listens on now (torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run_inputs(tmp_path: Path, model, latents, labels) -> None:
    """The exported model (`base/`) and the latent dataset (`d.npz`) that `finetune_argv` points at."""
    from flowmap_convert.io import export

    export(model, tmp_path / "base")
    np.savez(tmp_path / "d.npz", latents=np.asarray(latents), labels=np.asarray(labels))


def run_ok(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command line with one thread per process; the test fails with its stderr tail unless it exits 0."""
    r = subprocess.run(argv, capture_output=True, text=True, env=ONE_THREAD, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def finetune_argv(tmp_path: Path, out: Path, *, depth: int, steps: int, batch_size: int, procs: int = 1, **flags):
    """`python [-m torch.distributed.run ...] -m flowmap_convert.cli finetune base --data d.npz ...`; each keyword
    in `flags` becomes `--name value` (underscores as dashes)."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(free_port())]
    argv = [sys.executable, *(launch if procs > 1 else []), "-m", "flowmap_convert.cli", "finetune"]
    argv += [str(tmp_path / "base"), "--data", str(tmp_path / "d.npz"), "--out", str(out)]
    argv += ["--depth", str(depth), "--steps", str(steps), "--batch-size", str(batch_size)]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv
