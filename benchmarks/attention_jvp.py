"""GPU checks and benchmark of attention forward + JVP: correctness, timings, a DMF step, and a results table.

Usage (each step writes <out>/<step>.json, rewritten after every case, so a step killed by
its timeout still leaves what it measured; <out> defaults to $OUT, else benchmarks/results):

    python benchmarks/attention_jvp.py env          # device, versions
    python benchmarks/attention_jvp.py correctness  # bf16 / fp16, L in 1,65,257,1024, D in 64,72,128, grads, autocast
    python benchmarks/attention_jvp.py timing       # the DMF shape (B 32, H 16, N 256, D 72), then B=4, H=16, N in
                                                    # 1024,4096, D in 72,128: fused, SDPA flash, cuDNN, math, jvp+bwd
    python benchmarks/attention_jvp.py dmf-step     # one DMF step of a SiT-XL/2-sized q-k-norm model, bf16, auto / math
    python benchmarks/attention_jvp.py table        # <out>/*.json -> benchmarks/results/attention-<device>.md

benchmarks/gpu_check.sh runs them all, each under its own timeout. Every step but env and
table needs a CUDA GPU; without one it prints one line and exits with code 2.
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

# Gates (see benchmarks/README-attention.md)
GATE_FUSED_VS_FLASH_FWD = 3.0  # fused forward + JVP time / SDPA-flash forward (6 vs 2 matmul units: the floor)
GATE_TRAIN_VS_FLASH_TRAIN = 1.6  # jvp + backward / flash forward + backward (11 vs 7 units)
GATE_MEMORY_VS_MATH = 15.0  # math-JVP extra memory / fused extra memory, N = 1024
# Correctness tolerances: max |err| / max |reference| on std-0.5 inputs (fp32 reference, same rounded inputs)
REL_TOL = {
    "bfloat16": {"out": 2e-2, "grad": 5e-2},
    "float16": {"out": 4e-3, "grad": 1e-2},
    "float32": {"out": 1e-4, "grad": 1e-3},
}


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["env", "correctness", "timing", "dmf-step", "table"])
    p.add_argument("--out", default=None, help="JSON directory (default $OUT, else benchmarks/results)")
    p.add_argument("--results", default=os.path.join("benchmarks", "results"), help="where `table` writes the .md")
    p.add_argument("--seq-lens", default="1024,4096", help="timing: comma-separated N")
    p.add_argument("--head-dims", default="72,128", help="timing: comma-separated D")
    p.add_argument("--batch", type=int, default=4, help="timing: B")
    p.add_argument("--heads", type=int, default=16, help="timing: H")
    p.add_argument("--warmup", type=int, default=3, help="timing: untimed calls first (includes autotuning)")
    p.add_argument("--repeats", type=int, default=10, help="timing: timed calls; the median is reported")
    p.add_argument("--skip-math-above", type=int, default=4096, help="timing: no math JVP above this N")
    p.add_argument("--dmf-batch", type=int, default=16, help="dmf-step: batch size")
    p.add_argument("--dmf-steps", type=int, default=3, help="dmf-step: timed steps after one warm-up step")
    p.add_argument("--tiny", action="store_true", help="dmf-step: a 2-block model (smoke test, CPU allowed)")
    return p.parse_args(argv)


def out_dir(args) -> str:
    return args.out or os.environ.get("OUT") or os.path.join("benchmarks", "results")


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and os.replace, so no partial file is left behind."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Recorder:
    """One JSON file per step, rewritten after every record so a timeout keeps the finished cases."""

    def __init__(self, directory: str, step: str, meta: dict | None = None):
        self.path = os.path.join(directory, f"{step}.json")
        self.doc = {"step": step, "meta": meta or {}, "rows": [], "done": False}
        self.flush()

    def add(self, row: dict) -> None:
        self.doc["rows"].append(row)
        self.flush()
        print(json.dumps(row), flush=True)

    def finish(self, **extra) -> None:
        self.doc.update(extra, done=True)
        self.flush()

    def flush(self) -> None:
        write_atomic(self.path, json.dumps(self.doc, indent=1) + "\n")


def device_slug(name: str) -> str:
    """A file-name-safe device name, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def env_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except Exception:
        info["flash_attn"] = None
    return info


# ---------------------------------------------------------------- correctness


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-12)


