"""Fused attention forward + forward-mode tangent (JVP) + log-sum-exp in one Triton pass.

Notation (per batch-head; rows i index queries, columns j index keys):

    S  = scale * Q K^T                    P = softmax_j(S)          O = P V
    dS = scale * (dQ K^T + Q dK^T)                                  (tangent of S)
    dP = P * (dS - rowsum(P * dS))                                  (tangent of softmax)
    dO = dP V + P dV
       = sum_j P_ij (dS_ij - c_i) V_j - (g_i - c_i) O_i + sum_j P_ij dV_j,  g_i = sum_j P_ij dS_ij

for any per-row constant c_i (the two c_i terms cancel since sum_j P_ij V_j = O_i). The
kernel takes c_i = the softmax-weighted mean of dS over the first key block, which keeps
the accumulated P * (dS - c) small and centred: a key-independent shift of dS (softmax-
invariant) then no longer inflates the rounding error of the bf16/fp16 (P * dS) V product.

Online softmax over key blocks keeps the running max m_i and, all rescaled by
exp(m_old - m_new) whenever m_i grows,

    l_i     = sum_j exp(S_ij - m_i)
    acc_O   = sum_j exp(S_ij - m_i) V_j
    acc_T   = sum_j exp(S_ij - m_i) ((dS_ij - c_i) V_j + dV_j)
    g_i     = sum_j exp(S_ij - m_i) (dS_ij - c_i)

and at the end O = acc_O / l, dO = acc_T / l - (g / l) O and LSE = m + log(l) (natural
log of sum_j exp(S_ij), the convention of flash attention's backward). Nothing N x N is
stored: memory is linear in the sequence length.

Head dims that are not a power of two run as two tiles (D = 72 -> 64 + 16, 96 -> 64 + 32)
instead of one padded to the next power of two (72 -> 128 would be 1.78x the work); the
head dim is a compile-time constant and strides that are multiples of 8 are passed as
multiples of a constant 8, so the compiler sees 16-byte aligned rows and vectorises loads. See ``head_dim_tiles``.
"""

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Interpreter launches use one small tile so CPU tests stay fast.
_INTERPRET_BLOCK_M = 32
_INTERPRET_BLOCK_N = 32
_AUTOTUNE_ENV = "FLOWMAP_TRITON_AUTOTUNE"
_DEFAULT_SMEM = 227 * 1024  # H100 / H200 opt-in shared memory per block
_REGISTER_BUDGET = 240  # per thread, as estimated by registers_per_thread (255 is the hardware cap)


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
    TO,
    LSE,  # primal inputs, tangent inputs, outputs (LSE is (B*H, L_Q) fp32, contiguous)
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
    L_BUCKET,  # autotune key only: max(L_Q, L_K) rounded up to a power of two
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,  # true head dim
    D1: tl.constexpr,  # first head-dim tile (power of two >= 16)
    D2: tl.constexpr,  # second head-dim tile (power of two >= 16), 0 for none
    MASK_A: tl.constexpr,  # the first tile reaches past HEAD_DIM (D < 16)
    MASK_B: tl.constexpr,  # the second tile reaches past HEAD_DIM (72 = 64 + 8 of 16)
    STRIDE_UNIT: tl.constexpr,  # 8 when every stride is a multiple of 8 elements (passed divided by 8), else 1
    DOT_PRECISION: tl.constexpr,  # "ieee" / "tf32x3" for fp32 inputs; ignored for fp16/bf16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), streaming every key block once."""
    # 1-D grid (the second grid axis caps at 65535, and B * H can exceed it)
    pid = tl.program_id(0)
    num_m = tl.cdiv(L_Q, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)  # 64-bit offsets: B*H*L*D may exceed 2^31 elements
    b = pid_bh // H
    h = pid_bh % H
    # Strides arrive divided by STRIDE_UNIT (8 when every stride is a multiple of 8 elements): multiplying
    # back by the constant lets the compiler prove 16-byte aligned rows, hence vector loads and async copies
    # (tl.multiple_of on scalar arguments does not carry that through, as sm_90 compiles showed).
    s_qb, s_qh, s_ql = s_qb * STRIDE_UNIT, s_qh * STRIDE_UNIT, s_ql * STRIDE_UNIT
    s_kb, s_kh, s_kl = s_kb * STRIDE_UNIT, s_kh * STRIDE_UNIT, s_kl * STRIDE_UNIT
    s_vb, s_vh, s_vl = s_vb * STRIDE_UNIT, s_vh * STRIDE_UNIT, s_vl * STRIDE_UNIT
    s_tqb, s_tqh, s_tql = s_tqb * STRIDE_UNIT, s_tqh * STRIDE_UNIT, s_tql * STRIDE_UNIT
    s_tkb, s_tkh, s_tkl = s_tkb * STRIDE_UNIT, s_tkh * STRIDE_UNIT, s_tkl * STRIDE_UNIT
    s_tvb, s_tvh, s_tvl = s_tvb * STRIDE_UNIT, s_tvh * STRIDE_UNIT, s_tvl * STRIDE_UNIT
    s_ob, s_oh, s_ol = s_ob * STRIDE_UNIT, s_oh * STRIDE_UNIT, s_ol * STRIDE_UNIT
    s_tob, s_toh, s_tol = s_tob * STRIDE_UNIT, s_toh * STRIDE_UNIT, s_tol * STRIDE_UNIT

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L_Q
    da = tl.arange(0, D1)
    if MASK_A:
        qa_mask = row_ok[:, None] & (da < HEAD_DIM)[None, :]
    else:
        qa_mask = row_ok[:, None]
    q_rows = b * s_qb + h * s_qh + rows[:, None] * s_ql
    tq_rows = b * s_tqb + h * s_tqh + rows[:, None] * s_tql
    q_a = tl.load(Q + q_rows + da[None, :], mask=qa_mask, other=0.0)
    tq_a = tl.load(TQ + tq_rows + da[None, :], mask=qa_mask, other=0.0)
    acc_o_a = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc_t_a = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if D2 > 0:
        db = D1 + tl.arange(0, D2)
        if MASK_B:
            qb_mask = row_ok[:, None] & (db < HEAD_DIM)[None, :]
        else:
            qb_mask = row_ok[:, None]
        q_b = tl.load(Q + q_rows + db[None, :], mask=qb_mask, other=0.0)
        tq_b = tl.load(TQ + tq_rows + db[None, :], mask=qb_mask, other=0.0)
        acc_o_b = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
        acc_t_b = tl.zeros([BLOCK_M, D2], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    tk_base = TK + b * s_tkb + h * s_tkh
    tv_base = TV + b * s_tvb + h * s_tvh

    for start_n in range(0, L_K, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < L_K
        if MASK_A:
            kva_mask = col_ok[:, None] & (da < HEAD_DIM)[None, :]
        else:
            kva_mask = col_ok[:, None]
        k_a = tl.load(k_base + cols[:, None] * s_kl + da[None, :], mask=kva_mask, other=0.0)
        tk_a = tl.load(tk_base + cols[:, None] * s_tkl + da[None, :], mask=kva_mask, other=0.0)
        # S = scale Q K^T and dS = scale (dQ K^T + Q dK^T), summed over the head-dim tiles
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        ds = tl.dot(tq_a, tl.trans(k_a), input_precision=DOT_PRECISION)
        ds = tl.dot(q_a, tl.trans(tk_a), acc=ds, input_precision=DOT_PRECISION)
        if D2 > 0:
            if MASK_B:
                kvb_mask = col_ok[:, None] & (db < HEAD_DIM)[None, :]
            else:
                kvb_mask = col_ok[:, None]
            k_b = tl.load(k_base + cols[:, None] * s_kl + db[None, :], mask=kvb_mask, other=0.0)
            tk_b = tl.load(tk_base + cols[:, None] * s_tkl + db[None, :], mask=kvb_mask, other=0.0)
            s = tl.dot(q_b, tl.trans(k_b), acc=s, input_precision=DOT_PRECISION)
            ds = tl.dot(tq_b, tl.trans(k_b), acc=ds, input_precision=DOT_PRECISION)
            ds = tl.dot(q_b, tl.trans(tk_b), acc=ds, input_precision=DOT_PRECISION)
        s = tl.where(col_ok[None, :], s * scale, float("-inf"))  # keys past L_K carry zero weight
        ds = ds * scale

        # Online softmax: new running max and the factor exp(m_old - m_new) that
        # rescales every running sum (l, g, acc_O, acc_T) together.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # unnormalised P of this block; 0 on masked columns
        p_sum = tl.sum(p, axis=1)
        pds_sum = tl.sum(p * ds, axis=1)
        c_i = tl.where(start_n == 0, pds_sum / p_sum, c_i)  # centre: first block's weighted mean of dS
        l_i = l_i * alpha + p_sum
        g_i = g_i * alpha + (pds_sum - c_i * p_sum)  # sum_j P_ij (dS_ij - c_i), unnormalised
        pdc = p * (ds - c_i[:, None])

        v_a = tl.load(v_base + cols[:, None] * s_vl + da[None, :], mask=kva_mask, other=0.0)
        tv_a = tl.load(tv_base + cols[:, None] * s_tvl + da[None, :], mask=kva_mask, other=0.0)
        p16 = p.to(v_a.dtype)
        pdc16 = pdc.to(v_a.dtype)
        # acc_T += (P * (dS - c)) V + P dV;  acc_O += P V
        acc_t_a = tl.dot(pdc16, v_a, acc=acc_t_a * alpha[:, None], input_precision=DOT_PRECISION)
        acc_t_a = tl.dot(p16, tv_a, acc=acc_t_a, input_precision=DOT_PRECISION)
        acc_o_a = tl.dot(p16, v_a, acc=acc_o_a * alpha[:, None], input_precision=DOT_PRECISION)
        if D2 > 0:
            v_b = tl.load(v_base + cols[:, None] * s_vl + db[None, :], mask=kvb_mask, other=0.0)
            tv_b = tl.load(tv_base + cols[:, None] * s_tvl + db[None, :], mask=kvb_mask, other=0.0)
            acc_t_b = tl.dot(pdc16, v_b, acc=acc_t_b * alpha[:, None], input_precision=DOT_PRECISION)
            acc_t_b = tl.dot(p16, tv_b, acc=acc_t_b, input_precision=DOT_PRECISION)
            acc_o_b = tl.dot(p16, v_b, acc=acc_o_b * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    gl = g_i * inv_l
    o_rows = b * s_ob + h * s_oh + rows[:, None] * s_ol
    to_rows = b * s_tob + h * s_toh + rows[:, None] * s_tol
    o_a = acc_o_a * inv_l[:, None]  # O = acc_O / l
    t_a = acc_t_a * inv_l[:, None] - gl[:, None] * o_a  # dO = acc_T / l - (g / l) O
    tl.store(O + o_rows + da[None, :], o_a.to(O.dtype.element_ty), mask=qa_mask)
    tl.store(TO + to_rows + da[None, :], t_a.to(TO.dtype.element_ty), mask=qa_mask)
    if D2 > 0:
        o_b = acc_o_b * inv_l[:, None]
        t_b = acc_t_b * inv_l[:, None] - gl[:, None] * o_b
        tl.store(O + o_rows + db[None, :], o_b.to(O.dtype.element_ty), mask=qb_mask)
        tl.store(TO + to_rows + db[None, :], t_b.to(TO.dtype.element_ty), mask=qb_mask)
    tl.store(LSE + pid_bh * L_Q + rows, m_i + tl.log(l_i), mask=row_ok)  # natural-log LSE of scale Q K^T


# ---------------------------------------------------------------- head-dim tiles, configs, prune


def head_dim_tiles(head_dim: int) -> tuple[int, int]:
    """(D1, D2): the head dim as one power-of-two tile, or two (D2 = 0 for one) when that is less padding.

    tl.arange needs powers of two and tl.dot dims >= 16: 64 -> (64, 0), 72 -> (64, 16),
    96 -> (64, 32), 100 -> (128, 0) (64 + 64 would be no better), 8 -> (16, 0).
    """
    if head_dim <= 16:
        return 16, 0
    p = triton.next_power_of_2(head_dim)
    if p == head_dim:
        return head_dim, 0
    d1 = p // 2
    d2 = max(16, triton.next_power_of_2(head_dim - d1))
    return (d1, d2) if d1 + d2 < p else (p, 0)


def l_bucket(l_q: int, l_k: int) -> int:
    """Autotune key for the lengths: max(L_Q, L_K) rounded up to a power of two (at least 64)."""
    return max(64, triton.next_power_of_2(max(l_q, l_k, 1)))


def _config(bm: int, bn: int, warps: int, stages: int):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def autotune_configs(head_dim: int, dtype: torch.dtype) -> list:
    """At most four candidate tiles per head dim (Hopper-oriented); fp32 (tf32x3) gets small tiles.

    Chosen from offline sm_90 compiles (triton 3.9, ptxas register / stack reports): at D = 72
    (128, 64, 8 warps), (64, 64, 4) and (128, 32, 8) hold 184-233 registers without spills; at
    D = 128, (64, 64, 4 warps) spills and is pruned by ``registers_per_thread``, (64, 32, 4 warps)
    still spilled 24 bytes (hence 8 warps there) and (128, 32, 8 warps) holds 253 registers
    without spills; at D = 64, (128, 64, 4 warps) spilled 448 bytes, so BLOCK_M = 128 gets 8 warps.
    """
    if dtype == torch.float32:
        # tf32x3 splits every operand in two: offline compiles spilled at (64, 32) even with 8 warps
        return [_config(32, 32, 4, 2), _config(32, 16, 4, 2), _config(32, 32, 4, 1)]
    d1, d2 = head_dim_tiles(head_dim)
    if d1 + d2 <= 64:
        return [_config(128, 64, 8, 2), _config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 2)]
    return [_config(128, 64, 8, 2), _config(64, 64, 4, 2), _config(128, 32, 8, 2), _config(64, 32, 8, 2)]


def shared_memory_bytes(block_m: int, block_n: int, num_stages: int, head_dim: int, elem: int) -> int:
    """Shared memory a config needs, counting every tile.

    q and tangent-q (BLOCK_M x D, loaded once); k, dk, v, dv (BLOCK_N x D, one copy per
    pipeline stage); and the four score tiles S, dS, P, P * (dS - c) (BLOCK_M x BLOCK_N,
    staged as 16-bit dot operands, 32-bit for fp32 inputs), D being the padded tile width.
    """
    d1, d2 = head_dim_tiles(head_dim)
    d = d1 + d2
    q_tiles = 2 * block_m * d * elem
    kv_tiles = 4 * block_n * d * elem * max(1, num_stages)
    score_tiles = 4 * block_m * block_n * elem
    return q_tiles + kv_tiles + score_tiles


def registers_per_thread(block_m: int, block_n: int, head_dim: int, num_warps: int, elem: int) -> int:
    """Estimated 32-bit registers per thread live across the loop body.

    fp32 acc_O and acc_T (BLOCK_M x D each), q and tangent-q (BLOCK_M x D at `elem` bytes), and
    three fp32 score tiles live at once (S / P, dS, P * (dS - c); BLOCK_M x BLOCK_N). Against
    offline sm_90 compiles: estimates <= 240 compiled without spills (184-253 registers), 288 and
    384 spilled.
    """
    d1, d2 = head_dim_tiles(head_dim)
    threads = 32 * num_warps
    acc = 2 * block_m * (d1 + d2) // threads
    q = 2 * block_m * (d1 + d2) * elem // (4 * threads)
    scores = 3 * block_m * block_n // threads
    return acc + q + scores


def prune_configs(configs, head_dim: int, elem: int, smem_limit: int = _DEFAULT_SMEM) -> list:
    """Configs whose tiles fit in shared memory and registers (all of them: never an empty list)."""
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = shared_memory_bytes(bm, bn, c.num_stages, head_dim, elem)
        regs = registers_per_thread(bm, bn, head_dim, c.num_warps, elem)
        if smem <= smem_limit and regs <= _REGISTER_BUDGET:
            kept.append(c)
    if kept:
        return kept
    # nothing fits the estimate: the smallest tile
    return [
        min(configs, key=lambda c: shared_memory_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 1, head_dim, elem))
    ]


def _device_smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device (227 KiB on H100 when unknown)."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:
        return _DEFAULT_SMEM


def _early_prune(configs, named_args, **kwargs):
    """Triton's early_config_prune hook: prune_configs with this launch's head dim, dtype and device."""
    args = {**named_args, **kwargs}
    q = args["Q"]
    return prune_configs(configs, int(args["HEAD_DIM"]), q.element_size(), _device_smem_limit(q.device))


def fixed_config(head_dim: int, dtype: torch.dtype, smem_limit: int = _DEFAULT_SMEM):
    """The one config compiled launches use when autotuning is off: the first candidate that fits."""
    elem = torch.empty((), dtype=dtype).element_size()
    return prune_configs(autotune_configs(head_dim, dtype), head_dim, elem, smem_limit)[0]


def autotune_enabled() -> bool:
    """Autotune compiled launches unless env FLOWMAP_TRITON_AUTOTUNE=0 (then ``fixed_config`` runs)."""
    return os.environ.get(_AUTOTUNE_ENV, "1").strip() != "0"


_KERNELS: dict = {}


def _kernel(interpret: bool):
    """The jitted kernel for triton's mode, built on first use in that same mode."""
    mode = "interpret" if interpret else "compiled"
    if mode not in _KERNELS:
        with triton.knobs.runtime.scope():  # triton.jit reads this knob when it decorates
            triton.knobs.runtime.interpret = interpret
            _KERNELS[mode] = triton.jit(_attn_fwd_jvp_kernel)
    return _KERNELS[mode]


def _autotuned_kernel(head_dim: int, dtype: torch.dtype):
    """One autotuner per (head dim, fp32 or 16-bit): its own <= 4 configs, keyed on the length bucket."""
    key = (head_dim, dtype == torch.float32)
    if key not in _KERNELS:
        _KERNELS[key] = triton.autotune(
            configs=autotune_configs(head_dim, dtype),
            key=["L_BUCKET", "HEAD_DIM"],  # triton adds the argument dtypes to the key
            prune_configs_by={"early_config_prune": _early_prune},
        )(_kernel(False))
    return _KERNELS[key]


# ---------------------------------------------------------------- launcher


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernel needs unit stride along the head dim only; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _materialise_tangent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Turn a missing or symbolic-zero tangent into real zeros the kernel can read, in the primal's dtype."""
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


def _aligned(*xs: torch.Tensor) -> bool:
    """Every stride a multiple of 8 elements and every base 16-byte aligned."""
    return all(x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:3]) for x in xs)


