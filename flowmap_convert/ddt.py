"""RAE's DiT^DH backbone (`DiTwDDTHead`, docs/checkpoints.md) and MF-RAE's variant with a (t - r) embedder.

A LightningDiT encoder (RMSNorm, SwiGLU, 2-D RoPE, optional QK-norm, adaLN with or without shift) on the
Gaussian-Fourier time embedding, then a wide DDT head whose blocks are modulated token-wise by the encoder output
s = silu(t_emb + s). Keys are exactly RAE's, so released checkpoints load strictly. Canonical time already
(t = 1 noise, v = eps - x0).

Decoupling (conditioning "decoupled"): encoder blocks [0, depth) see c(t) = silu(te(t) + ye), blocks [depth, N_e)
see c(r), and the time injection into s (so the whole DDT head) uses te(r). depth = N_e (the default for RAE)
keeps the encoder on t and puts the head on r. MF-RAE ("meanflow"): te(t) + re(t - r) everywhere te appears.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dit import PatchEmbed
from .errors import FlowmapError
from .kernels import attention
from .layers import LabelEmbedder, RMSNorm, TimestepEmbedder, modulate, sincos_pos_embed_2d, timestep_embedding


class GaussianFourierEmbedder(nn.Module):
    """arg = t W 2 pi with a frozen W ~ N(0, 1) [256] -> [sin | cos] -> Linear(512, D) -> SiLU -> Linear (RAE)."""

    fixed_parameters = ("W",)  # RAE keeps W at its random draw; fine-tuning must not move it

    def __init__(self, hidden_size: int, embedding_size: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)  # must be loaded from the checkpoint
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float()[:, None] * self.W.float()[None, :] * 2 * torch.pi  # fp32 island, RAE's operation order
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)  # sin first
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class VisionRope(nn.Module):
    """EVA's VisionRotaryEmbeddingFast(dim = head_dim / 2): rows rotate the first half, columns the second."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        dim = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(grid) / grid * grid  # RAE's ft_seq_len / pt_seq_len rescale (identity here)
        f = torch.einsum("i,f->if", pos, inv).repeat_interleave(2, dim=-1)  # '(n r)' pairwise repeat, r = 2
        full = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], dim=-1)
        self.register_buffer("freqs_cos", full.cos().reshape(grid * grid, -1))  # persistent: keys in RAE files
        self.register_buffer("freqs_sin", full.sin().reshape(grid * grid, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # rotate_half on adjacent pairs (x1, x2) -> (-x2, x1)
        return x * self.freqs_cos + rotated * self.freqs_sin


class NormAttention(nn.Module):
    """LightningDiT attention: fused qkv, optional QK-norm, RoPE on q and k, then flowmap_convert.kernels.attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str, rmsnorm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        if qk_norm == "none":
            self.q_norm = self.k_norm = nn.Identity()
        elif rmsnorm:
            self.q_norm, self.k_norm = (
                RMSNorm(self.head_dim, param_name="weight"),
                RMSNorm(self.head_dim, param_name="weight"),
            )
        else:
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRope | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)  # rope tables are fp32
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """w12 -> (x1, x2) -> w3(silu(x1) * x2), hidden int(2/3 * mlp_ratio * D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class GeluMlp(nn.Module):
    """timm Mlp fc1 -> GELU(tanh) -> fc2 (use_swiglu=False)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(dim: int, rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim, param_name="weight") if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DDTBlock(nn.Module):
    """LightningDDTBlock: adaLN from a (B, D) or token-wise (B, L, D) conditioning; 6 vectors, 4 without shift."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: str, rmsnorm: bool, swiglu: bool, wo_shift: bool
    ):
        super().__init__()
        self.norm1, self.norm2 = _norm(dim, rmsnorm), _norm(dim, rmsnorm)
        self.attn = NormAttention(dim, num_heads, qk_norm, rmsnorm)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, int(2 / 3 * hidden)) if swiglu else GeluMlp(dim, hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: VisionRope | None) -> torch.Tensor:
        if c.dim() == 2:
            c = c.unsqueeze(1)  # (B, 1, D) broadcasts over tokens like RAE's repeat
        mods = self.adaLN_modulation(c)
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = mods.chunk(4, dim=-1)
            shift_msa = shift_mlp = torch.zeros_like(scale_msa)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DDTFinalLayer(nn.Module):
    """Token-wise adaLN (shift, scale) then Linear to p*p*C."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, rmsnorm: bool):
        super().__init__()
        self.norm_final = _norm(dim, rmsnorm)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# Architecture switches in ModelConfig.extra, with RAE's released values as defaults (docs/checkpoints.md).
DDT_DEFAULTS = {
    "decoder_hidden": 2048,  # D_d of the DDT head
    "decoder_blocks": 2,  # N_d
    "decoder_heads": 16,  # heads in the head blocks
    "rmsnorm": True,
    "swiglu": True,
    "rope": True,
    "wo_shift": False,
    "pos_embed": True,  # sin-cos table on the encoder path only
}


def ddt_options(cfg: ModelConfig) -> dict:
    """cfg.extra merged over DDT_DEFAULTS."""
    return {**DDT_DEFAULTS, **{k: v for k, v in cfg.extra.items() if k in DDT_DEFAULTS}}


class DiTDH(nn.Module):
    """DiTwDDTHead (`encode` / `decode`, canonical time) and DiTwDDTHead_MF (`forward_flowmap`, conditioning "meanflow")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        o = ddt_options(cfg)
        self.cfg = cfg
        if cfg.patch_size != 1:
            raise FlowmapError(
                f"DiT^DH with patch size {cfg.patch_size} is not supported (RAE's released models use 1)."
            )
        c, d_e, d_d = cfg.in_channels, cfg.hidden_size, int(o["decoder_hidden"])
        self.num_encoder_blocks, self.num_decoder_blocks = cfg.num_blocks, int(o["decoder_blocks"])
        self.meanflow = cfg.conditioning == "meanflow"
        grid = cfg.input_size
        self.x_embedder = PatchEmbed(c, d_d, 1)  # raw noisy latent for the head
        self.s_embedder = PatchEmbed(c, d_e, 1)
        self.s_projector = nn.Linear(d_e, d_d) if d_e != d_d else nn.Identity()
        self.t_embedder = GaussianFourierEmbedder(d_e)
        if self.meanflow:
            self.r_embedder = GaussianFourierEmbedder(d_e)  # MF-RAE: embeds t - r
        self.y_embedder = LabelEmbedder(cfg.num_classes, d_e, cfg.class_embed_rows)
        self.final_layer = DDTFinalLayer(d_d, 1, c, o["rmsnorm"])
        if o["pos_embed"]:
            pos = torch.from_numpy(sincos_pos_embed_2d(d_e, grid)).float().unsqueeze(0)
            self.pos_embed = nn.Parameter(pos, requires_grad=False)
        else:
            self.pos_embed = None
        heads_d = int(o["decoder_heads"])
        if o["rope"]:
            self.enc_feat_rope = VisionRope(d_e // cfg.num_heads, grid)
            self.dec_feat_rope = VisionRope(d_d // heads_d, grid)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        blk = lambda d, h: DDTBlock(d, h, cfg.mlp_ratio, cfg.qk_norm, o["rmsnorm"], o["swiglu"], o["wo_shift"])  # noqa: E731
        self.blocks = nn.ModuleList(
            [blk(d_e, cfg.num_heads) for _ in range(self.num_encoder_blocks)]
            + [blk(d_d, heads_d) for _ in range(self.num_decoder_blocks)]
        )

    # ---------------------------------------------------------------- pieces shared by every path
    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s_embedder(x)
        return s if self.pos_embed is None else s + self.pos_embed.to(s.dtype)

    def _encoder_blocks(self, s: torch.Tensor, c: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        for i in range(lo, hi):
            s = self.blocks[i](s, c, self.enc_feat_rope)
        return s

    def _head(self, s: torch.Tensor, h: torch.Tensor, te_head: torch.Tensor) -> torch.Tensor:
        """DDT head: s = silu(te + s) into every token (no label), blocks on the raw-latent tokens h, final layer."""
        s = self.s_projector(F.silu(te_head.unsqueeze(1) + s))
        for blk in self.blocks[self.num_encoder_blocks :]:
            h = blk(h, s, self.dec_feat_rope)
        out = self.final_layer(h, s)
        b, n, ch = out.shape
        side = int(math.isqrt(n))
        return out.transpose(1, 2).reshape(b, ch, side, side)  # patch 1: tokens are pixels, row-major

    # ---------------------------------------------------------------- decoupled DiT^DH (canonical time)
    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int) -> tuple:
        """(encoder tokens after blocks[:depth] on c(t), head input tokens x_embedder(x)); DiT^DH only."""
        if self.meanflow:
            raise FlowmapError("an MF-RAE model embeds t - r in every block, so it cannot be split at a depth.")
        c = F.silu(self.t_embedder(t) + self.y_embedder(y))  # c = silu(t + y); each adaLN applies SiLU again
        s = self._encoder_blocks(self._encoder_input(x), c, 0, min(depth, self.num_encoder_blocks))
        return s, self.x_embedder(x)  # no position table on the head path

    def decode(self, state: tuple, r: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """Encoder blocks [depth, N_e) on c(r), then the head with te(r); returns (B, C, H, W)."""
        s, h = state
        te_r = self.t_embedder(r)
        c = F.silu(te_r + self.y_embedder(y))
        s = self._encoder_blocks(s, c, min(depth, self.num_encoder_blocks), self.num_encoder_blocks)
        return self._head(s, h, te_r)

    # ---------------------------------------------------------------- MF-RAE (whole network on t and t - r)
    def forward_flowmap(
        self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor, depth: int
    ) -> torch.Tensor:
        """u(x_t, t, r) in canonical time, MF-RAE forward(x, r, t, y): te(t) + re(t - r) everywhere te appears.

        For a decoupled DiT^DH this is decode(encode(x, t), r); at r = t it is the source's velocity eps - x0.
        """
        if not self.meanflow:
            return self.decode(self.encode(x, t, y, depth), r, y, depth)
        te = self.t_embedder(t) + self.r_embedder(t - r)
        c = F.silu(te + self.y_embedder(y))
        s = self._encoder_blocks(self._encoder_input(x), c, 0, self.num_encoder_blocks)
        return self._head(s, self.x_embedder(x), te)


# ==================================================================================== MCG-NJU DDT
# DDT (Decoupled Diffusion Transformer, MCG-NJU/DDT; docs/checkpoints.md): N blocks of one width, the first N_e a
# condition encoder on s_embedder(x) with c = silu(te(t) + ye(y)), the rest a velocity decoder on x_embedder(x)
# modulated token-wise by silu(te(t) + s). It reuses the layers above with three differences from RAE's blocks:
# adaLN is a bare Linear (no SiLU; c is already silu'ed), qkv and the SwiGLU have no biases, and the 2-D RoPE
# interleaves x and y frequencies over linspace(0, 16, side) positions. Source time: t = 0 noise, t = 1 data, the
# network returns data - noise ("reversed", translated by FlowMap).


class DDTRope(VisionRope):
    """DDT's precompute_freqs_cis_2d: head pair j turns by pos_x f_(j//2) (j even) or pos_y f_(j//2) (j odd).

    f_k = theta^(-4k / head_dim), positions linspace(0, 16, side) on both axes; computed, never stored (the
    tables are not in DDT's checkpoints), applied by VisionRope.forward as a complex product per adjacent pair.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0, span: float = 16.0):
        nn.Module.__init__(self)
        if head_dim % 4:
            raise FlowmapError(f"DDT's 2-D RoPE needs a head size divisible by 4, got {head_dim}.")
        cpu = torch.device("cpu")  # real tables even when the model is built on the meta device (they are not loaded)
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=cpu)[: head_dim // 4].float() / head_dim))
        pos = torch.linspace(0, span, grid, device=cpu)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # tokens row-major, as unfold orders them
        ax, ay = torch.outer(cols.reshape(-1), freqs), torch.outer(rows.reshape(-1), freqs)
        angle = torch.stack([ax, ay], dim=-1).reshape(grid * grid, -1).repeat_interleave(2, dim=-1)
        self.register_buffer("freqs_cos", angle.cos(), persistent=False)
        self.register_buffer("freqs_sin", angle.sin(), persistent=False)


class UnitTimeEmbedder(TimestepEmbedder):
    """DDT's TimestepEmbedder: t in [0, 1] with max_period 10 ([cos | sin], f_k = 10^(-k / 128)), DiT's MLP."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_size, max_period=10.0)  # fp32 island
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class BiasFreeSwiGLU(SwiGLU):
    """DDT's FeedForward as a SwiGLU without biases: w12 = [w1; w3] (stacked by the adapter), w3 = DDT's w2."""

    def __init__(self, dim: int, hidden: int):
        nn.Module.__init__(self)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)


class BiasFreeQKVAttention(NormAttention):
    """DDT's RAttention: qkv without bias, QK-RMSNorm (eps 1e-6), RoPE, proj with bias; NormAttention's forward."""

    def __init__(self, dim: int, num_heads: int):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, param_name="weight")
        self.k_norm = RMSNorm(self.head_dim, param_name="weight")
        self.proj = nn.Linear(dim, dim)


class MCGBlock(DDTBlock):
    """DDT's DDTBlock on DDTBlock's forward: RMSNorm, the attention and SwiGLU above, adaLN a bare Linear.

    DDT feeds silu(te + ye) (encoder) or silu(te + s) (decoder) straight into the Linear, so the Sequential's SiLU
    slot is an Identity (keys `adaLN_modulation.1.*`; DDT's `.0.` is renamed by the adapter).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        nn.Module.__init__(self)
        self.norm1, self.norm2 = RMSNorm(dim, param_name="weight"), RMSNorm(dim, param_name="weight")
        self.attn = BiasFreeQKVAttention(dim, num_heads)
        self.mlp = BiasFreeSwiGLU(dim, int(2 * int(dim * mlp_ratio) / 3))  # FeedForward: int(2 * hidden / 3)
        self.wo_shift = False
        self.adaLN_modulation = nn.Sequential(nn.Identity(), nn.Linear(dim, 6 * dim))


class MCGDDT(nn.Module):
    """MCG-NJU's DDT in its own time (`encode` / `decode`); cfg.extra["encoder_blocks"] = N_e (22 of 28 for XL).

    Decoupling at `depth` (blocks [0, depth) see t, the rest and the final layer see r): for depth <= N_e the encoder
    blocks [depth, N_e) run on c(r) and the decoder is conditioned on silu(te(r) + s); for depth > N_e the decoder
    blocks [N_e, depth) are conditioned on silu(te(t) + s) and the rest on silu(te(r) + s). depth = N_e (the default,
    config.default_depth) is DDT's own boundary: the whole velocity decoder sees r.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, d, p = cfg.in_channels, cfg.hidden_size, cfg.patch_size
        if cfg.input_size % p:
            raise FlowmapError(f"DDT: the latent side {cfg.input_size} is not a multiple of the patch size {p}.")
        ne = cfg.extra.get("encoder_blocks")
        if isinstance(ne, bool) or not isinstance(ne, int) or not 1 <= ne < cfg.num_blocks:
            raise FlowmapError(
                f"config.json: extra.encoder_blocks = {ne!r} must be an integer in [1, {cfg.num_blocks - 1}] "
                "for a DDT; re-export the model."
            )
        self.num_encoder_blocks = ne
        self.grid = cfg.input_size // p
        self.x_embedder = PatchEmbed(c, d, p)  # DDT's unfold + Linear, as a conv (same (c, kh, kw) order)
        self.s_embedder = PatchEmbed(c, d, p)
        self.t_embedder = UnitTimeEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_embed_rows)
        self.rope = DDTRope(d // cfg.num_heads, self.grid)
        self.blocks = nn.ModuleList([MCGBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks)])
        self.final_layer = DDTFinalLayer(d, p, c, rmsnorm=False)  # LayerNorm without affine, eps 1e-6
        self.final_layer.adaLN_modulation[0] = nn.Identity()

    def _run(self, h: torch.Tensor, cond: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        for i in range(lo, hi):
            h = self.blocks[i](h, cond, self.rope)
        return h

    def _cond(self, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        te = self.t_embedder(t)[:, None]  # (B, 1, D)
        return te, F.silu(te + self.y_embedder(y)[:, None])

    def encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int) -> tuple:
        """(encoder tokens s after blocks[:min(depth, N_e)], decoder tokens after blocks[N_e:depth]) in DDT time t."""
        ne = self.num_encoder_blocks
        te, c = self._cond(t, y)
        s = self._run(self.s_embedder(x), c, 0, min(depth, ne))
        h = self.x_embedder(x)
        if depth > ne:
            h = self._run(h, F.silu(te + s), ne, depth)
        return s, h

    def decode(self, state: tuple, r: torch.Tensor, y: torch.Tensor, depth: int) -> torch.Tensor:
        """The remaining encoder blocks on c(r), the decoder on silu(te(r) + s); returns (B, C, H, W), DDT's output."""
        s, h = state
        ne, n = self.num_encoder_blocks, len(self.blocks)
        te, c = self._cond(r, y)
        if depth < ne:
            s = self._run(s, c, depth, ne)
        cond = F.silu(te + s)
        h = self._run(h, cond, max(depth, ne), n)
        out = self.final_layer(h, cond)  # (B, L, C p p), features ordered (c, kh, kw) as fold reads them
        b, g, p = out.shape[0], self.grid, self.cfg.patch_size
        out = out.reshape(b, g, g, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, -1, g * p, g * p)
