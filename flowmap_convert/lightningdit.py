"""LightningDiT backbone (hustvl/LightningDiT, docs/checkpoints.md): a DiT whose blocks are LightningDiT blocks.

The blocks are the same family as RAE's DiT^DH encoder, so the layers come from `ddt.py` (RMSNorm, SwiGLU, 2-D RoPE,
optional QK-norm, adaLN with or without shift). Unlike DiT^DH, the conditioning is c = t_emb + y_emb with no SiLU in
front (each adaLN starts with one), the time embedding is DiT's sinusoidal one, and the head is a plain DiT final
layer over p x p patches. Source time: SiT's transport (t = 0 noise, t = 1 data, output = data - noise); FlowMap
translates it (time convention "reversed", docs/conventions.md).

Decoupling: blocks[:depth] see c(t); blocks[depth:] and the final layer see c(r).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .ddt import DDTBlock, DDTFinalLayer, VisionRope
from .dit import PatchEmbed
from .layers import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

# Block switches in ModelConfig.extra, with the released XL/1's values as defaults (configs/*_800ep_cfg.yaml).
LIGHTNING_DEFAULTS = {"rmsnorm": True, "swiglu": True, "rope": True, "wo_shift": False}


def lightning_options(cfg: ModelConfig) -> dict:
    """cfg.extra merged over LIGHTNING_DEFAULTS."""
    return {**LIGHTNING_DEFAULTS, **{k: v for k, v in cfg.extra.items() if k in LIGHTNING_DEFAULTS}}


class LightningDiT(nn.Module):
    """LightningDiT: `encode(x, t_src, y, depth)` / `decode(h, r_src, y, depth)` in SiT's own time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        o = lightning_options(cfg)
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        grid = cfg.input_size // p
        self.x_embedder = PatchEmbed(cfg.in_channels, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_embed_rows)
        pos = torch.from_numpy(sincos_pos_embed_2d(d, grid)).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed table, stored in the checkpoints
        # RoPE tables are persistent buffers in LightningDiT's files (`feat_rope.freqs_cos/sin`).
        self.feat_rope = VisionRope(d // cfg.num_heads, grid) if o["rope"] else None
        self.blocks = nn.ModuleList(
            DDTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, o["rmsnorm"], o["swiglu"], o["wo_shift"])
            for _ in range(cfg.num_blocks)
        )
        self.final_layer = DDTFinalLayer(d, p, cfg.out_channels, o["rmsnorm"])

    def cond(self, t_src: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = t_embed + y_embed (no SiLU here: every adaLN applies one)."""
        return self.t_embedder(t_src) + self.y_embedder(y)

    def encode(self, x: torch.Tensor, t_src: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """Tokens after blocks[:depth], conditioned on the current time."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.cond(t_src, y)
        for blk in self.blocks[:depth]:
            h = blk(h, c, self.feat_rope)
        return h

    def decode(self, h: torch.Tensor, r_src: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """blocks[depth:] and the final layer conditioned on the next time; returns (B, C_out, H, W)."""
        c = self.cond(r_src, y)
        for blk in self.blocks[depth:]:
            h = blk(h, c, self.feat_rope)
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W), row-major tokens, channel fastest within a patch (DiT's layout)."""
        c, p = self.cfg.out_channels, self.cfg.patch_size
        side = int(tokens.shape[1] ** 0.5)
        x = tokens.reshape(tokens.shape[0], side, side, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(tokens.shape[0], c, side * p, side * p)
