"""Attention backends and the fused Triton JVP kernel against a float64 torch.func.jvp reference.

Triton (3.x) fixes interpreter-vs-compiled when it is first imported: the jitted
helpers of ``triton.language`` (tl.sum, tl.max, ...) are built then from env
TRITON_INTERPRET. So on a machine without CUDA this module sets the variable before
anything imports triton, and the kernel tests run in the interpreter on CPU tensors;
with CUDA they run the compiled kernel on the GPU instead (same assertions).
"""

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (see above)
os.environ.setdefault("FLOWMAP_TRITON_AUTOTUNE", "0")  # one fixed config on CUDA; the bf16 test re-enables it

import pytest  # noqa: E402
from flowmap_convert.kernels import (
    attention,
    describe,
    get_default_backend,
    math_attention,
    resolve_backend,
    triton_available,
    use_backend,
)
from torch.autograd import forward_ad as fwAD  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _kernel_device():
    """Where the Triton kernel can run in this process: 'cpu' (interpreter), 'cuda', or None."""
    if not triton_available():
        return None
    from flowmap_convert.kernels.triton_jvp import interpreting

    if interpreting():
        return "cpu"
    return "cuda" if HAS_CUDA else None


KERNEL_DEVICE = _kernel_device()
needs_triton = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="triton missing, or imported without TRITON_INTERPRET=1 on a machine without CUDA"
)

# (atol, rtol) for outputs/tangents and for input gradients, per input dtype
TOL = {
    torch.float32: ((2e-5, 1e-4), (2e-5, 1e-4)),
    torch.float16: ((3e-3, 3e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((2e-2, 2e-2), (5e-2, 5e-2)),
}


def reference_attention(q, k, v, scale=None):
    """Plain float64 softmax(scale Q K^T) V."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def make_inputs(dtype, L, D, B=1, H=2, L_K=None, device="cpu", seed=0):
    """Primals and tangents in `dtype`, plus their float64 copies (same rounded values)."""
    g = torch.Generator().manual_seed(seed)
    L_K = L if L_K is None else L_K
    shapes = [(B, H, L, D), (B, H, L_K, D), (B, H, L_K, D)] * 2
    xs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    return [x.to(device) for x in xs], [x.double() for x in xs]


def reference_meanflow(ref, w_o, w_t, scale=None):
    """Float64 output, tangent and q/k/v gradients of loss = <o, w_o> + <stopgrad(do), w_t>."""
    q, k, v = (x.clone().requires_grad_() for x in ref[:3])
    o, t = torch.func.jvp(lambda a, b, c: reference_attention(a, b, c, scale), (q, k, v), tuple(ref[3:]))
    ((o * w_o).sum() + (t.detach() * w_t).sum()).backward()
    return o.detach(), t.detach(), q.grad, k.grad, v.grad


def run_meanflow(backend, xs, w_o, w_t, scale=None):
    """The trainer's pattern: u, dudt = torch.func.jvp(f, ...); loss uses u with grad and dudt.detach()."""
    q, k, v = (x.detach().clone().requires_grad_() for x in xs[:3])
    o, t = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend=backend, scale=scale), (q, k, v), tuple(xs[3:]))
    ((o.double() * w_o).sum() + (t.detach().double() * w_t).sum()).backward()
    return o, t, q.grad, k.grad, v.grad


def assert_matches(got, want, dtype):
    """Compare output, tangent, then the three gradients, with the dtype's tolerances."""
    (a1, r1), (a2, r2) = TOL[dtype]
    names = ["output", "tangent", "grad q", "grad k", "grad v"]
    for i, (g, w) in enumerate(zip(got, want)):
        atol, rtol = (a1, r1) if i < 2 else (a2, r2)
        torch.testing.assert_close(g.double().cpu(), w, atol=atol, rtol=rtol, msg=lambda m, i=i: f"{names[i]}: {m}")


# ---------------------------------------------------------------- fused kernel


def _lse_reference(ref, scale=None):
    scale = 1.0 / math.sqrt(ref[0].shape[-1]) if scale is None else scale
    return torch.logsumexp((ref[0] @ ref[1].transpose(-2, -1)) * scale, dim=-1)


