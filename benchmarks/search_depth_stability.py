"""Benchmark: does the default depth-search budget rank depths like a 4x larger one, and how long does it take?

Runs `search_depth` on the builtin digits model twice (default --num-samples, then FACTOR x as many), from empty
caches, and records per-NFE Spearman rank correlation of the probe across depths, the best depth per NFE, and
wall / CPU time, in benchmarks/results/search_depth-cpu.md and .json.

    python benchmarks/search_depth_stability.py                 # default budget vs 4x
    python benchmarks/search_depth_stability.py --num-samples 500 --factor 4 --nfe 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def ranks(values) -> np.ndarray:
    """Average ranks (ties share the mean rank), 1-based."""
    v = np.asarray(values, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for x in np.unique(v):
        tie = v == x
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    """Pearson correlation of average ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def run(source, n, nfe, reference, features, metric, out):
    """One search from an empty cache; returns the report plus measured wall / CPU seconds."""
    from flowmap_convert.search import search_depth

    t0, c0 = time.perf_counter(), time.process_time()
    report = search_depth(
        source, nfe=nfe, num_samples=n, reference=reference, features=features, metric=metric, out=out
    )
    return report, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    import torch

    from flowmap_convert.search import DEFAULT_NUM_SAMPLES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="builtin:digits-sit")
    ap.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--nfe", default="1,4")
    ap.add_argument("--reference", default="auto")
    ap.add_argument("--features", default="auto")
    ap.add_argument("--metric", default="fd")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="search_depth-cpu")
    args = ap.parse_args()
    nfe = [int(x) for x in args.nfe.split(",")]
    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in (("default", args.num_samples), (f"{args.factor}x", args.factor * args.num_samples)):
            report, wall, cpu = run(args.source, n, nfe, args.reference, args.features, args.metric, Path(tmp) / label)
            runs[label] = {
                "num_samples": n,
                "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1),
                "best": report["best"],
                "results": report["results"],
                "reference": report["reference"]["kind"],
                "features": report["features"],
            }
            print(f"{label}: {n} samples, wall {wall:.1f} s, cpu {cpu:.1f} s, best {report['best']}", flush=True)
    a, b = runs["default"], runs[f"{args.factor}x"]
    depths = sorted({r["depth"] for r in a["results"]})
    per_nfe = {}
    for n_fe in nfe:
        va = [next(r[args.metric] for r in a["results"] if r["depth"] == d and r["nfe"] == n_fe) for d in depths]
        vb = [next(r[args.metric] for r in b["results"] if r["depth"] == d and r["nfe"] == n_fe) for d in depths]
        per_nfe[str(n_fe)] = {
            "spearman": round(spearman(va, vb), 4),
            "default": [round(x, 3) for x in va],
            "large": [round(x, 3) for x in vb],
            "best_default": a["best"][str(n_fe)],
            "best_large": b["best"][str(n_fe)],
        }
        if args.metric == "fd" and "mse" in a["results"][0]:  # teacher reference: the paired error ranks too
            ma = [next(r["mse"] for r in a["results"] if r["depth"] == d and r["nfe"] == n_fe) for d in depths]
            mb = [next(r["mse"] for r in b["results"] if r["depth"] == d and r["nfe"] == n_fe) for d in depths]
            per_nfe[str(n_fe)]["spearman_mse"] = round(spearman(ma, mb), 4)
            per_nfe[str(n_fe)]["mse_default"], per_nfe[str(n_fe)]["mse_large"] = (
                [round(x, 5) for x in ma],
                [round(x, 5) for x in mb],
            )
        print(f"NFE {n_fe}: spearman {per_nfe[str(n_fe)]['spearman']:.3f}", flush=True)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = "?"
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "commit": commit,
        "source": args.source,
        "nfe": nfe,
        "depths": depths,
        "metric": args.metric,
        "features": a["features"],
        "reference": a["reference"],
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in runs.items()},
        "per_nfe": per_nfe,
        "min_spearman": min(v["spearman"] for v in per_nfe.values()),
    }
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    lines = [
        f"# search-depth stability and cost on CPU ({args.source})",
        "",
        f"Command: `{record['command']}` (commit {commit})",
        "",
        f"Machine: {record['machine']['platform']}, {record['machine']['cpu_count']} cores, torch {record['machine']['torch']} ({record['machine']['torch_threads']} threads), load average before {record['machine']['loadavg_before'][0]} / after {record['machine']['loadavg_after'][0]} (the cores were shared with other jobs: wall times are inflated; CPU time is the process's own).",
        "",
        f"Probe: {args.metric} with {a['features']} features against the {a['reference']} reference; depths {depths}; bootstrap 200 draws, 90% CI; seed 0; caches empty.",
        "",
        "| budget | samples | wall s | CPU s | best depth per NFE |",
        "|---|---|---|---|---|",
    ]
    for k, v in runs.items():
        lines.append(
            f"| {k} | {v['num_samples']} | {v['wall_s']} | {v['cpu_s']} | {', '.join(f'{n}: {d}' for n, d in v['best'].items())} |"
        )
    lines += [
        "",
        "| NFE | Spearman (default vs large) | probe by depth, default | probe by depth, large |",
        "|---|---|---|---|",
    ]
    for n_fe, v in per_nfe.items():
        lines.append(
            f"| {n_fe} | {v['spearman']:.3f} | {', '.join(f'{x:.1f}' for x in v['default'])} | {', '.join(f'{x:.1f}' for x in v['large'])} |"
        )
    if any("spearman_mse" in v for v in per_nfe.values()):
        lines += [
            "",
            "Paired per-sample MSE to the teacher (same runs):",
            "",
            "| NFE | Spearman | MSE by depth, default | MSE by depth, large |",
            "|---|---|---|---|",
        ]
        for n_fe, v in per_nfe.items():
            lines.append(
                f"| {n_fe} | {v['spearman_mse']:.3f} | {', '.join(f'{x:.4f}' for x in v['mse_default'])} | {', '.join(f'{x:.4f}' for x in v['mse_large'])} |"
            )
    lines += ["", f"Minimum Spearman over NFEs: **{record['min_spearman']:.3f}** (acceptance: >= 0.9)."]
    (res / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {res / (args.name + '.md')}")


if __name__ == "__main__":
    main()
