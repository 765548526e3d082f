"""Attention for (B, H, L, D) tensors with a forward-mode derivative on every backend.

Backends
--------
``math``    explicit softmax(scale Q K^T) V with fp32 accumulation; differentiable in
            every mode (forward AD, torch.func.jvp, double backward) but stores the
            L x L scores, so it is for the CPU and for references.
``sdpa``    torch.nn.functional.scaled_dot_product_attention; the fastest plain
            forward/backward, but its fused kernels have no forward-mode rule.
``triton``  with a forward-mode tangent (torch.func.jvp, forward_ad): the fused Triton
            kernel of ``triton_jvp.py`` computes O, dO and the log-sum-exp in one pass
            over K/V (6 L x L x D matmul units, 3x a flash forward: the floor); the
            backward is flash attention's backward on the saved O and log-sum-exp, no
            recompute (5 units: 11 per training step). Without a tangent it is plain
            SDPA / flash, forward and backward, untouched.
``auto``    ``triton`` on CUDA for fp16 / bf16 / fp32, ``math`` elsewhere (CPU SDPA has
            no forward-mode AD).

Mixed dtypes: q-k norms (RMSNorm with an fp32 scale, LayerNorm under autocast) hand q
and k over in fp32 while v is bf16. Every backend first casts q, k, v (and with them
their tangents) to one compute dtype: the autocast dtype when autocast is on for the
device (what SDPA itself does under autocast), else the promoted dtype; the output (and
tangent) come out in that dtype.

Stop-gradient contract of the triton backend: the tangent it returns carries no
gradient (it is produced outside autograd). Every MeanFlow-family objective uses
the tangent only inside a stop-gradient target (``dudt.detach()``), so nothing is
lost; the gradient of the primal output is exact. Use ``math`` if you ever need to
differentiate through the tangent itself.
"""

import contextlib
import contextvars
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD

BACKENDS = ("auto", "triton", "sdpa", "math")
_ENV_VAR = "FLOWMAP_ATTENTION"
_BACKWARD_ENV = "FLOWMAP_ATTENTION_BACKWARD"  # auto (flash where it applies, else math) or math
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_backend(name: str) -> str:
    """Return a valid backend name or raise a ValueError naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


# The backend of ``attention(..., backend=None)``: the process default comes from FLOWMAP_ATTENTION (read once, at
# import); ``use_backend`` changes it for one scope (a context variable: other threads and the code after the scope
# keep theirs).
_ENV_BACKEND: str = _check_backend(os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto")
_default_backend = contextvars.ContextVar("flowmap_attention_backend", default=_ENV_BACKEND)


@contextlib.contextmanager
def use_backend(name: str):
    """Within the ``with`` block, ``attention`` called with ``backend=None`` uses ``name`` (the trainer's knob);
    on leaving it the previous default is back, also when the block raised."""
    token = _default_backend.set(_check_backend(name))
    try:
        yield name
    finally:
        _default_backend.reset(token)


def get_default_backend() -> str:
    """The backend ``attention`` uses when none is passed (FLOWMAP_ATTENTION or 'auto', unless ``use_backend``)."""
    return _default_backend.get()


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel module imports (triton is installed)."""
    try:
        # lazy: triton_jvp imports triton (optional; TRITON_INTERPRET is read when it is first imported)
        from . import triton_jvp  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """Whether triton runs in its CPU interpreter in this process (fixed when triton is first imported)."""
    # lazy: triton_jvp imports triton (optional; TRITON_INTERPRET is read when it is first imported)
    from .triton_jvp import interpreting

    return interpreting()


def resolve_backend(
    backend: str | None = None,
    device: torch.device | str = "cpu",
    has_tangent: bool = False,
    dtype: torch.dtype | None = None,
) -> str:
    """The concrete implementation ('triton', 'sdpa' or 'math') that computes a call.

    For ``triton`` and ``auto`` on CUDA the answer depends on whether a forward-mode
    tangent is present: with one the fused Triton kernel runs, without one plain SDPA.
    ``auto`` with a dtype the kernel does not take (float64) is ``math``.
    """
    name = _check_backend(backend or _default_backend.get())
    device = torch.device(device)
    if name == "auto":
        kernel_ok = dtype is None or dtype in _KERNEL_DTYPES
        if device.type != "cuda" or not triton_available() or not kernel_ok:
            return "math"
        name = "triton"
    if name == "triton":
        return "triton" if has_tangent else "sdpa"
    return name


def describe(backend: str | None = None, device: torch.device | str | None = None) -> str:
    """One line for --dry-run logs saying which implementation runs, with and without a tangent."""
    name = _check_backend(backend or _default_backend.get())
    if device is None and name in ("math", "sdpa"):
        return f"attention[{name}]: {name}"
    if device is None and name == "triton":
        return "attention[triton]: triton-jvp (tangent) / sdpa (no tangent)"
    devices = [torch.device(device)] if device is not None else [torch.device("cuda"), torch.device("cpu")]
    parts = []
    for dev in devices:
        with_t = resolve_backend(name, dev, has_tangent=True)
        without_t = resolve_backend(name, dev, has_tangent=False)
        where = "CUDA" if dev.type == "cuda" else dev.type.upper()
        if with_t == without_t:
            parts.append(f"{_label(with_t)} ({where})")
        else:
            parts.append(f"{_label(with_t)} ({where}, tangent) / {_label(without_t)} ({where}, no tangent)")
    return f"attention[{name}]: " + " / ".join(parts)


def _label(impl: str) -> str:
    """Log label of an implementation."""
    return "triton-jvp" if impl == "triton" else impl


# ---------------------------------------------------------------- dtypes


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The one dtype attention computes in: the autocast dtype when autocast is on (fp64 stays), else promoted."""
    dev = xs[0].device.type
    autocast = dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev)
    target = torch.get_autocast_dtype(dev) if autocast else None
    dtypes = [target if target is not None and x.dtype != torch.float64 else x.dtype for x in xs]
    return functools.reduce(torch.promote_types, dtypes)


def _to_common_dtype(q, k, v):
    """q, k, v cast (differentiably, so tangents follow) to ``compute_dtype``; no copy when already there."""
    dtype = compute_dtype(q, k, v)
    return tuple(x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))


# ---------------------------------------------------------------- math and sdpa


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale Q K^T) V with fp32 (or fp64) accumulation; any-mode differentiable reference."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # S = scale Q K^T
    p = torch.softmax(s, dim=-1)  # P = softmax_j(S)
    return torch.matmul(p, v.to(acc)).to(q.dtype)  # O = P V


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """PyTorch SDPA (flash / memory-efficient on CUDA); no forward-mode AD through its fused kernels."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# ---------------------------------------------------------------- backward on the saved O and LSE

_BACKWARD_USED = {"flash": 0, "math": 0}


def backward_counts() -> dict:
    """How many fused-path backwards ran on flash attention's kernel and on the math fallback (diagnostics)."""
    return dict(_BACKWARD_USED)


def _flash_backward(do, q, k, v, o, lse, scale):
    """PyTorch's flash-attention backward on our O and LSE; None where it does not apply or refuses."""
    D = q.shape[-1]
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256):
        return None
    try:
        no_rng = torch.empty((), dtype=torch.int64)  # philox seed / offset, unread without dropout
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, None, None, q.shape[2], k.shape[2], 0.0, False, no_rng, no_rng, scale=scale
        )
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return grads


def math_backward(do, q, k, v, o, lse, scale, chunk_elements: int = 1 << 24):
    """dQ, dK, dV from the saved O and LSE, P = exp(S - LSE) rebuilt a block of query rows at a time.

    dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q.
    No softmax normalisation is recomputed; the scores live one row block at a time.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, of, dof = (x.to(acc) for x in (q, k, v, o, do))
    B, H, L_Q, _ = q.shape
    L_K = k.shape[2]
    dq = torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    if L_K > 0:
        delta = (dof * of).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        rows = max(1, chunk_elements // max(1, B * H * L_K))
        for i in range(0, L_Q, rows):
            sl = slice(i, i + rows)
            p = torch.exp(torch.matmul(qf[:, :, sl], kf.transpose(-2, -1)) * scale - lse[:, :, sl, None].to(acc))
            dv += torch.matmul(p.transpose(-2, -1), dof[:, :, sl])
            ds = p * (torch.matmul(dof[:, :, sl], vf.transpose(-2, -1)) - delta[:, :, sl])
            dq[:, :, sl] = torch.matmul(ds, kf) * scale
            dk += torch.matmul(ds.transpose(-2, -1), qf[:, :, sl]) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-12)


@functools.cache
def flash_backward_verified(dtype: torch.dtype, head_dim: int, device_index: int) -> bool:
    """Once per (dtype, D, device): flash's backward, fed an O and natural-log LSE as the fused kernel writes
    them, agrees with ``math_backward`` on a small problem. False (with one warning) sends backwards to the
    math fallback instead of training on wrong gradients."""
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = ((0.5 * torch.randn(1, 2, 48, head_dim, device=dev, generator=g)).to(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(head_dim)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.softmax(s, dim=-1), v.float()).to(dtype)
    got = _flash_backward(do, q, k, v, o, lse, scale)
    if got is None:
        return False
    want = math_backward(do, q, k, v, o, lse, scale)
    errs = [_max_rel_err(a, b) for a, b in zip(got, want)]
    if max(errs) <= 5e-2:
        return True
    warnings.warn(
        f"flash-attention's backward disagrees with the saved-LSE math backward for {dtype}, D={head_dim} "
        f"(max relative error {max(errs):.2g}); the fused attention path uses the slower math backward.",
        stacklevel=2,
    )
    return False


def attention_backward(do, q, k, v, o, lse, scale):
    """Flash attention's backward where it applies (CUDA, fp16 / bf16, D % 8 == 0, verified once), else math."""
    mode = os.environ.get(_BACKWARD_ENV, "auto").strip().lower()
    if mode != "math" and q.is_cuda and flash_backward_verified(q.dtype, q.shape[-1], q.device.index or 0):
        grads = _flash_backward(do, q, k, v, o, lse, scale)
        if grads is not None:
            _BACKWARD_USED["flash"] += 1
            return grads
    _BACKWARD_USED["math"] += 1
    with torch.autocast(q.device.type, enabled=False):
        return math_backward(do, q, k, v, o, lse, scale)