@needs_triton
@pytest.mark.parametrize(
    "dtype, D, L",
    [
        (torch.float32, 72, 65),  # two head-dim tiles (64 + 16, 8 lanes masked), three key blocks
        (torch.float16, 72, 7),
        (torch.float16, 64, 33),  # one tile, a partial second key block
        (torch.float32, 8, 1),  # D < 16 (one masked tile), a single row
        (torch.float32, 96, 17),  # 64 + 32, no mask
        (torch.float16, 20, 9),  # strides of 20: not multiples of 8, so passed as they are (STRIDE_UNIT = 1)
    ],
)
def test_fused_kernel_output_tangent_and_lse(dtype, D, L):
    """The one-pass kernel's O, dO and log-sum-exp match float64 for odd lengths and split / padded head dims."""
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    xs, ref = make_inputs(dtype, L, D, device=KERNEL_DEVICE)
    want = torch.func.jvp(reference_attention, tuple(ref[:3]), tuple(ref[3:]))
    o, t, lse = attention_fwd_jvp(*xs)
    assert o.dtype == dtype and t.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (1, 2, L)
    assert_matches((o, t), want, dtype)
    torch.testing.assert_close(lse.double().cpu(), _lse_reference(ref), atol=1e-4, rtol=1e-4)


@needs_triton
def test_fused_kernel_cross_lengths_scale_and_strides():
    """L_Q != L_K, a large softmax scale (forces rescaling across key blocks), non-contiguous inputs, B*H = 6."""
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    xs, ref = make_inputs(torch.float32, 19, 72, B=2, H=3, L_K=70, device=KERNEL_DEVICE)
    # (B, L, H, D) storage viewed as (B, H, L, D), as models produce it after splitting heads
    xs = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in xs]
    assert not xs[0].is_contiguous()
    scale = 1.0  # logits with std ~8.5: the running max moves across key blocks
    want = torch.func.jvp(lambda a, b, c: reference_attention(a, b, c, scale), tuple(ref[:3]), tuple(ref[3:]))
    o, t, lse = attention_fwd_jvp(*xs, scale=scale)
    assert_matches((o, t), want, torch.float32)
    torch.testing.assert_close(lse.double().cpu(), _lse_reference(ref, scale), atol=1e-4, rtol=1e-4)


@needs_triton
def test_fused_kernel_missing_tangents_are_zero():
    """None for a tangent means zero, as forward-mode AD passes it for inputs without one."""
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    xs, ref = make_inputs(torch.float32, 33, 64, device=KERNEL_DEVICE)
    zero = torch.zeros_like(ref[0])
    want = torch.func.jvp(reference_attention, tuple(ref[:3]), (zero, ref[4], zero))
    got = attention_fwd_jvp(xs[0], xs[1], xs[2], None, xs[4], None)[:2]
    assert_matches(got, want, torch.float32)


@needs_triton
def test_fused_kernel_centres_p_ds():
    """A softmax-invariant shift of dS (the same for every key) leaves the fp16 tangent accurate.

    tangent-k = tk + u for one vector u adds q_i . u to every dS_ij of row i: dO does not
    change, but an uncentred (P * dS) V accumulated in fp16 would carry an error ~ |q . u| * 2^-11.
    """
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    xs, ref = make_inputs(torch.float16, 96, 64, device=KERNEL_DEVICE)
    shifted = (ref[4] + 16.0).to(torch.float16)  # u = 16 * ones: shifts q . u / 8 ~ N(0, 16^2)
    want = torch.func.jvp(reference_attention, tuple(ref[:3]), (ref[3], shifted.double(), ref[5]))
    o, t, _ = attention_fwd_jvp(*xs[:4], shifted.to(KERNEL_DEVICE), xs[5])
    assert_matches((o, t), want, torch.float16)
    # measured in the interpreter: 4.8e-4 centred, 8.2e-3 with P * dS accumulated uncentred
    assert (t.double().cpu() - want[1]).abs().max().item() < 1.5e-3


@needs_triton
def test_fused_kernel_no_keys_gives_zeros():
    """L_K = 0: output 0 (as SDPA), tangent 0, log-sum-exp -inf; the attention backend agrees, gradients 0."""
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    xs, _ = make_inputs(torch.float32, 5, 16, L_K=0, device=KERNEL_DEVICE)
    o, t, lse = attention_fwd_jvp(*xs)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(t, torch.zeros_like(t))
    assert torch.isneginf(lse).all()
    q, k, v = (x.clone().requires_grad_() for x in xs[:3])
    o2, t2 = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="triton"), (q, k, v), tuple(xs[3:]))
    assert torch.equal(o2, torch.nn.functional.scaled_dot_product_attention(*xs[:3]))
    o2.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(t2, torch.zeros_like(t2))


