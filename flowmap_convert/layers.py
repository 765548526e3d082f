"""Small building blocks shared by the backbones: time embeddings, norms, 2-D position tables."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def timestep_embedding(
    t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, freq_shift: int = 0
) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of a 1-D time tensor, always in fp32 (DiT/SiT/REPA/DMF, docs/conventions.md).

    f_k = exp(-ln(max_period) k / (half - freq_shift)); diffusers' DiT uses downscale_freq_shift = 1.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies -> Linear -> SiLU -> Linear; keys `mlp.0`, `mlp.2` as in DiT."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift  # 1 for diffusers-format DiT weights
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),  # mlp.0
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),  # mlp.2
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(
            t, self.frequency_size, freq_shift=self.freq_shift
        )  # fp32 island: time features never leave fp32 here
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with an optional extra row for the null label K; never drops labels itself."""

    def __init__(self, num_classes: int, hidden_size: int, rows: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(rows, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale, the factor computed in fp32 (DMF layers.py; param named `scale`)."""

    def __init__(self, dim: int, eps: float = 1e-6, param_name: str = "scale"):
        super().__init__()
        self.eps = eps
        self.param_name = param_name
        self.register_parameter(param_name, nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * norm).to(x.dtype) * getattr(self, self.param_name)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift with (B, D) or (B, L, D) conditioning."""
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (grid*grid, dim): first half encodes the column, second the row (MAE / DiT)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    w_idx, h_idx = np.meshgrid(gw, gh)  # w varies fastest: token order is row-major
    return np.concatenate([one_d(dim // 2, w_idx), one_d(dim // 2, h_idx)], axis=1)
