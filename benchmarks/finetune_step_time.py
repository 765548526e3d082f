"""Seconds per optimizer step: FM vs DMF with JVP vs DMF with finite differences, decoder-only vs all parameters.

Usage:
  PYTHONPATH=. python benchmarks/finetune_step_time.py [--model builtin:digits-sit] [--depth 5] [--batch-size 64]
      [--steps 8] [--out benchmarks/results/finetune_step_time-cpu.md]

Without the builtin model it times a random model of the same shape as the builtin digits SiT
(hidden 128, 6 blocks, 4 heads, MLP ratio 2, 1x16x16, patch 2). Each cell: median of --steps timed steps after
2 warm-up steps, same data and seed for every cell.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def build_model(source: str | None, depth: int):
    """The model to time: a source (converted at depth) or a random digits-sized DiT."""
    from flowmap_convert.config import LatentSpace, ModelConfig
    from flowmap_convert.model import FlowMap

    if source:
        try:
            from flowmap_convert.api import convert

            return convert(source, depth=depth), source
        except Exception as e:  # fall back to the random stand-in, say so in the table
            print(f"could not load {source} ({e}); timing a random model of the same size", file=sys.stderr)
    cfg = ModelConfig(
        input_size=16,
        in_channels=1,
        patch_size=2,
        hidden_size=128,
        num_blocks=6,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
        class_embed_rows=11,
        latent=LatentSpace(kind="identity", channels=1, size=16, image_channels=1, image_size=16),
    )
    torch.manual_seed(0)
    m = FlowMap(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return m.with_depth(depth), "random digits-sized DiT (hidden 128, 6 blocks)"


def time_cell(model, objective, derivative, train, batch_size, steps, data, mg_scale=0.6):
    """Median seconds per step of one (objective, derivative, train) cell."""
    import copy

    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.trainer import Trainer

    rec = Recipe(
        objective=objective,
        derivative=derivative,
        train=train,
        batch_size=batch_size,
        steps=1000,
        mg_scale=mg_scale,
        seed=0,
    )
    tr = Trainer(copy.deepcopy(model), data, rec, out="/nonexistent-benchmark-dir", progress=False, device="cpu")
    for _ in range(2):
        tr.train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:digits-sit")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--mg-scale", type=float, default=0.6, help="model guidance (adds two no-grad forwards of 2B per branch)"
    )
    ap.add_argument("--out", default="benchmarks/results/finetune_step_time-cpu.md")
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    a = ap.parse_args()

    model, what = build_model(a.model, a.depth)
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(512, model.config.in_channels, model.config.input_size, model.config.input_size, generator=g).clamp(
            -1, 1
        ),
        torch.randint(0, model.config.num_classes, (512,), generator=g),
    )
    cells = [("fm", "jvp"), ("dmf", "jvp"), ("dmf", "fd")]
    rows, res = [], {}
    for obj, der in cells:
        for train in ("all", "decoder"):
            s, tr = time_cell(model, obj, der, train, a.batch_size, a.steps, data, a.mg_scale)
            res[(obj, der, train)] = s
            n = sum(p.numel() for p in tr.trainable)
            label = "FM" if obj == "fm" else f"DMF, du/dt by {'JVP' if der == 'jvp' else 'finite differences'}"
            rows.append(f"| {label} | {train} | {n:,} | {s:.3f} |")
            print(rows[-1], flush=True)
    ratio = [
        f"| {('FM' if o == 'fm' else 'DMF ' + d.upper())} | {res[(o, d, 'decoder')] / res[(o, d, 'all')]:.2f} |"
        for o, d in cells
    ]
    cmd = "PYTHONPATH=. python " + " ".join([sys.argv[0]] + sys.argv[1:])
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Fine-tuning step time (CPU)",
            "",
            f"Command: `{cmd}`",
            "",
            f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(the machine is shared: absolute times are noisy, ratios less so).",
            "",
            f"Model: {what}, depth {model.config.depth} of {model.config.num_blocks}; batch {a.batch_size}; model guidance {a.mg_scale} "
            f"({'two extra no-grad forwards per branch' if a.mg_scale else 'off'}); fp32; median of {a.steps} steps after 2 warm-up steps.",
            "",
            "| step | train | trainable params | s / step |",
            "|---|---|---|---|",
            *rows,
            "",
            "Decoder-only / all (lower is cheaper):",
            "",
            "| objective | decoder / all |",
            "|---|---|",
            *ratio,
            "",
            f"DMF JVP / FM (all): {res[('dmf', 'jvp', 'all')] / res[('fm', 'jvp', 'all')]:.2f}; "
            f"DMF FD / DMF JVP (all): {res[('dmf', 'fd', 'all')] / res[('dmf', 'jvp', 'all')]:.2f}; "
            f"(decoder): {res[('dmf', 'fd', 'decoder')] / res[('dmf', 'jvp', 'decoder')]:.2f}.",
            "",
        ]
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a" if a.append else "w") as f:
        f.write(("\n" if a.append else "") + text)
    print(text)


def ddp_main(argv=None):
    """Seconds per step of `flowmap finetune` on 1 and 2 CPU processes (gloo DDP), one thread each.

    Usage: PYTHONPATH=. python benchmarks/finetune_step_time.py ddp [--model builtin:digits-sit] [--steps 12]
        [--batch-size 32] [--out benchmarks/results/finetune_ddp-cpu.md]
    """
    import json
    import socket
    import subprocess
    import tempfile

    ap = argparse.ArgumentParser(description=ddp_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:digits-sit")
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch; per process in the weak-scaling row")
    ap.add_argument("--out", default="benchmarks/results/finetune_ddp-cpu.md")
    a = ap.parse_args(argv)

    def port():
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            return sk.getsockname()[1]

    def one(procs, batch, work):
        out = Path(work) / f"p{procs}-b{batch}"
        launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port())]
        cmd = [sys.executable, *(launch if procs > 1 else []), "-m", "flowmap_convert.cli", "finetune", a.model]
        cmd += ["--data", a.data, "--steps", str(a.steps), "--batch-size", str(batch), "--checkpoint-every", "0"]
        cmd += ["--log-every", "1000", "--device", "cpu", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        per = [b - t for t, b in zip(times[2:], times[3:])]  # after 2 warm-up steps
        return statistics.median(per)

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for procs, batch, what in (
            (1, a.batch_size, "1 process"),
            (2, a.batch_size // 2, "2 processes, same global batch"),
            (2, a.batch_size, "2 processes, same per-process batch (2x global)"),
        ):
            sec = one(procs, batch, work)
            rows.append(f"| {what} | {procs} | {batch} | {procs * batch} | {sec:.3f} | {procs * batch / sec:.1f} |")
            print(rows[-1], flush=True)
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Fine-tuning step time: 1 vs 2 CPU processes (gloo DDP)",
            "",
            f"Command: `PYTHONPATH=. python {' '.join(sys.argv)}`; each run is `flowmap finetune {a.model} --data "
            f"{a.data} --steps {a.steps} --checkpoint-every 0 --device cpu` (under `torchrun --nproc_per_node 2` for 2 "
            "processes), DMF with JVP, fp32, default recipe.",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs shared with other jobs, torch {torch.__version__}; "
            f"OMP_NUM_THREADS=1, so 1 intra-op thread per process; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
            f"{load[2]:.1f}. Seconds per optimizer step: median over steps 3..{a.steps} of metrics.jsonl `time`.",
            "",
            "| run | processes | batch / process | global batch | s / step | samples / s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp"]:
        ddp_main(sys.argv[2:])
    else:
        main()