# ---------------------------------------------------------------- triton backend (autograd function)


@needs_triton
@pytest.mark.parametrize("dtype, D, L", [(torch.float32, 72, 65), (torch.float16, 72, 33), (torch.float16, 64, 7)])
def test_triton_backend_meanflow_pattern(dtype, D, L):
    """torch.func.jvp through the triton backend, then backward: output, tangent and q/k/v grads are exact."""
    xs, ref = make_inputs(dtype, L, D, device=KERNEL_DEVICE)
    g = torch.Generator().manual_seed(1)
    w_o, w_t = (torch.randn(ref[0].shape, generator=g, dtype=torch.float64) for _ in range(2))
    got = run_meanflow("triton", xs, w_o.to(KERNEL_DEVICE), w_t.to(KERNEL_DEVICE))
    assert got[1].requires_grad is False  # the tangent is stop-gradient by construction
    assert_matches(got, reference_meanflow(ref, w_o, w_t), dtype)


@needs_triton
def test_triton_backend_forward_ad_custom_scale_and_partial_tangent():
    """torch.autograd.forward_ad works too, with an overridden scale and a tangent on k only."""
    xs, ref = make_inputs(torch.float32, 33, 72, device=KERNEL_DEVICE)
    scale = 0.3
    with fwAD.dual_level():
        o = attention(xs[0], fwAD.make_dual(xs[1], xs[4]), xs[2], backend="triton", scale=scale)
        primal, tangent = fwAD.unpack_dual(o)
    want = torch.func.jvp(lambda b: reference_attention(ref[0], b, ref[2], scale), (ref[1],), (ref[4],))
    assert_matches((primal, tangent), want, torch.float32)


@needs_triton
def test_jvp_runs_the_fused_kernel_once_and_backward_does_not_recompute(monkeypatch):
    """Under jvp: one fused launch computes O and dO (no SDPA forward); the backward reads the saved O and LSE."""
    from flowmap_convert.kernels import triton_jvp

    attn_mod = sys.modules["flowmap_convert.kernels.attention"]  # the package re-exports the function's name
    calls = {"fused": 0}
    real = triton_jvp.attention_fwd_jvp

    def counting(*a, **kw):
        calls["fused"] += 1
        return real(*a, **kw)

    def no_sdpa(*a, **kw):
        raise AssertionError("SDPA ran on the fused path")

    monkeypatch.setattr(triton_jvp, "attention_fwd_jvp", counting)
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", no_sdpa)
    xs, _ = make_inputs(torch.float32, 9, 16, device=KERNEL_DEVICE)
    q, k, v = (x.clone().requires_grad_() for x in xs[:3])
    before = attn_mod.backward_counts()
    o, _ = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="triton"), (q, k, v), tuple(xs[3:]))
    o.sum().backward()
    after = attn_mod.backward_counts()
    assert calls["fused"] == 1 and q.grad is not None
    assert sum(after.values()) == sum(before.values()) + 1  # one backward on the saved LSE, no forward rerun


@needs_triton
def test_triton_backend_plain_forward_is_sdpa(monkeypatch):
    """Without a tangent the triton backend is exactly SDPA, forward and backward (no kernel launch)."""
    from flowmap_convert.kernels import triton_jvp

    monkeypatch.setattr(triton_jvp, "attention_fwd_jvp", None)  # any launch would fail
    xs, _ = make_inputs(torch.float32, 33, 64, device=KERNEL_DEVICE)
    q = xs[0].clone().requires_grad_()
    got = attention(q, *xs[1:3], backend="triton")
    want = torch.nn.functional.scaled_dot_product_attention(*xs[:3])
    assert torch.equal(got, want)
    assert got.grad_fn is not None and "Attention" in type(got.grad_fn).__name__
    assert "Fused" not in type(got.grad_fn).__name__


