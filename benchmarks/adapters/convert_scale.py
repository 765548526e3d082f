"""Convert a standard-size REPA-format training checkpoint and check it against the independent reference forward.

Builds `{'model','ema','opt','args'}` with random weights at a standard size (default SiT-B/2 at 256 px: hidden 768,
12 blocks, 12 heads, 32x32x4 latents), then times each stage of `fm.convert` + export and reports the max abs
error of the converted model at r = t against tests/dit_reference.py (plain PyTorch, no flowmap code).

  PYTHONPATH=. python benchmarks/adapters/convert_scale.py --size B --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from dit_reference import make_sd, ref_forward  # noqa: E402

import flowmap_convert as fm  # noqa: E402
from flowmap_convert.dit import SIZES  # noqa: E402
from flowmap_convert.io import export  # noqa: E402


def main() -> None:
    """Build, save, convert, export and compare; print one line per stage."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B", choices=sorted(SIZES))
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--std", type=float, default=0.02, help="std of the random weights (DiT init scale)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    hidden, blocks, heads = SIZES[a.size]
    sd = make_sd(hidden=hidden, blocks=blocks, channels=4, patch=2, size=32, classes=1000, projectors=True, std=a.std)
    n_params = sum(v.numel() for k, v in sd.items() if not k.startswith("projectors."))
    ns = argparse.Namespace(model=f"SiT-{a.size}/2", enc_type="dinov2-vit-b", encoder_depth=4, proj_coeff=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "0400000.pt"
        t0 = time.perf_counter()
        torch.save({"model": sd, "ema": sd, "opt": {}, "args": ns, "steps": 400000}, ckpt)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = fm.convert(str(ckpt), depth=a.depth)
        t_convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        export(model, Path(tmp) / "out")
        t_export = time.perf_counter() - t0
        size_mb = ckpt.stat().st_size / 2**20
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([0.3, 0.9]), torch.tensor([207, 1000])
    with torch.no_grad():
        t0 = time.perf_counter()
        u = model(x, t, t, y)
        t_fwd = time.perf_counter() - t0
        ref = ref_forward(sd, x, t, y, heads=heads)
    err = (u - ref).abs().max().item()
    print(
        f"machine     {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} threads, pid {os.getpid()}"
    )
    print(
        f"model       SiT-{a.size}/2 (hidden {hidden}, {blocks} blocks, heads {model.config.num_heads} inferred), {n_params / 1e6:.1f}M params"
    )
    print(f"checkpoint  {size_mb:.0f} MiB (model + ema + args), saved in {t_save:.2f} s")
    print(f"convert     {t_convert:.2f} s (read + sha256 + detect + build + strict load), depth {model.config.depth}")
    print(f"export      {t_export:.2f} s")
    print(f"forward     {t_fwd:.3f} s for batch 2")
    print(f"max |u(r=t) - v_ref| = {err:.3e} (|v_ref| max {ref.abs().max().item():.3f})")


if __name__ == "__main__":
    main()
