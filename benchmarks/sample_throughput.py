"""images/s of `flowmap sample` on 1 and 2 processes (torchrun, gloo) at 1 NFE, and the cost of `flowmap eval`.

Every run is a fresh command line, as a user would type it (process start-up and model load included, reported
separately by the progress line's own rate). Writes a JSON and a Markdown table under benchmarks/results/.

    python benchmarks/sample_throughput.py --num-samples 2000 --out benchmarks/results/sample_throughput-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return time.perf_counter() - t0, p.stderr


def rates(stderr: str) -> list[float]:
    """images/s from each rank's final progress line."""
    return [float(m) for m in re.findall(r"images \(100%\), ([0-9.]+) images/s", stderr)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits-sit")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_throughput-cpu"))
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "FLOWMAP_DIST_BACKEND": "gloo"}
    tmp = Path(tempfile.mkdtemp(prefix="flowmap-bench-"))
    common = [a.model, "--nfe", "1", "-n", str(a.num_samples), "--batch-size", str(a.batch_size)]
    common += ["--npz", "--no-png", "--device", "cpu", "--threads", str(a.threads)]
    flowmap = [sys.executable, "-m", "flowmap_convert.cli"]
    res = {"model": a.model, "nfe": 1, "num_samples": a.num_samples, "batch_size": a.batch_size}
    res["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores visible (shared), {a.threads} torch thread(s)/process"
    )
    wall1, err1 = run([*flowmap, "sample", *common, "--out", str(tmp / "one")], env)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flowmap_convert.cli"]
    wall2, err2 = run([*launch, "sample", *common, "--out", str(tmp / "two")], env)
    same = (tmp / "one" / "samples.npz").read_bytes() == (tmp / "two" / "samples.npz").read_bytes()
    r1, r2 = rates(err1), rates(err2)
    res["one_process"] = {
        "wall_s": round(wall1, 2),
        "images_per_s_sampling": r1[0],
        "images_per_s_wall": round(a.num_samples / wall1, 1),
    }
    res["two_processes"] = {
        "wall_s": round(wall2, 2),
        "images_per_s_sampling": round(sum(r2), 1),
        "per_rank_images_per_s": r2,
        "images_per_s_wall": round(a.num_samples / wall2, 1),
        "identical_npz": same,
    }
    walle, _ = run(
        [*flowmap, "eval", str(tmp / "one" / "samples.npz"), "--out", str(tmp / "eval"), "--threads", str(a.threads)],
        env,
    )
    ev = json.loads((tmp / "eval" / "eval.json").read_text())["results"][0]
    res["eval"] = {
        "wall_s": round(walle, 2),
        "metric_seconds": ev["eval_seconds"],
        "digits_fd": round(ev["digits_fd"], 3),
    }
    res["eval_vs_sampling"] = round(walle / wall1, 3)
    res["commands"] = [
        f"OMP_NUM_THREADS={a.threads} flowmap sample {' '.join(common)} --out one",
        f"OMP_NUM_THREADS={a.threads} FLOWMAP_DIST_BACKEND=gloo torchrun --nproc_per_node 2 -m flowmap_convert.cli sample {' '.join(common)} --out two",
        f"OMP_NUM_THREADS={a.threads} flowmap eval one/samples.npz --out eval --threads {a.threads}",
    ]
    print(json.dumps(res, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