@pytest.mark.e2e  # starts a Python child process
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_without_cuda_or_interpreter_is_a_clear_error():
    """Forcing triton on CPU tensors in a process where triton is not interpreting names the fix."""
    code = (
        "import torch; from flowmap_convert.kernels import attention; x = torch.randn(1, 1, 7, 64); "
        "torch.func.jvp(lambda a: attention(a, x, x, backend='triton'), (x,), (x,))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "RuntimeError: attention backend 'triton' needs CUDA tensors (got cpu)" in out.stderr
    assert "TRITON_INTERPRET=1" in out.stderr


@needs_triton
@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="interpreter-only limitation")
def test_interpreter_refuses_bf16():
    """The interpreter has no bf16 tl.dot: a clear error instead of wrong numbers."""
    xs, _ = make_inputs(torch.bfloat16, 7, 64)
    with pytest.raises(RuntimeError, match="no bf16 tl.dot"):
        torch.func.jvp(lambda a: attention(a, xs[1], xs[2], backend="triton"), (xs[0],), (xs[3],))


# ---------------------------------------------------------------- math and sdpa backends


@pytest.mark.parametrize("mode", ["func", "forward_ad"])
def test_math_backend_jvp(mode):
    """The math backend differentiates forward-mode both ways and keeps the input dtype."""
    xs, ref = make_inputs(torch.float32, 33, 72)
    want = torch.func.jvp(reference_attention, tuple(ref[:3]), tuple(ref[3:]))
    if mode == "func":
        got = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="math"), tuple(xs[:3]), tuple(xs[3:]))
    else:
        with fwAD.dual_level():
            o = attention(*(fwAD.make_dual(p, t) for p, t in zip(xs[:3], xs[3:])), backend="math")
            got = fwAD.unpack_dual(o)
    assert got[0].dtype == torch.float32
    assert_matches(got, want, torch.float32)


def test_math_backend_meanflow_pattern_and_half_dtype():
    """math: the MeanFlow pattern's gradients are exact; fp16 inputs give fp16 outputs from fp32 accumulation."""
    xs, ref = make_inputs(torch.float32, 65, 64)
    g = torch.Generator().manual_seed(2)
    w_o, w_t = (
        torch.randn(ref[0].shape, generator=g, dtype=torch.float64),
        torch.randn(ref[0].shape, generator=g, dtype=torch.float64),
    )
    assert_matches(run_meanflow("math", xs, w_o, w_t), reference_meanflow(ref, w_o, w_t), torch.float32)
    half, ref_half = make_inputs(torch.float16, 65, 64)
    o = attention(*half[:3], backend="math")
    assert o.dtype == torch.float16
    torch.testing.assert_close(o.double(), reference_attention(*ref_half[:3]), atol=2e-3, rtol=2e-3)


def test_math_backward_from_saved_lse_matches_autograd():
    """The LSE-based backward (several row blocks) gives autograd's q/k/v gradients of softmax attention."""
    from flowmap_convert.kernels import math_backward

    _, ref = make_inputs(torch.float64, 13, 24, B=2, H=2, L_K=21)
    q, k, v = (x.clone().requires_grad_() for x in ref[:3])
    o = reference_attention(q, k, v, 0.4)
    do = ref[3]
    (o * do).sum().backward()
    lse = _lse_reference(ref, 0.4)
    got = math_backward(do, *ref[:3], o.detach(), lse, 0.4, chunk_elements=2 * 2 * 21 * 5)  # 5 rows per block
    for g, w in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_sdpa_backend_gradients_match():
    """sdpa: output and q/k/v gradients equal the float64 reference."""
    xs, ref = make_inputs(torch.float32, 33, 72)
    w = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, k, v = (x.clone().requires_grad_() for x in xs[:3])
    o = attention(q, k, v, backend="sdpa", scale=0.2)
    (o.double() * w).sum().backward()
    rq, rk, rv = (x.clone().requires_grad_() for x in ref[:3])
    ro = reference_attention(rq, rk, rv, 0.2)
    (ro * w).sum().backward()
    assert_matches((o, o, q.grad, k.grad, v.grad), (ro.detach(), ro.detach(), rq.grad, rk.grad, rv.grad), torch.float32)


# ---------------------------------------------------------------- dispatch


def test_resolve_backend_choices():
    """auto: math on CPU; on CUDA triton-jvp with a tangent and plain SDPA without."""
    assert resolve_backend("auto", "cpu") == "math"
    assert resolve_backend("auto", "cpu", has_tangent=True) == "math"
    assert resolve_backend("math", "cuda", has_tangent=True) == "math"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("triton", "cuda", has_tangent=False) == "sdpa"
    if triton_available():
        assert resolve_backend("auto", "cuda", has_tangent=True) == "triton"
        assert resolve_backend("auto", "cuda", has_tangent=False) == "sdpa"
        assert resolve_backend("auto", "cuda", has_tangent=True, dtype=torch.bfloat16) == "triton"
        assert resolve_backend("auto", "cuda", has_tangent=True, dtype=torch.float64) == "math"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu")


