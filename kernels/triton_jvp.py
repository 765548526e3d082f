"""Fused attention forward + forward-mode tangent (JVP) in one Triton pass.

Notation (per batch-head; rows i index queries, columns j index keys):

    S  = scale * Q K^T                    P = softmax_j(S)          O = P V
    dS = scale * (dQ K^T + Q dK^T)                                  (tangent of S)
    dP = P * (dS - rowsum(P * dS))                                  (tangent of softmax)
    dO = dP V + P dV
       = sum_j P_ij dS_ij V_j - g_i O_i + sum_j P_ij dV_j,  g_i = sum_j P_ij dS_ij

Online softmax over key blocks keeps the running max m_i and, all rescaled by
exp(m_old - m_new) whenever m_i grows,

    l_i     = sum_j exp(S_ij - m_i)
    acc_O   = sum_j exp(S_ij - m_i) V_j
    acc_T   = sum_j exp(S_ij - m_i) (dS_ij V_j + dV_j)
    g_i     = sum_j exp(S_ij - m_i) dS_ij

and at the end O = acc_O / l and dO = acc_T / l - (g / l) O. Nothing N x N is
ever stored, so memory is linear in the sequence length.
"""

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Interpreter launches use one small tile so CPU tests stay fast (autotuning there
# would run every config on the CPU); compiled launches without autotuning use FIXED.
_INTERPRET_BLOCK_M = 32
_INTERPRET_BLOCK_N = 32
_FIXED = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def interpreting() -> bool:
    """Whether triton runs in its CPU interpreter in this process.

    Triton fixes the mode when it is first imported: ``triton.language``'s own jitted
    helpers (tl.sum, tl.max, ...) are built then from env TRITON_INTERPRET, so that
    variable must be set before ``import triton``; changing it later has no effect.
    """
    return isinstance(tl.sum, InterpretedFunction)


def _attn_fwd_jvp_kernel(
    Q,
    K,
    V,
    TQ,
    TK,
    TV,
    O,
    TO,  # primal inputs, tangent inputs, outputs (O read when HAS_O)
    s_qb,
    s_qh,
    s_ql,  # strides of Q (batch, head, row); the last dim is contiguous
    s_kb,
    s_kh,
    s_kl,
    s_vb,
    s_vh,
    s_vl,
    s_tqb,
    s_tqh,
    s_tql,
    s_tkb,
    s_tkh,
    s_tkl,
    s_tvb,
    s_tvh,
    s_tvl,
    s_ob,
    s_oh,
    s_ol,
    s_tob,
    s_toh,
    s_tol,
    H,
    L_Q,
    L_K,
    D,  # heads, query length, key length, true head dim
    scale,  # softmax scale
    D_PAD: tl.constexpr,  # head dim padded to a power of two (tl.arange needs it)
    HAS_O: tl.constexpr,  # O is given (from the primal forward): skip the P V product
    DOT_PRECISION: tl.constexpr,  # "ieee" keeps fp32 inputs exact (no TF32); ignored for fp16/bf16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), streaming every key block once."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit base offsets: B*H*L*D may exceed 2^31 elements
    h = (pid_bh % H).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, D_PAD)
    row_ok = rows < L_Q
    d_ok = cols_d < D  # padded head-dim lanes load as 0 and are never stored
    q_mask = row_ok[:, None] & d_ok[None, :]

    q_off = b * s_qb + h * s_qh + rows[:, None] * s_ql + cols_d[None, :]
    tq_off = b * s_tqb + h * s_tqh + rows[:, None] * s_tql + cols_d[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    tq = tl.load(TQ + tq_off, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    tk_base = TK + b * s_tkb + h * s_tkh
    tv_base = TV + b * s_tvb + h * s_tvh

    for start_n in range(0, L_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < L_K
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_kl + cols_d[None, :], mask=kv_mask, other=0.0)
        tk = tl.load(tk_base + cols[:, None] * s_tkl + cols_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vl + cols_d[None, :], mask=kv_mask, other=0.0)
        tv = tl.load(tv_base + cols[:, None] * s_tvl + cols_d[None, :], mask=kv_mask, other=0.0)

        # S = scale * Q K^T; key columns past L_K get -inf so they carry zero weight.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # dS = scale * (dQ K^T + Q dK^T), both products into one fp32 accumulator.
        ds = tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION)
        ds = tl.dot(q, tl.trans(tk), acc=ds, input_precision=DOT_PRECISION) * scale

        # Online softmax: new running max and the factor exp(m_old - m_new) that
        # rescales every running sum (l, g, acc_O, acc_T) together.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # unnormalised P of this block; 0 on masked columns
        pds = p * ds  # P_ij dS_ij, the first term of dO and the summand of g

        l_i = l_i * alpha + tl.sum(p, axis=1)
        g_i = g_i * alpha + tl.sum(pds, axis=1)  # g_i = sum_j P_ij dS_ij (unnormalised)
        # acc_T += (P * dS) V + P dV  -> sum_j P_ij (dS_ij V_j + dV_j)
        acc_t = acc_t * alpha[:, None]
        acc_t = tl.dot(pds.to(v.dtype), v, acc=acc_t, input_precision=DOT_PRECISION)
        acc_t = tl.dot(p.to(tv.dtype), tv, acc=acc_t, input_precision=DOT_PRECISION)
        if not HAS_O:
            acc_o = tl.dot(p.to(v.dtype), v, acc=acc_o * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    o_off = b * s_ob + h * s_oh + rows[:, None] * s_ol + cols_d[None, :]
    if HAS_O:
        o = tl.load(O + o_off, mask=q_mask, other=0.0).to(tl.float32)
    else:
        o = acc_o * inv_l[:, None]  # O = acc_O / l
        tl.store(O + o_off, o.to(O.dtype.element_ty), mask=q_mask)
    # dO = acc_T / l - (g / l) O  (the rowsum(P * dS) correction of the softmax tangent)
    t = acc_t * inv_l[:, None] - (g_i * inv_l)[:, None] * o
    to_off = b * s_tob + h * s_toh + rows[:, None] * s_tol + cols_d[None, :]
    tl.store(TO + to_off, t.to(TO.dtype.element_ty), mask=q_mask)


def _autotune_configs():
    """Hopper-oriented search space: BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps, 2/3 stages."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot fit: two fp32 (BLOCK_M, D) accumulators per thread, K/V tiles in SMEM."""
    d_pad = named_args["D_PAD"] if "D_PAD" in named_args else kwargs["D_PAD"]
    elem = named_args["Q"].element_size()
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        acc_regs = 2 * bm * d_pad // (32 * c.num_warps)  # fp32 registers per thread for acc_O, acc_T
        smem = 4 * bn * d_pad * elem * c.num_stages  # K, dK, V, dV tiles, multi-buffered
        if acc_regs <= 128 and smem <= 200 * 1024:
            kept.append(c)
    return kept or configs[:1]


_KERNELS: dict[str, object] = {}


def _kernel(interpret: bool):
    """The jitted kernel for triton's mode, built on first use in that same mode."""
    mode = "interpret" if interpret else "compiled"
    if mode not in _KERNELS:
        with triton.knobs.runtime.scope():  # triton.jit reads this knob when it decorates
            triton.knobs.runtime.interpret = interpret
            _KERNELS[mode] = triton.jit(_attn_fwd_jvp_kernel)
    return _KERNELS[mode]


def _autotuned_kernel():
    """The compiled kernel behind an autotuner keyed on (L_Q, L_K, D_PAD, HAS_O) and the input dtype."""
    if "autotuned" not in _KERNELS:
        _KERNELS["autotuned"] = triton.autotune(
            configs=_autotune_configs(),
            key=["L_Q", "L_K", "D_PAD", "HAS_O"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_kernel(False))
    return _KERNELS["autotuned"]


def autotune_enabled() -> bool:
    """Autotune compiled launches unless env FLOWMAP_TRITON_AUTOTUNE=0 (tests use one fixed config)."""
    return os.environ.get("FLOWMAP_TRITON_AUTOTUNE", "1").strip() != "0"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel needs unit stride along the head dim only; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _materialise_tangent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Turn a missing or symbolic-zero tangent into real zeros the kernel can read."""
    if t is None or t._is_zerotensor():
        return torch.zeros_like(like)
    return _last_dim_contiguous(t.to(like.dtype))


def check_triton_usable(device: torch.device) -> None:
    """Raise a clear error when the Triton kernel cannot run on this device."""
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"attention backend 'triton' needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before triton is first imported to run it in Triton's CPU interpreter, "
            "or use backend='math'."
        )


def attention_fwd_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    tangent_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its tangent for (B, H, L, D) inputs; pass `out` to reuse a primal output."""
    check_triton_usable(q.device)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects (B, H, L, D) tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    B, H, L_Q, D = q.shape
    L_K = k.shape[2]
    if k.shape != (B, H, L_K, D) or v.shape != (B, H, L_K, D):
        raise ValueError(
            f"k and v must be (B, H, L_K, D) = {(B, H, L_K, D)}, got {tuple(k.shape)} and {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype out of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}.")
    interpret = interpreting()
    if interpret and q.dtype == torch.bfloat16:
        raise RuntimeError("Triton's CPU interpreter has no bf16 tl.dot; test bf16 on CUDA.")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    tq, tk, tv = _materialise_tangent(tq, q), _materialise_tangent(tk, k), _materialise_tangent(tv, v)
    has_o = out is not None
    o = _last_dim_contiguous(out) if has_o else torch.empty_like(q)
    t_out = torch.empty(q.shape, dtype=tangent_dtype or q.dtype, device=q.device)
    d_pad = max(16, triton.next_power_of_2(D))  # tl.dot needs every dim >= 16

    args = (
        q,
        k,
        v,
        tq,
        tk,
        tv,
        o,
        t_out,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *tq.stride()[:3],
        *tk.stride()[:3],
        *tv.stride()[:3],
        *o.stride()[:3],
        *t_out.stride()[:3],
        H,
        L_Q,
        L_K,
        D,
        scale,
    )
    consts = dict(D_PAD=d_pad, HAS_O=has_o, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if interpret:
        grid = (triton.cdiv(L_Q, _INTERPRET_BLOCK_M), B * H)
        _kernel(True)[grid](*args, **consts, BLOCK_M=_INTERPRET_BLOCK_M, BLOCK_N=_INTERPRET_BLOCK_N)
    elif autotune_enabled():
        with torch.cuda.device(q.device):
            grid = lambda meta: (triton.cdiv(L_Q, meta["BLOCK_M"]), B * H)  # noqa: E731
            _autotuned_kernel()[grid](*args, **consts)
    else:
        with torch.cuda.device(q.device):
            grid = (triton.cdiv(L_Q, _FIXED["BLOCK_M"]), B * H)
            _kernel(False)[grid](*args, **consts, **_FIXED)
    return o, t_out
