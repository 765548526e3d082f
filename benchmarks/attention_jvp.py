"""Benchmark attention forward + forward-mode JVP: fused Triton kernel vs SDPA forward vs math-backend JVP.

Usage: python benchmarks/attention_jvp.py [--seq-lens 256,1024,4096] [--head-dims 64,72,128]
                                          [--batch 4] [--heads 16] [--out benchmarks/results/attention_jvp-<device>]

Needs a CUDA GPU; without one it prints one line and exits with code 2. Writes <out>.json
and <out>.md (tables plus the acceptance gates) and prints the markdown.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch

# Acceptance gates of issue 5 (see benchmarks/README-attention.md).
GATE_TIME_RATIO = 2.0  # ours (forward + JVP) / SDPA flash forward, at N >= 1024
GATE_MEMORY_RATIO = 15.0  # math-JVP peak / ours peak, at N = 1024
GATE_TANGENT_ERR = 1.2e-3  # bf16 tangent max abs error vs fp32 reference, at N = 1024
GATE_MEMORY_EXPONENT = 1.2  # ours' extra memory grows like N^e between the two largest N; N^2 would be e = 2


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="256,1024,4096", help="comma-separated sequence lengths N")
    p.add_argument("--head-dims", default="64,72,128", help="comma-separated head dims D")
    p.add_argument("--batch", type=int, default=4, help="batch size B")
    p.add_argument("--heads", type=int, default=16, help="number of heads H")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (includes Triton autotuning)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls; the median is reported")
    p.add_argument("--skip-math-above", type=int, default=8192, help="do not run the math JVP above this N")
    p.add_argument(
        "--out", default=None, help="output path without extension (default benchmarks/results/attention_jvp-<device>)"
    )
    return p.parse_args(argv)


def device_slug() -> str:
    """A file-name-safe name of the current GPU, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def measure(fn, warmup: int, repeats: int) -> dict:
    """Median CUDA-event time (ms) and peak allocated memory (MiB, absolute and above the inputs) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    mib = 1024.0**2
    return {"ms": statistics.median(times), "peak_mib": peak / mib, "extra_mib": (peak - base) / mib}


def guarded(fn, warmup, repeats) -> dict:
    """measure() that turns an out-of-memory into a recorded result instead of a crash."""
    try:
        return measure(fn, warmup, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_mib": None, "extra_mib": None, "error": "OOM"}


def sdpa_flash_forward(q, k, v):
    """Plain SDPA forward, restricted to the flash backend (falls back to SDPA's choice if flash refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def bench_case(B, H, N, D, args) -> dict:
    """All measurements for one (N, D)."""
    from flowmap_convert.kernels import attention, math_attention
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    g = torch.Generator(device="cuda").manual_seed(0)

    def draw():
        return torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v = draw(), draw(), draw()
    tq, tk, tv = draw(), draw(), draw()

    def ours():  # what a model call costs under torch.func.jvp: SDPA forward + Triton tangent kernel
        return torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="triton"), (q, k, v), (tq, tk, tv))

    def fused():  # the one-pass kernel alone, computing O and dO together
        return attention_fwd_jvp(q, k, v, tq, tk, tv)

    def math_jvp():  # materialises the N x N scores and their tangents
        return torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))

    sdpa_name = "flash"
    try:
        sdpa_flash_forward(q, k, v)
        sdpa_fn = lambda: sdpa_flash_forward(q, k, v)  # noqa: E731
    except RuntimeError:  # flash kernel unavailable for this shape / GPU
        sdpa_name = "default"
        sdpa_fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    row = {
        "N": N,
        "D": D,
        "ours_jvp": guarded(ours, args.warmup, args.repeats),
        "fused_kernel": guarded(fused, args.warmup, args.repeats),
        "sdpa_forward": {**guarded(sdpa_fn, args.warmup, args.repeats), "backend": sdpa_name},
        "math_jvp": guarded(math_jvp, args.warmup, args.repeats) if N <= args.skip_math_above else {"error": "skipped"},
    }
    del q, k, v, tq, tk, tv
    torch.cuda.empty_cache()
    return row


def tangent_error(B, H, N, D) -> dict:
    """Max abs error of the bf16 tangent (bf16-stored, and fp32-stored) vs an fp32 reference on the same inputs."""
    from flowmap_convert.kernels import attention, math_attention
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(6)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        ref = torch.func.jvp(math_attention, tuple(x.float() for x in xs[:3]), tuple(x.float() for x in xs[3:]))[1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    t_bf16 = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="triton"), tuple(xs[:3]), tuple(xs[3:]))[1]
    _, t_f32 = attention_fwd_jvp(*xs, tangent_dtype=torch.float32)
    return {
        "N": N,
        "D": D,
        "max_abs_err_bf16_tangent": (t_bf16.float() - ref).abs().max().item(),
        "max_abs_err_fp32_stored_tangent": (t_f32 - ref).abs().max().item(),
        "max_abs_ref": ref.abs().max().item(),
    }