def test_auto_on_cpu_is_math_and_differentiable():
    """auto on CPU computes the math backend's result, jvp included."""
    xs, _ = make_inputs(torch.float32, 7, 64)
    got = torch.func.jvp(lambda a, b, c: attention(a, b, c), tuple(xs[:3]), tuple(xs[3:]))
    want = torch.func.jvp(math_attention, tuple(xs[:3]), tuple(xs[3:]))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_use_backend_is_scoped_and_describe_names_the_implementations():
    """use_backend changes what backend=None does inside its block only (also when the block raises, and not in
    another thread); describe names the implementations."""
    import threading

    before = get_default_backend()
    xs, _ = make_inputs(torch.float32, 7, 64)
    with use_backend("sdpa"):
        assert get_default_backend() == "sdpa"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(get_default_backend()))
        worker.start()
        worker.join()
        assert seen == [before]  # another thread keeps the process default
        with pytest.raises(RuntimeError):  # CPU SDPA has no forward-mode rule: proves sdpa ran
            torch.func.jvp(lambda a: attention(a, xs[1], xs[2]), (xs[0],), (xs[3],))
        with use_backend("math"):
            assert get_default_backend() == "math"
        assert get_default_backend() == "sdpa"
    assert get_default_backend() == before
    with pytest.raises(KeyError), use_backend("math"):
        raise KeyError("x")
    assert get_default_backend() == before
    with pytest.raises(ValueError, match="choose one of auto, triton, sdpa, math"), use_backend("fast"):
        pass
    assert get_default_backend() == before
    if triton_available():
        assert describe("auto") == "attention[auto]: triton-jvp (CUDA, tangent) / sdpa (CUDA, no tangent) / math (CPU)"
    assert describe("auto", device="cpu") == "attention[auto]: math (CPU)"
    assert describe("math") == "attention[math]: math"
    assert (
        describe("triton", device="cuda") == "attention[triton]: triton-jvp (CUDA, tangent) / sdpa (CUDA, no tangent)"
    )


@pytest.mark.e2e  # starts a Python child process
def test_default_backend_from_environment():
    """FLOWMAP_ATTENTION sets the default at import; a bad value fails loudly (one subprocess for both)."""
    code = (
        "import importlib, os, sys; from flowmap_convert.kernels import get_default_backend as g; print(g()); "
        "os.environ['FLOWMAP_ATTENTION'] = 'bogus'; importlib.reload(sys.modules['flowmap_convert.kernels.attention'])"
    )
    env = dict(os.environ, FLOWMAP_ATTENTION="math")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "math"
    assert out.returncode != 0 and "unknown attention backend 'bogus'" in out.stderr


def test_bad_shapes_are_rejected():
    """Non-(B, H, L, D) inputs fail with the expected layout in the message."""
    x = torch.randn(2, 7, 64)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        attention(x, x, x)


def _load_benchmark():
    import importlib.util

    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "attention_jvp.py")
    spec = importlib.util.spec_from_file_location("attention_jvp_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA exit path")