def _meanflow(fn, xs, w_o, w_t):
    """loss = <o, w_o> + <stopgrad(dO), w_t>: output, tangent and q/k/v gradients (the trainer's pattern)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in xs[:3])
    o, t = torch.func.jvp(fn, (q, k, v), tuple(xs[3:]))
    ((o.float() * w_o).sum() + (t.detach().float() * w_t).sum()).backward()
    return o, t, q.grad, k.grad, v.grad


def correctness(rec: Recorder) -> None:
    from flowmap_convert.kernels import attention, backward_counts, math_attention

    names = ("out", "tangent", "dq", "dk", "dv")

    def case(dtype, L, D, B=2, H=2, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        xs = [(0.5 * torch.randn(B, H, L, D, device="cuda", generator=g)).to(dtype) for _ in range(6)]
        w_o, w_t = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(2))
        before = backward_counts()
        t0 = time.time()
        got = _meanflow(lambda a, b, c: attention(a, b, c, backend="auto"), xs, w_o, w_t)
        torch.cuda.synchronize()
        secs = time.time() - t0
        after = backward_counts()
        ref = _meanflow(math_attention, [x.float() for x in xs], w_o, w_t)
        errs = {n: _rel_err(a, b) for n, a, b in zip(names, got, ref)}
        tol = REL_TOL[str(dtype).split(".")[-1]]
        ok = all(errs[n] <= tol["out" if n in ("out", "tangent") else "grad"] for n in names)
        ok = ok and all(torch.isfinite(x).all().item() for x in got)
        bwd = "flash" if after["flash"] > before["flash"] else "math"
        rec.add(dict(case="meanflow", dtype=str(dtype), L=L, D=D, rel_err=errs, backward=bwd, secs=secs, ok=ok))

    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("FLOWMAP_TRITON_AUTOTUNE", "0")  # one fixed config: compile once per (D, dtype)
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 72, 128):
            for L in (1, 65, 257, 1024):
                try:
                    case(dtype, L, D)
                except Exception as e:  # record and go on: one failure must not cost the rest of the slot
                    rec.add(dict(case="meanflow", dtype=str(dtype), L=L, D=D, ok=False, error=repr(e)[:400]))

    # the autocast q-k-norm case: a DiT attention layer with RMS q-k norm under bf16 autocast
    try:
        from flowmap_convert.dit import Attention

        torch.manual_seed(0)
        layer = Attention(1152, 16, qk_norm="rms").cuda()
        x, dx = (0.5 * torch.randn(2, 256, 1152, device="cuda") for _ in range(2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o, t = torch.func.jvp(layer, (x,), (dx,))
        o.float().pow(2).mean().backward()
        g_auto = layer.qkv.weight.grad.clone()
        layer.zero_grad()
        from flowmap_convert.kernels import use_backend

        with use_backend("math"):
            o_ref, t_ref = torch.func.jvp(layer, (x,), (dx,))  # fp32 reference, no autocast
            o_ref.float().pow(2).mean().backward()
        errs = {
            "out": _rel_err(o, o_ref),
            "tangent": _rel_err(t, t_ref),
            "dW_qkv": _rel_err(g_auto, layer.qkv.weight.grad),
        }
        ok = errs["out"] <= 3e-2 and errs["tangent"] <= 3e-2 and errs["dW_qkv"] <= 6e-2
        rec.add(dict(case="autocast-qk-norm", dtype=str(o.dtype), rel_err=errs, ok=ok))
    except Exception as e:
        rec.add(dict(case="autocast-qk-norm", ok=False, error=repr(e)[:400]))

    # B*H = 70000 > 65535 on one grid axis, and fp32 inputs (tf32x3) at D = 72
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    for label, shape, dtype in (
        ("many-heads", (1, 70000, 16, 64), torch.bfloat16),
        ("fp32", (2, 2, 257, 72), torch.float32),
    ):
        try:
            t0 = time.time()
            xs = [0.5 * torch.randn(shape, device="cuda").to(dtype) for _ in range(6)]
            o, t, _ = attention_fwd_jvp(*xs)
            torch.cuda.synchronize()
            secs = time.time() - t0
            ref_o, ref_t = torch.func.jvp(
                math_attention, tuple(x.float() for x in xs[:3]), tuple(x.float() for x in xs[3:])
            )
            errs = {"out": _rel_err(o, ref_o), "tangent": _rel_err(t, ref_t)}
            tol = REL_TOL[str(dtype).split(".")[-1]]["out"]
            rec.add(
                dict(
                    case=label,
                    dtype=str(dtype),
                    shape=list(shape),
                    rel_err=errs,
                    secs=secs,
                    ok=max(errs.values()) <= tol,
                )
            )
        except Exception as e:
            rec.add(dict(case=label, ok=False, error=repr(e)[:400]))
    rec.finish(all_ok=all(r.get("ok") for r in rec.doc["rows"]))


# ---------------------------------------------------------------- timing


CALLS_PER_EVENT_PAIR = 20  # without triton.testing: time this many calls between two CUDA events


def bench_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds per call: triton.testing.do_bench (many calls per measurement, L2 flushed between them),
    else CUDA events around CALLS_PER_EVENT_PAIR calls each, so that launch overhead does not dominate."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=max(50, 10 * repeats), return_mode="median"))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_EVENT_PAIR):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_EVENT_PAIR)
    return statistics.median(times)


def measure(fn, warmup: int, repeats: int, flops: float | None = None) -> dict:
    """Median time (ms), TFLOP/s when `flops` is given, and peak memory above what was allocated before (MiB)."""
    for _ in range(warmup):  # autotuning and compilation happen here, outside the timed calls
        fn()
    torch.cuda.synchronize()
    ms = bench_ms(fn, warmup, repeats)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    row = {"ms": ms, "extra_mib": extra / 2**20}
    if flops:
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    return row


def guarded(fn, warmup, repeats, flops=None) -> dict:
    try:
        return measure(fn, warmup, repeats, flops)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    except Exception as e:
        return {"error": repr(e)[:300]}


def timing_case(B, H, N, D, args) -> dict:
    from flowmap_convert.kernels import attention, math_attention
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, tq, tk, tv, do = ((0.5 * torch.randn(B, H, N, D, device="cuda", generator=g)).bfloat16() for _ in range(7))

    def flash_fwd():
        with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def flash_fwd_bwd():
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(a, b, c)
        o.backward(do)
        return a.grad

    def fused():
        with torch.no_grad():
            return attention_fwd_jvp(q, k, v, tq, tk, tv)

    def jvp_bwd():  # the training step's attention: jvp (fused), then backward (flash on the saved O / LSE)
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        o, t = torch.func.jvp(lambda x, y, z: attention(x, y, z, backend="auto"), (a, b, c), (tq, tk, tv))
        o.backward(do)
        return a.grad, t

    def math_jvp():
        with torch.no_grad():
            return torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))

    def cudnn_fwd():
        with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def cudnn_fwd_bwd():
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(a, b, c)
        o.backward(do)
        return a.grad

    # matmul units of 2 B H N^2 D flops each: forward 2 (QK^T, PV); forward + JVP 6; forward + backward 7
    # (backward: dV, dP, dQ, dK and the recomputed S); jvp + backward 11 (the gates above, benchmarks/README-attention.md)
    unit = 2.0 * B * H * N * N * D
    row = {"N": N, "D": D, "B": B, "H": H}
    w, n = args.warmup, args.repeats
    row["flash_fwd"] = guarded(flash_fwd, w, n, 2 * unit)
    row["cudnn_fwd"] = guarded(cudnn_fwd, w, n, 2 * unit)
    row["fused"] = guarded(fused, w, n, 6 * unit)
    row["flash_fwd_bwd"] = guarded(flash_fwd_bwd, w, n, 7 * unit)
    row["cudnn_fwd_bwd"] = guarded(cudnn_fwd_bwd, w, n, 7 * unit)
    row["jvp_bwd"] = guarded(jvp_bwd, w, n, 11 * unit)
    row["math_jvp"] = guarded(math_jvp, 1, 3, 6 * unit) if N <= args.skip_math_above else {"error": "skipped"}
    del q, k, v, tq, tk, tv, do
    torch.cuda.empty_cache()
    return row


def gates(rows) -> list:
    out = []

    def gate(name, value, target, ok):
        out.append({"gate": name, "value": value, "target": target, "pass": bool(ok)})

    for r in rows:
        f, s, j, fb, m = (r.get(k, {}) for k in ("fused", "flash_fwd", "jvp_bwd", "flash_fwd_bwd", "math_jvp"))
        tag = f"N={r['N']} D={r['D']}"
        if f.get("ms") and s.get("ms"):
            x = f["ms"] / s["ms"]
            gate(f"fused fwd+JVP / flash fwd, {tag}", x, f"<= {GATE_FUSED_VS_FLASH_FWD}", x <= GATE_FUSED_VS_FLASH_FWD)
        if j.get("ms") and fb.get("ms"):
            x = j["ms"] / fb["ms"]
            gate(
                f"jvp+bwd / flash fwd+bwd, {tag}", x, f"<= {GATE_TRAIN_VS_FLASH_TRAIN}", x <= GATE_TRAIN_VS_FLASH_TRAIN
            )
        if r["N"] == 1024 and f.get("extra_mib") and m.get("extra_mib"):
            x = m["extra_mib"] / f["extra_mib"]
            gate(f"math-JVP / fused extra memory, {tag}", x, f">= {GATE_MEMORY_VS_MATH}", x >= GATE_MEMORY_VS_MATH)
    return out


DMF_SHAPE = (32, 16, 256, 72)  # B, H, N, D of a DMF / SiT-XL/2 step at 256 px: batch 32, 16 heads of 72, 256 tokens


def timing(rec: Recorder, args) -> None:
    os.environ.setdefault("FLOWMAP_TRITON_AUTOTUNE", "1")
    B, H, N, D = DMF_SHAPE
    rec.add(timing_case(B, H, N, D, args))
    for N in (int(x) for x in args.seq_lens.split(",")):
        for D in (int(x) for x in args.head_dims.split(",")):
            rec.add(timing_case(args.batch, args.heads, N, D, args))
    gate_rows = gates(rec.doc["rows"])
    rec.finish(gates=gate_rows, all_pass=all(g["pass"] for g in gate_rows), autotune=autotune_record())


def _plain(x):
    """A JSON-friendly value (numbers and strings as they are, anything else as its repr)."""
    return x if isinstance(x, (int, float, bool, str)) or x is None else repr(x)


def autotune_record() -> dict:
    """What the Triton autotuner chose (per head dim, dtype class and length bucket) and, per compiled kernel, its
    registers, spills and constants (head dim, block sizes), so a later slot can start from these without re-tuning."""
    out = {"winners": [], "compiled": []}
    try:
        from flowmap_convert.kernels import triton_jvp as tj
    except Exception as e:
        return {"error": repr(e)[:300]}
    for key, tuner in list(tj._KERNELS.items()):
        if not isinstance(key, tuple):
            continue
        for tune_key, cfg in dict(getattr(tuner, "cache", {}) or {}).items():
            out["winners"].append(
                {
                    "head_dim": key[0],
                    "fp32": key[1],
                    "key": [_plain(x) for x in (tune_key if isinstance(tune_key, tuple) else (tune_key,))],
                    "kwargs": {k: _plain(v) for k, v in dict(getattr(cfg, "kwargs", {})).items()},
                    "num_warps": getattr(cfg, "num_warps", None),
                    "num_stages": getattr(cfg, "num_stages", None),
                }
            )
    jit = tj._KERNELS.get("compiled")
    for entry in dict(getattr(jit, "device_caches", {}) or {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for kern in list(dict(cache).values()):
            try:
                kern._init_handles()  # fills n_regs / n_spills
            except Exception:
                pass
            md = getattr(kern, "metadata", None)
            consts = getattr(getattr(kern, "src", None), "constants", {}) or {}
            out["compiled"].append(
                {
                    "n_regs": getattr(kern, "n_regs", None),
                    "n_spills": getattr(kern, "n_spills", None),
                    "num_warps": getattr(md, "num_warps", None),
                    "num_stages": getattr(md, "num_stages", None),
                    "shared_bytes": getattr(md, "shared", None),
                    "constants": {str(k): _plain(v) for k, v in dict(consts).items()},
                }
            )
    return out


# ---------------------------------------------------------------- one DMF step


def dmf_step(rec: Recorder, args, device: str) -> None:
    """Seconds per optimizer step and peak memory of a DMF step (bf16 autocast on CUDA) for each attention backend."""
    from flowmap_convert.kernels import backward_counts, use_backend

    from flowmap_convert.config import ModelConfig
    from flowmap_convert.finetuning.common import Calls, Context
    from flowmap_convert.finetuning.objectives import OBJECTIVE_FNS
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.model import FlowMap

    size = dict(num_blocks=2, hidden_size=64, num_heads=2, input_size=8) if args.tiny else {}
    cfg = ModelConfig(qk_norm="rms", **size)  # SiT-XL/2 shape (1152 wide, 28 blocks, 16 heads of 72, 256 tokens)
    depth = max(1, cfg.num_blocks * 2 // 3)
    cuda = device == "cuda"
    torch.manual_seed(0)
    model = FlowMap(cfg).with_depth(depth).to(device)  # built once (CPU init), every backend starts from it
    with torch.no_grad():  # random weights: adaLN-Zero gates at 0 would make attention's gradients all zero
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    # auto (the fused Triton JVP where it applies) against the math reference; SDPA has no forward-mode AD, and
    # triton alone would repeat auto's row
    for backend in ("auto", "math"):
        row = {"backend": backend, "batch": args.dmf_batch, "model": "tiny" if args.tiny else "SiT-XL/2 rms q-k norm"}
        try:
            with use_backend(backend):  # attention(..., backend=None) in the model uses it
                model.load_state_dict(init)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                ctx = Context(Calls(model), Recipe(), cfg.num_classes)
                shape = (args.dmf_batch, cfg.in_channels, cfg.input_size, cfg.input_size)
                autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
                counts = backward_counts()
                times = []
                for i in range(1 + args.dmf_steps):
                    if cuda:
                        torch.cuda.synchronize()
                        if i == 1:
                            torch.cuda.reset_peak_memory_stats()
                    t0 = time.time()
                    gen = torch.Generator().manual_seed(i)
                    x0 = torch.randn(shape, generator=gen).to(device)
                    y = torch.randint(0, cfg.num_classes, (args.dmf_batch,), generator=gen).to(device)
                    with autocast:
                        loss, metrics = OBJECTIVE_FNS["dmf"](ctx, x0, y, gen)
                    loss.float().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()
                    if i > 0:
                        times.append(time.time() - t0)
                after = backward_counts()
                row.update(
                    seconds_per_step=statistics.median(times),
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                    loss=loss.item(),
                    dudt_rms=metrics.get("dudt"),
                    fused_backwards={k: after[k] - counts[k] for k in after},
                    ok=math.isfinite(loss.item()),
                )
        except Exception as e:
            row.update(ok=False, error=repr(e)[:400])
        finally:
            opt = ctx = None
            if cuda:
                torch.cuda.empty_cache()
        rec.add(row)
    rec.finish()


# ---------------------------------------------------------------- table


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def table(directory: str, results: str) -> str:
    """Markdown from the step JSONs in `directory`, written to results/attention-<device>.md; returns the path."""

    def load(step):
        p = os.path.join(directory, f"{step}.json")
        return json.load(open(p)) if os.path.exists(p) else None

    env = load("env") or {"meta": {}}
    meta = env["meta"]
    device = meta.get("device", "unknown")
    lines = [f"# attention forward + JVP on {device}", ""]
    lines.append(
        f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, triton {meta.get('triton')}, {meta.get('date')}."
    )
    log = os.path.join(directory, "log.txt")  # gpu_check.sh's log: the pytest summary line of its pytest-gpu step
    if os.path.exists(log):
        text = open(log).read()
        part = text.split("== pytest-gpu", 1)[1].split("\n== ", 1)[0] if "== pytest-gpu" in text else ""
        summary = [ln for ln in part.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        lines += ["", f"`pytest -m gpu`: {summary[-1].strip() if summary else '(no summary line)'}"]
    steps = os.path.join(directory, "steps.jsonl")
    if os.path.exists(steps):
        rows = [json.loads(ln) for ln in open(steps) if ln.strip()]
        lines += ["", "Steps: " + ", ".join(f"{r['step']} rc={r['rc']} {r['seconds']}s" for r in rows) + "."]
    c = load("correctness")
    if c:
        lines += ["", "## Correctness (max |err| / max |ref| vs fp32, std-0.5 inputs)", ""]
        lines += [
            "| case | dtype | L | D | out | tangent | dq | dk | dv | backward | ok |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            e = r.get("rel_err", {})
            cells = [_fmt(e.get(n), ".1e") for n in ("out", "tangent", "dq", "dk", "dv")]
            if "error" in r:
                cells = [r["error"][:60]] + [""] * 4
            lines.append(
                f"| {r['case']} | {r.get('dtype', '')} | {r.get('L', '')} | {r.get('D', '')} | {' | '.join(cells)} | "
                f"{r.get('backward', '')} | {'yes' if r.get('ok') else 'NO'} |"
            )
        if not c.get("done"):
            lines.append("\n(correctness step did not finish: timed out)")
    t = load("timing")
    if t:
        lines += ["", "## Timings (bf16, ms median by triton.testing.do_bench, TFLOP/s in brackets; extra MiB)", ""]
        cols = ("flash_fwd", "cudnn_fwd", "fused", "flash_fwd_bwd", "cudnn_fwd_bwd", "jvp_bwd", "math_jvp")
        lines += [
            "| B | H | N | D | flash fwd | cuDNN fwd | fused fwd+JVP | flash fwd+bwd | cuDNN fwd+bwd | jvp+bwd | math JVP "
            "| fused MiB | math MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["rows"]:

            def ms(k, r=r):
                c = r.get(k, {})
                if "error" in c:
                    return c["error"][:20]
                return f"{_fmt(c.get('ms'))} ({_fmt(c.get('tflops'), '.0f')})" if c else "-"

            lines.append(
                f"| {r.get('B', '-')} | {r.get('H', '-')} | {r['N']} | {r['D']} | {' | '.join(ms(k) for k in cols)} | "
                f"{_fmt(r['fused'].get('extra_mib'), '.1f')} | {_fmt(r['math_jvp'].get('extra_mib'), '.1f')} |"
            )
        lines += ["", "| gate | value | target | pass |", "|---|---|---|---|"]
        for g in t.get("gates") or gates(t["rows"]):
            lines.append(f"| {g['gate']} | {g['value']:.3g} | {g['target']} | {'yes' if g['pass'] else 'NO'} |")
        tune = t.get("autotune") or {}
        if tune.get("winners") or tune.get("compiled"):
            lines += ["", "## Triton autotune (winners per head dim and length bucket; compiled kernels)", ""]
            for w in tune.get("winners", []):
                lines.append(
                    f"- D {w['head_dim']}{' fp32' if w['fp32'] else ''}, key {w['key']}: {w['kwargs']}, "
                    f"{w['num_warps']} warps, {w['num_stages']} stages"
                )
            for c in tune.get("compiled", []):
                k = c.get("constants", {})
                lines.append(
                    f"- compiled HEAD_DIM {k.get('HEAD_DIM', '?')} BLOCK_M {k.get('BLOCK_M', '?')} "
                    f"BLOCK_N {k.get('BLOCK_N', '?')}: {c.get('n_regs')} registers, {c.get('n_spills')} spills, "
                    f"{c.get('num_warps')} warps, {c.get('num_stages')} stages"
                )
    d = load("dmf-step")
    if d:
        lines += [
            "",
            "## One DMF step (bf16 autocast, AdamW)",
            "",
            "| backend | model | batch | s / step | peak GiB | backward (fused path) | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(
                f"| {r['backend']} | {r.get('model')} | {r.get('batch')} | {_fmt(r.get('seconds_per_step'))} | "
                f"{_fmt(r.get('peak_gib'), '.1f')} | {r.get('fused_backwards', r.get('error', '')[:60])} | {'yes' if r.get('ok') else 'NO'} |"
            )
    path = os.path.join(results, f"attention-{device_slug(device)}.md")
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    directory = out_dir(args)
    if args.step == "table":
        print(f"wrote {table(directory, args.results)}")
        return 0
    if args.step == "env":
        Recorder(directory, "env", env_info()).finish()
        print(json.dumps(env_info()))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not (args.step == "dmf-step" and args.tiny):
        print(
            f"attention_jvp {args.step} needs a CUDA GPU (torch.cuda.is_available() is False); run it on an H100/H200.",
            file=sys.stderr,
        )
        return 2
    rec = Recorder(directory, args.step, env_info())
    if args.step == "correctness":
        correctness(rec)
    elif args.step == "timing":
        timing(rec, args)
    else:
        dmf_step(rec, args, "cuda" if cuda else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