def gates(rows, errors, seq_lens) -> list:
    """Evaluate the acceptance gates on the measured rows."""
    out = []
    for r in rows:
        o, s, m = r["ours_jvp"], r["sdpa_forward"], r["math_jvp"]
        if r["N"] >= 1024 and o.get("ms") and s.get("ms"):
            ratio = o["ms"] / s["ms"]
            out.append(
                {
                    "gate": f"time ours/SDPA-{s['backend']} N={r['N']} D={r['D']}",
                    "value": ratio,
                    "target": f"<= {GATE_TIME_RATIO}",
                    "pass": ratio <= GATE_TIME_RATIO,
                }
            )
        if r["N"] == 1024 and o.get("peak_mib") and m.get("peak_mib"):
            ratio = m["peak_mib"] / o["peak_mib"]
            out.append(
                {
                    "gate": f"peak memory math/ours N=1024 D={r['D']}",
                    "value": ratio,
                    "target": f">= {GATE_MEMORY_RATIO}",
                    "pass": ratio >= GATE_MEMORY_RATIO,
                }
            )
    big = sorted(n for n in seq_lens if n >= 1024)
    if len(big) >= 2:
        n1, n2 = big[-2], big[-1]
        for D in sorted({r["D"] for r in rows}):
            a = next((r["ours_jvp"] for r in rows if r["N"] == n1 and r["D"] == D), {})
            b = next((r["ours_jvp"] for r in rows if r["N"] == n2 and r["D"] == D), {})
            if a.get("extra_mib") and b.get("extra_mib"):
                e = math.log(b["extra_mib"] / a["extra_mib"]) / math.log(n2 / n1)  # memory ~ N^e
                out.append(
                    {
                        "gate": f"memory growth exponent N={n1}->{n2} D={D}",
                        "value": e,
                        "target": f"<= {GATE_MEMORY_EXPONENT}",
                        "pass": e <= GATE_MEMORY_EXPONENT,
                    }
                )
    for e in errors:
        v = e["max_abs_err_bf16_tangent"]
        out.append(
            {
                "gate": f"bf16 tangent max abs err N={e['N']} D={e['D']}",
                "value": v,
                "target": f"<= {GATE_TANGENT_ERR}",
                "pass": v <= GATE_TANGENT_ERR,
            }
        )
    return out


def fmt(x, spec=".3f"):
    """Number or dash."""
    return "-" if x is None else format(x, spec)


def to_markdown(meta, rows, errors, gate_rows) -> str:
    """Markdown report: timings/memory table, numerical check, gates."""
    lines = [
        f"# attention forward + JVP benchmark ({meta['device']})",
        "",
        f"B={meta['B']}, H={meta['H']}, bf16 inputs, median of {meta['repeats']} runs after {meta['warmup']} warm-up; "
        f"torch {meta['torch']}, triton {meta['triton']}. Memory is torch.cuda.max_memory_allocated (MiB), "
        "absolute and above the already-allocated inputs. `ours` = torch.func.jvp through `attention(backend='triton')` "
        "(SDPA forward + Triton tangent kernel); `fused` = the one-pass kernel alone (O and dO).",
        "",
        "| N | D | ours ms | fused ms | SDPA fwd ms | math JVP ms | ours / SDPA | ours peak | ours extra | math peak | math / ours peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, f, s, m = r["ours_jvp"], r["fused_kernel"], r["sdpa_forward"], r["math_jvp"]
        ratio = o["ms"] / s["ms"] if o.get("ms") and s.get("ms") else None
        mem = m["peak_mib"] / o["peak_mib"] if o.get("peak_mib") and m.get("peak_mib") else None
        m_ms = fmt(m.get("ms")) if "error" not in m else m["error"]
        lines.append(
            f"| {r['N']} | {r['D']} | {fmt(o.get('ms'))} | {fmt(f.get('ms'))} | {fmt(s.get('ms'))} ({s['backend']}) | {m_ms} | "
            f"{fmt(ratio, '.2f')} | {fmt(o.get('peak_mib'), '.1f')} | {fmt(o.get('extra_mib'), '.1f')} | "
            f"{fmt(m.get('peak_mib'), '.1f')} | {fmt(mem, '.1f')} |"
        )
    lines += ["", "## Tangent accuracy (bf16 vs fp32 reference on the same bf16 inputs)", ""]
    lines += [
        "| N | D | max abs err (bf16 tangent) | max abs err (fp32-stored tangent) | max abs reference |",
        "|---|---|---|---|---|",
    ]
    for e in errors:
        lines.append(
            f"| {e['N']} | {e['D']} | {e['max_abs_err_bf16_tangent']:.2e} | {e['max_abs_err_fp32_stored_tangent']:.2e} | {e['max_abs_ref']:.3f} |"
        )
    lines += ["", "## Gates", "", "| gate | value | target | pass |", "|---|---|---|---|"]
    for g in gate_rows:
        lines.append(f"| {g['gate']} | {g['value']:.4g} | {g['target']} | {'yes' if g['pass'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and os.replace, so no partial file is left behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    """Run the benchmark and write <out>.json and <out>.md."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "attention_jvp benchmark needs a CUDA GPU (torch.cuda.is_available() is False); run it on an H100/H200.",
            file=sys.stderr,
        )
        return 2
    import triton

    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    head_dims = [int(x) for x in args.head_dims.split(",")]
    meta = {
        "device": torch.cuda.get_device_name(),
        "B": args.batch,
        "H": args.heads,
        "dtype": "bfloat16",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = [bench_case(args.batch, args.heads, N, D, args) for N in seq_lens for D in head_dims]
    errors = [tangent_error(args.batch, args.heads, 1024, D) for D in head_dims]
    gate_rows = gates(rows, errors, seq_lens)
    out = args.out or os.path.join("benchmarks", "results", f"attention_jvp-{device_slug()}")
    md = to_markdown(meta, rows, errors, gate_rows)
    write_atomic(
        out + ".json",
        json.dumps({"meta": meta, "rows": rows, "tangent_error": errors, "gates": gate_rows}, indent=2) + "\n",
    )
    write_atomic(out + ".md", md)
    print(md)
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
