"""Attention for (B, H, L, D) tensors with a forward-mode derivative on every backend.

Backends
--------
``math``    explicit softmax(scale Q K^T) V with fp32 accumulation; differentiable in
            every mode (forward AD, torch.func.jvp, double backward) but stores the
            L x L scores, so it is for the CPU and for references.
``sdpa``    torch.nn.functional.scaled_dot_product_attention; the fastest plain
            forward/backward, but its fused kernels have no forward-mode rule.
``triton``  the custom autograd function below: forward and backward are SDPA (or
            flash-attn), the forward-mode tangent comes from the fused Triton kernel
            in ``triton_jvp.py`` with memory linear in L.
``auto``    ``triton`` on CUDA (it costs nothing extra without a tangent: the forward
            *is* SDPA), ``math`` elsewhere, since CPU SDPA has no forward-mode AD.

Stop-gradient contract of the triton backend: the tangent it returns carries no
gradient (it is produced outside autograd). Every MeanFlow-family objective uses
the tangent only inside a stop-gradient target (``dudt.detach()``), so nothing is
lost; the gradient of the primal output is exact. Use ``math`` if you ever need to
differentiate through the tangent itself.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "math")
_ENV_VAR = "FLOWMAP_ATTENTION"


def _check_backend(name: str) -> str:
    """Return a valid backend name or raise a ValueError naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


_default_backend = _check_backend(os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto")


def set_default_backend(name: str) -> None:
    """Set the backend used when ``attention`` is called with ``backend=None`` (the trainer's knob)."""
    global _default_backend
    _default_backend = _check_backend(name)


def get_default_backend() -> str:
    """The backend ``attention`` uses when none is passed (initially env FLOWMAP_ATTENTION or 'auto')."""
    return _default_backend


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel module imports (triton is installed)."""
    try:
        from . import triton_jvp  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """Whether triton runs in its CPU interpreter in this process (fixed when triton is first imported)."""
    from .triton_jvp import interpreting

    return interpreting()


def resolve_backend(backend: str | None = None, device: torch.device | str = "cpu", has_tangent: bool = False) -> str:
    """The concrete implementation ('triton', 'sdpa' or 'math') that computes a call.

    For ``triton`` and ``auto`` on CUDA the answer depends on whether a forward-mode
    tangent is present: with one the Triton JVP kernel runs, without one only SDPA.
    """
    name = _check_backend(backend or _default_backend)
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "math"
        name = "triton" if triton_available() else "math"
        if name == "math":
            return "math"
    if name == "triton":
        return "triton" if has_tangent else "sdpa"
    return name


def describe(backend: str | None = None, device: torch.device | str | None = None) -> str:
    """One line for --dry-run logs saying which implementation runs, with and without a tangent."""
    name = _check_backend(backend or _default_backend)
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


def _flash_attn_func():
    """flash_attn.flash_attn_func if the optional flash-attn package imports, else None (lazy, cached)."""
    global _FLASH
    if _FLASH is _UNSET:
        try:
            from flash_attn import flash_attn_func
        except Exception:  # ImportError, or a broken CUDA build of flash-attn
            flash_attn_func = None
        _FLASH = flash_attn_func
    return _FLASH


_UNSET = object()
_FLASH = _UNSET


def _recompute_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Differentiable attention for the backward pass: flash-attn when installed and applicable, else SDPA."""
    flash = _flash_attn_func() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        # flash-attn wants (B, L, H, D)
        o = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return o.transpose(1, 2)
    return sdpa_attention(q, k, v, scale)


# Dispatch keys through which torch.func wraps every tensor op, factories included.
_FUNCTORCH_KEYS = torch._C.DispatchKeySet(
    torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode
) | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerBackMode)


def _plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """Strip torch.func wrappers (they have no storage a Triton kernel could read); the data is shared."""
    while x is not None and torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


class AttentionWithJVP(torch.autograd.Function):
    """SDPA forward/backward plus a fused Triton forward-mode rule; the tangent is stop-gradient."""

    @staticmethod
    def forward(q, k, v, scale):
        """Plain fast forward: exactly the SDPA call, so no tangent costs nothing."""
        return sdpa_attention(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        """Keep q, k, v for the backward recomputation and, with O, for the tangent kernel."""
        q, k, v, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale):
        """Output tangent from the Triton kernel, reusing the forward's O (skips one P V product)."""
        from .triton_jvp import attention_fwd_jvp

        q, k, v, o = (_plain(x) for x in ctx.saved_tensors)
        # Stop-gradient: the tangent is never differentiated. Functorch's layers are
        # switched off so the kernel's output buffers are plain tensors too.
        with torch.no_grad(), torch._C._ExcludeDispatchKeyGuard(_FUNCTORCH_KEYS):
            _, t = attention_fwd_jvp(q, k, v, _plain(tq), _plain(tk), _plain(tv), scale=ctx.scale, out=o)
        return t

    @staticmethod
    def backward(ctx, grad_o):
        """Exact primal gradients by recomputing the forward with a fast differentiable kernel."""
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            o = _recompute_forward(*leaves, ctx.scale)
            wanted = [x for x in leaves if x.requires_grad]
            grads = iter(torch.autograd.grad(o, wanted, grad_o) if wanted else ())
        return (*(next(grads) if x.requires_grad else None for x in leaves), None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention of (B, H, L, D) tensors; backend None uses the module default (see set_default_backend).

    Works under torch.func.jvp and torch.autograd.forward_ad on every backend but
    'sdpa'. With 'triton' (and 'auto' on CUDA) the tangent is stop-gradient; see the
    module docstring.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, H, L, D) tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    name = _check_backend(backend or _default_backend)
    if name == "auto":
        name = "triton" if q.is_cuda and triton_available() else "math"
    if name == "math":
        return math_attention(q, k, v, scale)
    if name == "sdpa":
        return sdpa_attention(q, k, v, scale)
    if not triton_available():
        raise RuntimeError("attention backend 'triton' needs the triton package; install it or use backend='math'.")
    if not q.is_cuda and not _interpreting():
        from .triton_jvp import check_triton_usable

        check_triton_usable(q.device)  # raises, naming TRITON_INTERPRET
    return AttentionWithJVP.apply(q, k, v, scale)
