"""Attention entry point used by every model (placeholder dispatch; the Triton JVP kernel lands with issue 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", scale: float | None = None):
    """softmax(q k^T * scale) v for (B, H, L, D) tensors; math on the CPU (SDPA has no forward-mode AD there)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "sdpa" or (backend == "auto" and q.is_cuda):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    return torch.matmul(s.softmax(-1), v.float()).to(q.dtype)
