"""fm.sample at 1 NFE against a plain PyTorch loop over the same model, batch and noise, side by side in one run.

The plain loop is what a user would write by hand: per-sample seeded noise (the same (seed, i) streams), one
`model(x, t=1, r=0, y)` call per batch, x - u, the uint8 conversion. Timings alternate (plain first, then
fm.sample first) for `--repeats` rounds and report the median and minimum of each, so machine noise hits both
alike; both draw identical images (checked).

    OMP_NUM_THREADS=1 python benchmarks/sampling_overhead.py --num-samples 1000 --out benchmarks/results/sampling_overhead-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import flowmap_convert as fm
from flowmap_convert.sampling import to_uint8


def plain_loop(model, n: int, batch: int, seed: int = 0):
    """The hand-written 1-step flow-map sampler."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = []
    with torch.no_grad():
        for b0 in range(0, n, batch):
            idx = range(b0, min(b0 + batch, n))
            x = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in idx]
            )
            y = torch.tensor([i % cfg.num_classes for i in idx])
            t = torch.ones(len(x))
            u = model(x, t, torch.zeros(len(x)), y)
            out.append(to_uint8(x - u))
    return out


def _runs(model, a):
    return {
        "plain_loop": lambda: plain_loop(model, a.num_samples, a.batch_size),
        "fm_sample": lambda: fm.sample(model, nfe=1, num_samples=a.num_samples, batch_size=a.batch_size),
    }


def _outside_model(model, fn) -> float:
    """Seconds of one run spent outside the network's forward (noise, labels, state, uint8): the sampler's cost.

    Independent of how busy the machine is, unlike the wall-clock ratio.
    """
    inside = [0.0]
    forward = model.forward

    def timed_forward(*args, **kw):
        t0 = time.perf_counter()
        out = forward(*args, **kw)
        inside[0] += time.perf_counter() - t0
        return out

    model.forward = timed_forward
    try:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    finally:
        del model.forward
    return round(total - inside[0], 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits-sit")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    model = fm.convert(a.model).eval()
    for _ in range(2):  # warm-up
        plain_loop(model, a.num_samples, a.batch_size)
        fm.sample(model, nfe=1, num_samples=a.num_samples, batch_size=a.batch_size)
    t_plain, t_fm = [], []

    def timed(fn, into):
        t0 = time.perf_counter()
        fn()
        into.append(time.perf_counter() - t0)

    for k in range(a.repeats):  # alternate which one runs first, so drift and neighbours' load hit both alike
        runs = [
            (lambda: plain_loop(model, a.num_samples, a.batch_size), t_plain),
            (lambda: fm.sample(model, nfe=1, num_samples=a.num_samples, batch_size=a.batch_size), t_fm),
        ]
        for fn, into in runs if k % 2 == 0 else runs[::-1]:
            timed(fn, into)
    p, f = statistics.median(t_plain), statistics.median(t_fm)
    outside = {name: _outside_model(model, fn) for name, fn in _runs(model, a).items()}
    res = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/sampling_overhead.py "
        f"--num-samples {a.num_samples} --batch-size {a.batch_size} --repeats {a.repeats}",
        "model": f"{a.model} converted at depth {model.config.depth}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "num_samples": a.num_samples,
        "plain_loop_seconds": round(p, 4),
        "fm_sample_seconds": round(f, 4),
        "ratio": round(f / p, 3),
        "plain_loop_min_seconds": round(min(t_plain), 4),
        "fm_sample_min_seconds": round(min(t_fm), 4),
        "ratio_of_minima": round(min(t_fm) / min(t_plain), 3),
        "images_identical": bool(
            (np.concatenate(plain_loop(model, 64, a.batch_size)) == fm.sample(model, nfe=1, num_samples=64)).all()
        ),
        "seconds_outside_the_network": outside,
        "plain_images_per_s": round(a.num_samples / p, 1),
        "fm_sample_images_per_s": round(a.num_samples / f, 1),
    }
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
