"""Digits fine-tuning benchmark: digits FD / label accuracy at 1, 2, 4 steps before and after a short DMF fine-tune.

Usage:
  PYTHONPATH=. python benchmarks/digits/finetune_digits.py [--model builtin:digits-sit] [--depth 5] [--steps 300]
      [--batch-size 64] [--lr 1e-4] [--mg-scale 0.0] [--train all] [--num-samples 1000] [--nfe 1,2,4]
      [--run-dir /tmp/digits-ft] [--record benchmarks/digits/FINETUNE.md]

Every model is sampled with the same seed (common random numbers: sample i's noise depends only on (seed, i)),
so the before / after comparison is paired; the converted model is also sampled with a second seed to show
the sampling-noise floor of the FD at this sample count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def evaluate(model, nfes, n, seed):
    """{nfe: {fd, acc}} for Euler flow-map sampling with n samples cycling through the classes."""
    from flowmap_convert.digits import evaluate_digits
    from flowmap_convert.sampling import sample

    out = {}
    for nfe in nfes:
        images, _, labels, _ = sample(
            model, nfe=nfe, num_samples=n, seed=seed, batch_size=250, device="cpu", return_latents=True
        )
        out[nfe] = evaluate_digits(images, labels)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:digits-sit")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mg-scale", type=float, default=0.0)
    ap.add_argument("--train", default="all")
    ap.add_argument("--loss", default="adaptive")
    ap.add_argument("--derivative", default="jvp")
    ap.add_argument("--ema", type=float, default=-1.0)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--nfe", default="1,2,4")
    ap.add_argument("--run-dir", default="/tmp/digits-ft")
    ap.add_argument("--record", default="benchmarks/digits/FINETUNE.md")
    a = ap.parse_args()
    nfes = [int(s) for s in a.nfe.split(",")]
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.outputs import check_workdir

    try:  # before any work: an existing --run-dir is replaced only when an earlier fine-tune wrote it
        check_workdir(a.run_dir, "run", "fine-tune run", flag="--run-dir")
    except FlowmapError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from flowmap_convert.api import convert
    from flowmap_convert.finetuning import finetune
    from flowmap_convert.io import read_model_dir

    base = convert(a.model, depth=a.depth)
    t0 = time.perf_counter()
    before = evaluate(base, nfes, a.num_samples, seed=0)
    floor = evaluate(base, nfes, a.num_samples, seed=1)
    eval_s = time.perf_counter() - t0
    print("converted, no training:", json.dumps(before), "\nseed 1:", json.dumps(floor), flush=True)

    import shutil

    if Path(a.run_dir).exists():
        shutil.rmtree(a.run_dir)  # ours (checked above): a fresh run, not a resume
    t0 = time.perf_counter()
    ema = finetune(
        convert(a.model, depth=a.depth),
        data="builtin:digits",
        objective="dmf",
        mg_scale=a.mg_scale,
        train=a.train,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        out=a.run_dir,
        loss=a.loss,
        derivative=a.derivative,
        ema=a.ema,
        checkpoint_every=0,
        progress=sys.stderr.isatty(),
        log_every=25,
        device="cpu",
    )
    wall = time.perf_counter() - t0
    raw = read_model_dir(Path(a.run_dir) / "raw")
    after_ema = evaluate(ema, nfes, a.num_samples, seed=0)
    after_raw = evaluate(raw, nfes, a.num_samples, seed=0)
    print("EMA:", json.dumps(after_ema), "\nraw:", json.dumps(after_raw), flush=True)

    def row(name, res):
        return f"| {name} | " + " | ".join(f"{res[n]['fd']:.1f} / {res[n]['acc']:.2f}" for n in nfes) + " |"

    metrics = [json.loads(line) for line in open(Path(a.run_dir) / "metrics.jsonl")]
    first, last = metrics[: max(1, len(metrics) // 10)], metrics[-max(1, len(metrics) // 10) :]

    def mean(ms, k):
        return sum(m.get(k, float("nan")) for m in ms) / len(ms)

    cmd = "PYTHONPATH=. python " + " ".join([sys.argv[0]] + sys.argv[1:])
    load = os.getloadavg()
    text = "\n".join(
        [
            "# Digits: DMF fine-tuning of the converted builtin model",
            "",
            f"Command: `{cmd}`",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs; load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} threads, fp32.",
            "",
            f"Fine-tune: `flowmap finetune {a.model} --depth {a.depth} --data builtin:digits --objective dmf --mg-scale {a.mg_scale} "
            f"--train {a.train} --loss {a.loss} --derivative {a.derivative} --steps {a.steps} --batch-size {a.batch_size} --lr {a.lr}` "
            f"(EMA decay {ema.config.training['ema_decay']}); **{a.steps} steps in {wall / 60:.1f} min wall** "
            f"({wall / a.steps:.2f} s/step, including the export's sample grids).",
            f"Loss (first / last 10% of steps): {mean(first, 'loss'):.4f} -> {mean(last, 'loss'):.4f}; "
            f"FM {mean(first, 'fm'):.4f} -> {mean(last, 'fm'):.4f}; MF {mean(first, 'mf'):.4f} -> {mean(last, 'mf'):.4f}; "
            f"skipped steps {metrics[-1]['skipped_total']}.",
            "",
            f"Evaluation: Euler flow-map sampling, {a.num_samples} samples cycling through the 10 classes, seed 0 for every model "
            f"(paired), digits FD / label accuracy from `flowmap_convert.digits.evaluate_digits` ({eval_s / 2:.0f} s per model pass).",
            "",
            "| model | " + " | ".join(f"{n} step{'s' if n > 1 else ''}: FD / acc" for n in nfes) + " |",
            "|---|" + "---|" * len(nfes),
            row(f"converted at depth {a.depth}, no training (seed 0)", before),
            row("same, sampling seed 1 (noise floor)", floor),
            row("fine-tuned, EMA weights (seed 0)", after_ema),
            row("fine-tuned, raw weights (seed 0)", after_raw),
            "",
        ]
    )
    Path(a.record).parent.mkdir(parents=True, exist_ok=True)
    with open(a.record, "a") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
