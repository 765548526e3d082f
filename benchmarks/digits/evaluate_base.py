"""Digits FD and label accuracy of the builtin base model at 1..32 Euler steps, plus the noise floors.

Every row uses 2000 samples (200 per class, classes cycled 0..9), `fm.sample(model, nfe=N, classes=list(range(10)), num_samples=2000, seed=0, batch_size=500)`;
"digits FD" compares the classifier's 64-d penultimate features with those of all 1797 real digits.
Noise floors: (a) FD between two random halves of the real digits (5 seeded splits), (b) FD between two
2000-sample sets drawn with seeds 0 and 1 at 32 steps, and each one's FD to the real digits.

    python benchmarks/digits/evaluate_base.py                    # writes benchmarks/digits/results_base.json
    python benchmarks/digits/evaluate_base.py --model ./my-digits-model --nfe 1,4 --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import flowmap_convert as fm
from flowmap_convert.digits import digits_features, evaluate_digits, load_digits_tensor
from flowmap_convert.metrics import feature_stats, frechet_distance
from flowmap_convert.sampling import sample as fm_sample

HERE = Path(__file__).resolve().parent


def sample_eval(model, nfe: int, seed: int, n: int = 2000, **kw):
    """Sample n class-balanced digits and evaluate them; returns (metrics, images, seconds)."""
    t0 = time.time()
    images = fm_sample(model, nfe=nfe, classes=list(range(10)), num_samples=n, seed=seed, batch_size=500, **kw)
    sec = time.time() - t0
    labels = np.arange(n) % 10  # fm.sample cycles the listed classes
    return evaluate_digits(images, labels), images, sec


def real_halves_floor(repeats: int = 5) -> list[float]:
    """FD between two random halves of the 1797 real digits, one value per seeded split."""
    x, _ = load_digits_tensor("all")
    f = digits_features(x)
    out = []
    for s in range(repeats):
        p = np.random.default_rng(s).permutation(len(f))
        a, b = f[p[: len(f) // 2]], f[p[len(f) // 2 :]]
        out.append(frechet_distance(*feature_stats(a), *feature_stats(b)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:digits-sit", help="model to evaluate (any flowmap source)")
    ap.add_argument("--nfe", default="1,2,4,8,16,32", help="comma-separated Euler step counts")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    ap.add_argument(
        "--convert-depths",
        default="",
        help="also sample the converted model (no training) at these depths, e.g. 2,3,4,5",
    )
    ap.add_argument("--convert-nfe", type=int, default=4, help="Euler steps for the --convert-depths rows")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on shared cores)")
    ap.add_argument("--json", type=Path, default=HERE / "results_base.json", help="where to write the numbers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()
    model = fm.load(args.model)
    rows = []
    seed0_32 = None
    for nfe in [int(v) for v in args.nfe.split(",")]:
        m, images, sec = sample_eval(model, nfe, seed=0, cfg_scale=args.cfg_scale)
        rows.append({"nfe": nfe, **m, "sample_seconds": round(sec, 1)})
        print(f"NFE {nfe:3d}  FD {m['fd']:8.2f}  acc {m['acc']:.3f}  ({sec:.1f} s sampling)", flush=True)
        if nfe == 32:
            seed0_32 = images
    converted = []
    for depth in [int(v) for v in args.convert_depths.split(",") if v]:
        m, _, sec = sample_eval(fm.convert(args.model, depth=depth), args.convert_nfe, seed=0, cfg_scale=args.cfg_scale)
        converted.append({"depth": depth, "nfe": args.convert_nfe, **m, "sample_seconds": round(sec, 1)})
        print(f"converted depth {depth}, NFE {args.convert_nfe}: FD {m['fd']:8.2f}  acc {m['acc']:.3f}", flush=True)
    halves = real_halves_floor()
    print(f"real halves FD: {np.mean(halves):.2f} (min {min(halves):.2f}, max {max(halves):.2f})", flush=True)
    floor = {"real_halves": halves, "real_halves_mean": float(np.mean(halves))}
    if seed0_32 is not None:
        m1, images1, _ = sample_eval(model, 32, seed=1, cfg_scale=args.cfg_scale)
        between = frechet_distance(*feature_stats(digits_features(seed0_32)), *feature_stats(digits_features(images1)))
        floor.update(
            {
                "seed0_vs_seed1_32": between,
                "seed0_to_real_32": rows[[r["nfe"] for r in rows].index(32)]["fd"],
                "seed1_to_real_32": m1["fd"],
                "seed1_acc_32": m1["acc"],
            }
        )
        print(
            f"seed 0 vs seed 1 at 32 steps: FD {between:.2f}; seed 1 to real {m1['fd']:.2f} (acc {m1['acc']:.3f})",
            flush=True,
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    except OSError:
        commit = "?"
    result = {
        "model": args.model,
        "cfg_scale": args.cfg_scale,
        "rows": rows,
        "converted_no_training": converted,
        "noise_floor": floor,
        "wall_seconds": round(time.time() - t_all, 1),
        "machine": f"{platform.machine()} cpu ({platform.processor() or 'unknown'}), {torch.get_num_threads()} threads, shared cores",
        "torch": torch.__version__,
        "commit": commit,
        "command": "python benchmarks/digits/evaluate_base.py"
        + (f" --model {args.model}" if args.model != "builtin:digits-sit" else "")
        + (f" --cfg-scale {args.cfg_scale}" if args.cfg_scale != 1.0 else "")
        + (f" --convert-depths {args.convert_depths}" if args.convert_depths else ""),
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