def test_benchmark_exits_2_without_cuda(capsys, tmp_path):
    """benchmarks/attention_jvp.py's GPU steps end with one line on stderr and exit code 2 without a GPU."""
    bench = _load_benchmark()
    for step in ("correctness", "timing", "dmf-step"):
        assert bench.main([step, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "needs a CUDA GPU" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_benchmark_gates_and_table(tmp_path):
    """The gates compare fused / flash-forward time, jvp+bwd / flash fwd+bwd and memory; the table shows them."""
    bench = _load_benchmark()
    rows = [
        dict(N=1024, D=72, fused={"ms": 2.9, "extra_mib": 10.0}, flash_fwd={"ms": 1.0}, jvp_bwd={"ms": 5.0},
             flash_fwd_bwd={"ms": 3.0}, math_jvp={"ms": 9.0, "extra_mib": 200.0}),
        dict(N=4096, D=128, fused={"ms": 31.0, "extra_mib": 40.0}, flash_fwd={"ms": 10.0}, jvp_bwd={"ms": 40.0},
             flash_fwd_bwd={"ms": 30.0}, math_jvp={"error": "skipped"}),
    ]  # fmt: skip
    got = {g["gate"]: g["pass"] for g in bench.gates(rows)}
    assert got == {
        "fused fwd+JVP / flash fwd, N=1024 D=72": True,  # 2.9 <= 3.0
        "jvp+bwd / flash fwd+bwd, N=1024 D=72": False,  # 1.67 > 1.6
        "math-JVP / fused extra memory, N=1024 D=72": True,  # 20 >= 15
        "fused fwd+JVP / flash fwd, N=4096 D=128": False,  # 3.1
        "jvp+bwd / flash fwd+bwd, N=4096 D=128": True,  # 1.33
    }
    rec = bench.Recorder(str(tmp_path), "env", {"device": "NVIDIA H200", "torch": "x"})
    rec.finish()
    t = bench.Recorder(str(tmp_path), "timing")
    for r in rows:
        t.add(r)
    t.finish(gates=bench.gates(rows))
    path = bench.table(str(tmp_path), str(tmp_path / "results"))
    assert path.endswith("attention-nvidia-h200.md")
    text = open(path).read()
    assert (
        "| 1024 | 72 | 1.000 (-) | - | 2.900 (-) |" in text  # no cuDNN row measured, no TFLOP/s given
        and "| jvp+bwd / flash fwd+bwd, N=1024 D=72 | 1.67 | <= 1.6 | NO |" in text
    )
    dmf = dict(B=32, H=16, N=256, D=72, flash_fwd={"ms": 0.1, "tflops": 302.0}, cudnn_fwd={"ms": 0.09, "tflops": 336.0},
               fused={"ms": 0.3, "tflops": 302.0, "extra_mib": 1.0}, math_jvp={"error": "skipped"})  # fmt: skip
    t.add(dmf)
    t.finish(gates=bench.gates(rows + [dmf]))
    text = open(bench.table(str(tmp_path), str(tmp_path / "results"))).read()
    assert "| 32 | 16 | 256 | 72 | 0.100 (302) | 0.090 (336) | 0.300 (302) |" in text


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and triton_available()), reason="needs CUDA and triton")
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("L", [1, 65, 1024])
def test_cuda_bf16_meanflow_pattern(monkeypatch, D, L):
    """Compiled, autotuned kernel in bf16 on CUDA through backend auto; the backward runs flash's kernel."""
    attn_mod = sys.modules["flowmap_convert.kernels.attention"]
    monkeypatch.setenv("FLOWMAP_TRITON_AUTOTUNE", "1")
    xs, ref = make_inputs(torch.bfloat16, L, D, B=2, H=2, device="cuda")
    xs = [(x.float() * 0.5).to(torch.bfloat16) for x in xs]  # std-0.5 inputs
    ref = [x.cpu().double() for x in xs]
    g = torch.Generator().manual_seed(1)
    w_o, w_t = (torch.randn(ref[0].shape, generator=g, dtype=torch.float64) for _ in range(2))
    before = attn_mod.backward_counts()["flash"]
    got = run_meanflow("auto", xs, w_o.cuda(), w_t.cuda())
    assert got[1].dtype == torch.bfloat16 and got[1].requires_grad is False
    assert attn_mod.backward_counts()["flash"] == before + 1
    assert_matches(got, reference_meanflow(ref, w_o, w_t), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and triton_available()), reason="needs CUDA and triton")
def test_cuda_autocast_mixed_dtypes_and_many_heads():
    """bf16 autocast with fp32 q / k (q-k norm) and bf16 v; and B*H = 70000 > 65535 programs on one grid axis."""
    xs, _ = make_inputs(torch.float32, 65, 72, device="cuda")
    q, k = xs[0], xs[1]
    v, tv = xs[2].bfloat16(), xs[5].bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o, t = torch.func.jvp(lambda a, b, c: attention(a, b, c), (q, k, v), (xs[3], xs[4], tv))
        o_ref, t_ref = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend="math"), (q, k, v), (xs[3], xs[4], tv))
    assert o.dtype == t.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(t.float(), t_ref.float(), atol=5e-2, rtol=5e-2)
    from flowmap_convert.kernels.triton_jvp import attention_fwd_jvp

    big = [torch.randn(1, 70000, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
    o, _, _ = attention_fwd_jvp(*big)
    torch.testing.assert_close(o, math_attention(*big[:3]), atol=2e-2, rtol=2e-2)  # SDPA's grid caps heads