# ---------------------------------------------------------------- the fused autograd function

# Dispatch keys through which torch.func wraps every tensor op, factories included.
_FUNCTORCH_KEYS = torch._C.DispatchKeySet(
    torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode
) | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerBackMode)


def _plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """Strip torch.func wrappers (they have no storage a Triton kernel could read); the data is shared."""
    while x is not None and torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _tangent(x: torch.Tensor) -> torch.Tensor | None:
    """The forward-mode tangent x carries (torch.func.jvp or forward_ad), or None."""
    return fwAD.unpack_dual(x).tangent


class _Stash:
    """Carries the tangent computed in forward over to jvp (autograd.Function's forward cannot return it aside)."""

    tangent = None


class FusedAttentionJVP(torch.autograd.Function):
    """Forward = the one-pass Triton kernel (O, dO, LSE); jvp hands back its dO; backward = flash on O and LSE.

    The input tangents come in as extra (non-differentiated) arguments so that the single
    forward pass can compute dO; the tangent output is stop-gradient.
    """

    @staticmethod
    def forward(q, k, v, tq, tk, tv, scale, stash):
        # lazy: triton_jvp imports triton (optional; TRITON_INTERPRET is read when it is first imported)
        from .triton_jvp import attention_fwd_jvp

        with torch.no_grad(), torch._C._ExcludeDispatchKeyGuard(_FUNCTORCH_KEYS):
            o, t, lse = attention_fwd_jvp(*(_plain(x) for x in (q, k, v, tq, tk, tv)), scale=scale)
        stash.tangent, stash.lse = t, lse
        return o

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _tq, _tk, _tv, scale, stash = inputs
        ctx.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        ctx.stash = stash
        ctx.save_for_backward(q, k, v, output)

    @staticmethod
    def jvp(ctx, *_tangents):
        t, ctx.stash.tangent = ctx.stash.tangent, None
        return t

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o = (_plain(x) for x in ctx.saved_tensors)
        dq, dk, dv = attention_backward(_plain(grad_o).contiguous(), q, k, v, o, ctx.stash.lse, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention of (B, H, L, D) tensors; backend None uses the default (see ``use_backend``).

    Works under torch.func.jvp and torch.autograd.forward_ad on every backend but
    'sdpa'. With 'triton' (and 'auto' on CUDA) the tangent is stop-gradient; see the
    module docstring. q, k, v of different dtypes are first cast to ``compute_dtype``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, H, L, D) tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    q, k, v = _to_common_dtype(q, k, v)
    tangents = tuple(_tangent(x) for x in (q, k, v))
    has_tangent = any(t is not None for t in tangents)
    name = _check_backend(backend or _default_backend.get())
    if name == "auto":
        name = resolve_backend(name, q.device, has_tangent=True, dtype=q.dtype)
    if name == "math":
        return math_attention(q, k, v, scale)
    if name == "sdpa" or not has_tangent:  # triton without a tangent: plain SDPA / flash, backward included
        return sdpa_attention(q, k, v, scale)
    if not triton_available():
        raise RuntimeError("attention backend 'triton' needs the triton package; install it or use backend='math'.")
    if not q.is_cuda and not _interpreting():
        # lazy: triton_jvp imports triton (optional; TRITON_INTERPRET is read when it is first imported)
        from .triton_jvp import check_triton_usable

        check_triton_usable(q.device)  # raises, naming TRITON_INTERPRET
    return FusedAttentionJVP.apply(q, k, v, *tangents, scale, _Stash())