def launch_grid(l_q: int, batch: int, heads: int, block_m: int) -> tuple[int]:
    """1-D grid: one program per (query block, batch-head); only axis 0 reaches 2^31 - 1 (axis 1 caps at 65535)."""
    return (triton.cdiv(l_q, block_m) * batch * heads,)


def attention_fwd_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None,
    tk: torch.Tensor | None,
    tv: torch.Tensor | None,
    scale: float | None = None,
    tangent_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, dO, LSE) for (B, H, L, D) inputs in one pass; LSE is (B, H, L_Q) fp32, natural log of sum exp(S).

    q, k, v share one dtype (fp32, fp16 or bf16); tangents are cast to it (None = zero).
    """
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

    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    t_out = torch.empty(q.shape, dtype=tangent_dtype or q.dtype, device=q.device)
    lse = torch.empty((B, H, L_Q), dtype=torch.float32, device=q.device)
    if L_K == 0 or L_Q == 0 or B * H == 0 or D == 0:  # no keys: O = 0 (as SDPA), dO = 0, LSE = -inf
        return o.zero_(), t_out.zero_(), lse.fill_(float("-inf"))

    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    tq, tk, tv = _materialise_tangent(tq, q), _materialise_tangent(tk, k), _materialise_tangent(tv, v)
    d1, d2 = head_dim_tiles(D)
    tensors = (q, k, v, tq, tk, tv, o, t_out)
    unit = 8 if _aligned(*tensors) else 1
    args = (
        *tensors,
        lse,
        *(s // unit for x in tensors for s in x.stride()[:3]),
        H,
        L_Q,
        L_K,
        l_bucket(L_Q, L_K),
        scale,
    )
    consts = dict(
        HEAD_DIM=D,
        D1=d1,
        D2=d2,
        MASK_A=d2 == 0 and d1 > D,
        MASK_B=d2 > 0 and d1 + d2 > D,
        STRIDE_UNIT=unit,
        DOT_PRECISION=("ieee" if interpret else "tf32x3") if q.dtype == torch.float32 else "tf32",
    )
    if interpret:
        grid = launch_grid(L_Q, B, H, _INTERPRET_BLOCK_M)
        _kernel(True)[grid](*args, **consts, BLOCK_M=_INTERPRET_BLOCK_M, BLOCK_N=_INTERPRET_BLOCK_N)
    elif autotune_enabled():
        with torch.cuda.device(q.device):
            grid = lambda meta: launch_grid(L_Q, B, H, meta["BLOCK_M"])  # noqa: E731
            _autotuned_kernel(D, q.dtype)[grid](*args, **consts)
    else:
        cfg = fixed_config(D, q.dtype, _device_smem_limit(q.device))
        with torch.cuda.device(q.device):
            grid = launch_grid(L_Q, B, H, cfg.kwargs["BLOCK_M"])
            _kernel(False)[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, t_out, lse
