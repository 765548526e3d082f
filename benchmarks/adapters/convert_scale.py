"""Conversion speed against the floor, and correctness against the independent reference forward.

Builds a REPA-format training checkpoint `{'model','ema','opt','args','steps'}` with random weights at a standard
size (default SiT-XL/2 at 256 px: hidden 1152, 28 blocks, 16 heads, 32x32x4 latents; `--blocks` trims the depth
when time or memory is short), then, each in a fresh process:

  floor    torch.load(mmap=True, weights_only=True) + safetensors save_file of the EMA tensors
  flowmap  flowmap_convert.convert(ckpt, depth, mapped=True) + export(model, out), as `flowmap convert` does
           (read, sha256, detect, build, write)

and prints both times, their ratio and the thread count side by side (best of --repeats, runs alternating).
Finally the exported model is loaded and compared at r = t with tests/dit_reference.py (plain PyTorch).

  PYTHONPATH=. python benchmarks/adapters/convert_scale.py --size XL --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from dit_reference import make_sd, ref_forward  # noqa: E402

import flowmap_convert as fm  # noqa: E402
from flowmap_convert.dit import SIZES  # noqa: E402

FLOOR = """
import argparse, json, sys, time
import torch
from safetensors.torch import save_file
torch.set_num_threads(int(sys.argv[3]))
t0 = time.perf_counter()
with torch.serialization.safe_globals([argparse.Namespace]):
    obj = torch.load(sys.argv[1], map_location="cpu", mmap=True, weights_only=True)
save_file(obj["ema"], sys.argv[2])
print(json.dumps({"work": time.perf_counter() - t0}))
"""

FLOWMAP = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
import flowmap_convert as fm
from flowmap_convert.io import export
t0 = time.perf_counter()
model = fm.convert(sys.argv[1], depth=None if sys.argv[4] == "-" else int(sys.argv[4]), mapped=True)  # as the CLI
t1 = time.perf_counter()
export(model, sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"work": t2 - t0, "convert": t1 - t0, "export": t2 - t1}))
"""


def run(code: str, *args, threads: int) -> dict:
    """Run `code` in a fresh interpreter (OMP/MKL threads pinned too); returns its JSON line plus the process wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    os.sync()  # flush the previous run's writes first: otherwise each run pays for the one before it
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"benchmark subprocess failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process": wall}


def main() -> None:
    """Build and save the checkpoint, time floor and flowmap alternately, check the export, print the table rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="XL", choices=sorted(SIZES))
    ap.add_argument("--blocks", type=int, default=None, help="fewer blocks than the size's (same width)")
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each (alternating); the best is reported")
    ap.add_argument("--std", type=float, default=0.02, help="std of the random weights (DiT init scale)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hidden, blocks, heads = SIZES[a.size]
    blocks = a.blocks or blocks
    sd = make_sd(hidden=hidden, blocks=blocks, channels=4, patch=2, size=32, classes=1000, projectors=True, std=a.std)
    n_params = sum(v.numel() for k, v in sd.items() if not k.startswith("projectors."))
    ns = argparse.Namespace(model=f"SiT-{a.size}/2", enc_type="dinov2-vit-b", encoder_depth=4, proj_coeff=0.5)
    tmp = Path(tempfile.mkdtemp(prefix="convert_scale.", dir=a.dir))
    try:
        ckpt = tmp / "0400000.pt"
        t0 = time.perf_counter()
        torch.save({"model": sd, "ema": sd, "opt": {}, "args": ns, "steps": 400000}, ckpt)
        t_save = time.perf_counter() - t0
        size_mib = ckpt.stat().st_size / 2**20
        floor, ours = [], []
        for _ in range(a.repeats):
            floor.append(run(FLOOR, ckpt, tmp / "floor.safetensors", a.threads, threads=a.threads))
            (tmp / "floor.safetensors").unlink()
            shutil.rmtree(tmp / "out", ignore_errors=True)
            ours.append(
                run(FLOWMAP, ckpt, tmp / "out", a.threads, a.depth if a.depth is not None else "-", threads=a.threads)
            )
        model = fm.load(str(tmp / "out"))
        out_mib = (tmp / "out" / "model.safetensors").stat().st_size / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([0.3, 0.9]), torch.tensor([207, 1000])
    with torch.no_grad():
        u = model(x, t, t, y)
        ref = ref_forward(sd, x, t, y, heads=heads)
    err = (u - ref).abs().max().item()
    best_floor = min(floor, key=lambda r: r["work"])
    best = min(ours, key=lambda r: r["work"])
    print(
        f"machine     {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{a.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"model       SiT-{a.size}/2 width, {blocks} blocks (hidden {hidden}, heads {model.config.num_heads} inferred), "
        f"{n_params / 1e6:.1f}M params"
    )
    print(
        f"checkpoint  {size_mib:.0f} MiB (model + ema sharing storage, args), saved in {t_save:.2f} s; export {out_mib:.0f} MiB"
    )
    print(
        f"floor       {best_floor['work']:.2f} s (torch.load mmap + safetensors save; process {best_floor['process']:.2f} s)"
    )
    print(
        f"flowmap     {best['work']:.2f} s (convert {best['convert']:.2f} s + export {best['export']:.2f} s; "
        f"process {best['process']:.2f} s)"
    )
    print(f"ratio       {best['work'] / best_floor['work']:.2f}x the floor ({a.threads} threads, best of {a.repeats})")
    print(f"all runs    floor {[round(r['work'], 2) for r in floor]}  flowmap {[round(r['work'], 2) for r in ours]}")
    print(f"max |u(r=t) - v_ref| = {err:.3e} (|v_ref| max {ref.abs().max().item():.3f}), depth {model.config.depth}")


if __name__ == "__main__":
    main()
