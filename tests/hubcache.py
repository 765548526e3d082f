"""Build a fake Hugging Face Hub cache (models--owner--name/{blobs,refs,snapshots}) for offline tests."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Write `files` (repo path -> bytes) as blobs linked from snapshots/<commit>/, refs/main -> commit."""
    base = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = base / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        snap = base / "snapshots" / commit / rel
        snap.parent.mkdir(parents=True, exist_ok=True)
        if snap.exists() or snap.is_symlink():
            snap.unlink()
        os.symlink(os.path.relpath(blob, snap.parent), snap)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return base / "snapshots" / commit


def torch_bytes(obj) -> bytes:
    """torch.save into bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def dir_files(root: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `root` as {prefix + relative path: bytes} (to mirror a saved diffusers folder)."""
    root = Path(root)
    return {prefix + str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m flowmap_convert.cli ARGS` in a subprocess with `env` (an offline cache's; None: this process's),
    output captured."""
    return subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
