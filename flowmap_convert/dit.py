"""DiT-style backbone (DiT, SiT, REPA, DMF): adaLN-Zero blocks with a decoupled time per block range."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .kernels import attention
from .layers import LabelEmbedder, RMSNorm, TimestepEmbedder, modulate, sincos_pos_embed_2d


class PatchEmbed(nn.Module):
    """Conv patchifier with key `proj` (timm PatchEmbed without norm)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D), tokens row-major


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional QK-norm, dispatched through flowmap_convert.kernels."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str = "none"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        if qk_norm == "rms":  # DMF's RMSNorm: parameter `scale`, eps 1e-6
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        elif (
            qk_norm == "layernorm"
        ):  # timm Attention(qk_norm=True) as in REPA: norm_layer=nn.LayerNorm, default eps 1e-5
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, L, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: six modulation vectors from the conditioning c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: str, norm2_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm2_eps)  # 1e-5 in diffusers' DiT
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear map to p*p*C_out values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The DiT/SiT/REPA/DMF network: `encode` runs blocks[:depth] at one time, `decode` the rest and the head at
    another (the decoupled forward of DMF Sec. 3.1, composed by FlowMap)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, p)
        # extra["freq_shift"] = 1 and extra["norm2_eps"] = 1e-5 reproduce diffusers-format DiT weights exactly.
        self.t_embedder = TimestepEmbedder(d, freq_shift=int(cfg.extra.get("freq_shift", 0)))
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_embed_rows)
        grid = cfg.input_size // p
        pos = torch.from_numpy(sincos_pos_embed_2d(d, grid)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed table, stored in checkpoints
        norm2_eps = float(cfg.extra.get("norm2_eps", 1e-6))
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, norm2_eps) for _ in range(cfg.num_blocks)
        )
        self.final_layer = FinalLayer(d, p, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zeroed adaLN and output layers (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def cond(self, t_src: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embed + y_embed (no SiLU on c; each adaLN starts with one)."""
        return self.t_embedder(t_src) + self.y_embedder(y)

    def encode(self, x: torch.Tensor, t_src: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """Tokens after blocks[:depth], all conditioned on the current time."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.cond(t_src, y)
        for blk in self.blocks[:depth]:
            h = blk(h, c)
        return h

    def decode(self, h: torch.Tensor, r_src: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """blocks[depth:] and the head conditioned on the next time; returns (B, C_out, H, W)."""
        c = self.cond(r_src, y)
        for blk in self.blocks[depth:]:
            h = blk(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W), row-major tokens, channel fastest within a patch."""
        c, p = self.cfg.out_channels, self.cfg.patch_size
        h = w = int(tokens.shape[1] ** 0.5)
        x = tokens.reshape(tokens.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(tokens.shape[0], c, h * p, w * p)


# Standard sizes shared by DiT, SiT, REPA and DMF (docs/checkpoints.md): name -> (hidden, blocks, heads).
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "M": (1024, 16, 16), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def heads_for_hidden(hidden_size: int) -> int:
    """Default head count from the hidden size, as in the standard tables; 64-d heads otherwise."""
    for d, _, h in SIZES.values():
        if d == hidden_size:
            return h
    return max(1, hidden_size // 64)
