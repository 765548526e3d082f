"""Independent plain-PyTorch source forwards written from the sources' code (docs/checkpoints.md), taking raw state dicts (test oracles).

Nothing here imports flowmap_convert: these are the sources' own forwards, re-derived from the facts sheet, so a
bug in the package cannot hide in its reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------ DiT
def sinusoid(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """DiT / diffusers: f_k = exp(-ln(1e4) k / divisor), k < 128, [cos | sin], in float32 as both sources compute it."""
    k = torch.arange(128, dtype=torch.float32)
    args = t.float()[:, None] * torch.exp(-math.log(10000.0) * k / divisor)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _attn(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, d = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
    return F.linear((a @ v).transpose(1, 2).reshape(b, n, d), proj_w, proj_b)


def dit_eps(
    sd: dict,
    x: torch.Tensor,
    tau_blocks: list,
    tau_head: torch.Tensor,
    y: torch.Tensor,
    heads: int,
    layout: str = "original",
) -> torch.Tensor:
    """DiT forward with a per-block DDPM time; returns the full 2C-channel output.

    layout "original": DiT keys, frequency divisor 128, norm2 eps 1e-6; "diffusers": diffusers keys read directly,
    divisor 127, norm2 eps 1e-5, embedders from block 0, q/k/v separate, pos table recomputed.
    """
    diff = layout == "diffusers"
    pw = sd["pos_embed.proj.weight" if diff else "x_embedder.proj.weight"]
    pb = sd["pos_embed.proj.bias" if diff else "x_embedder.proj.bias"]
    d, p = pw.shape[0], pw.shape[2]
    h = F.conv2d(x, pw, pb, stride=p).flatten(2).transpose(1, 2)
    grid = x.shape[-1] // p
    h = h + torch.from_numpy(sincos_2d(d, grid)).float()[None] if diff else h + sd["pos_embed"]
    n = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks." if diff else "blocks.")})

    def cond(tau):
        if diff:
            pre = "transformer_blocks.0.norm1.emb."
            e = _lin(
                F.silu(_lin(sinusoid(tau, 127.0), sd, pre + "timestep_embedder.linear_1")),
                sd,
                pre + "timestep_embedder.linear_2",
            )
            return e + sd[pre + "class_embedder.embedding_table.weight"][y]
        e = F.linear(
            F.silu(F.linear(sinusoid(tau, 128.0), sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
            sd["t_embedder.mlp.2.weight"],
            sd["t_embedder.mlp.2.bias"],
        )
        return e + sd["y_embedder.embedding_table.weight"][y]

    for i in range(n):
        c_i = cond(tau_blocks[i])
        if diff:
            pre = f"transformer_blocks.{i}."
            mod = _lin(F.silu(c_i), sd, pre + "norm1.linear")
            qkv_w = torch.cat([sd[pre + f"attn1.to_{z}.weight"] for z in "qkv"])
            qkv_b = torch.cat([sd[pre + f"attn1.to_{z}.bias"] for z in "qkv"])
            proj = (sd[pre + "attn1.to_out.0.weight"], sd[pre + "attn1.to_out.0.bias"])
            fc1, fc2, eps2 = pre + "ff.net.0.proj", pre + "ff.net.2", 1e-5
        else:
            pre = f"blocks.{i}."
            mod = _lin(F.silu(c_i), sd, pre + "adaLN_modulation.1")
            qkv_w, qkv_b = sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]
            proj = (sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
            fc1, fc2, eps2 = pre + "mlp.fc1", pre + "mlp.fc2", 1e-6
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, None] for m in mod.chunk(6, -1)]
        h = h + g1 * _attn(F.layer_norm(h, (d,), eps=1e-6) * (1 + sc1) + sh1, qkv_w, qkv_b, *proj, heads)
        h = h + g2 * _lin(
            F.gelu(_lin(F.layer_norm(h, (d,), eps=eps2) * (1 + sc2) + sh2, sd, fc1), approximate="tanh"), sd, fc2
        )
    c_h = cond(tau_head)
    mod = _lin(F.silu(c_h), sd, "proj_out_1" if diff else "final_layer.adaLN_modulation.1")
    shift, scale = [m[:, None] for m in mod.chunk(2, -1)]
    out = _lin(
        F.layer_norm(h, (d,), eps=1e-6) * (1 + scale) + shift, sd, "proj_out_2" if diff else "final_layer.linear"
    )
    co = out.shape[-1] // (p * p)
    out = out.reshape(x.shape[0], grid, grid, p, p, co).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return out.reshape(x.shape[0], co, grid * p, grid * p)


def sincos_2d(dim: int, grid: int, cls_row: bool = False) -> np.ndarray:
    """2-D sin-cos table: half 1 encodes the column w, half 2 the row h; each [sin | cos], omega_k = 1/1e4^(k/(D/4))."""

    def one(d, pos):
        om = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        o = pos.reshape(-1)[:, None] * om[None]
        return np.concatenate([np.sin(o), np.cos(o)], 1)

    hh, ww = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    emb = np.concatenate([one(dim // 2, ww), one(dim // 2, hh)], 1)
    return np.concatenate([np.zeros((1, dim)), emb], 0) if cls_row else emb


# ------------------------------------------------------------------------------------------------ DDPM
def ddpm_log_snr_table() -> np.ndarray:
    """lambda_k = log(ab_k / (1 - ab_k)) for DiT's 1000 linear betas in [1e-4, 0.02]."""
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    return np.log(ab) - np.log1p(-ab)


def alpha_bar_at(tau: np.ndarray) -> np.ndarray:
    """ᾱ at a continuous DDPM step: log-SNR linear between integer steps (the documented convention)."""
    lam = np.interp(np.asarray(tau, dtype=np.float64), np.arange(1000), ddpm_log_snr_table())
    return 1.0 / (1.0 + np.exp(-lam))


def tau_of(s: float) -> float:
    """Continuous DDPM step with the SNR of canonical time s, by bisection on alpha_bar_at (independent inverse)."""
    target = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
    lo, hi = 0.0, 999.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if alpha_bar_at(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------------ DiT^DH
def rms(x, w, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope_tables(head_dim: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RAE VisionRotaryEmbeddingFast(dim=hd/2): first hd/2 dims rotate by the row h, last hd/2 by the column w."""
    dim = head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = torch.arange(grid).float()[:, None] * inv[None]  # (grid, hd/4)
    f = f.repeat_interleave(2, dim=-1)  # pairwise repeat (n r), r=2
    full = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], -1)
    full = full.reshape(grid * grid, head_dim)
    return full.cos(), full.sin()


def rotate_half(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x2, x1], -1).flatten(-2)


def ddt_block(h, cond, sd, pre, heads, rope):
    """LightningDDTBlock with RMSNorm, SwiGLU, RoPE, shift (the released configuration)."""
    d = h.shape[-1]
    if cond.dim() == 2:
        cond = cond[:, None]
    sh1, sc1, g1, sh2, sc2, g2 = _lin(F.silu(cond), sd, pre + "adaLN_modulation.1").chunk(6, -1)
    a = rms(h, sd[pre + "norm1.weight"]) * (1 + sc1) + sh1
    b, n, _ = a.shape
    qkv = _lin(a, sd, pre + "attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if pre + "attn.q_norm.weight" in sd:
        q, k = rms(q, sd[pre + "attn.q_norm.weight"]), rms(k, sd[pre + "attn.k_norm.weight"])
    cos, sin = rope
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ v
    h = h + g1 * _lin(att.transpose(1, 2).reshape(b, n, d), sd, pre + "attn.proj")
    m = rms(h, sd[pre + "norm2.weight"]) * (1 + sc2) + sh2
    x1, x2 = _lin(m, sd, pre + "mlp.w12").chunk(2, -1)
    return h + g2 * _lin(F.silu(x1) * x2, sd, pre + "mlp.w3")


def fourier(sd, pre, t):
    """RAE GaussianFourierEmbedding: arg = t W 2 pi, [sin | cos] -> Linear -> SiLU -> Linear."""
    arg = t[:, None] * sd[pre + ".W"][None] * 2 * math.pi
    e = torch.cat([torch.sin(arg), torch.cos(arg)], -1)
    return _lin(F.silu(_lin(e, sd, pre + ".mlp.0")), sd, pre + ".mlp.2")


def ddt_forward(sd, x, t, y, heads_enc, heads_dec, r=None):
    """RAE DiTwDDTHead.forward(x, t, y); with `r` given, MF-RAE DiTwDDTHead_MF.forward(x, r, t, y)."""
    n_enc = 1 + max(
        int(k.split(".")[1])
        for k in sd
        if k.startswith("blocks.")
        and sd[k].shape[-1] == sd["s_embedder.proj.weight"].shape[0]
        and k.endswith("norm1.weight")
    )
    n_all = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    te = fourier(sd, "t_embedder", t)
    if r is not None:
        te = te + fourier(sd, "r_embedder", t - r)  # MF: r_embedder sees t - r
    c = F.silu(te + sd["y_embedder.embedding_table.weight"][y])
    s = (
        F.conv2d(x, sd["s_embedder.proj.weight"], sd["s_embedder.proj.bias"]).flatten(2).transpose(1, 2)
        + sd["pos_embed"]
    )
    d_e = s.shape[-1]
    grid = x.shape[-1]
    rope_e = rope_tables(d_e // heads_enc, grid)
    for i in range(n_enc):
        s = ddt_block(s, c, sd, f"blocks.{i}.", heads_enc, rope_e)
    s = F.silu(te[:, None] + s)
    if "s_projector.weight" in sd:
        s = _lin(s, sd, "s_projector")
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]).flatten(2).transpose(1, 2)
    rope_d = rope_tables(h.shape[-1] // heads_dec, grid)
    for i in range(n_enc, n_all):
        h = ddt_block(h, s, sd, f"blocks.{i}.", heads_dec, rope_d)
    shift, scale = _lin(F.silu(s), sd, "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = _lin(rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, sd, "final_layer.linear")
    return out.transpose(1, 2).reshape(x.shape)  # patch 1: tokens back to (B, C, H, W)


# ------------------------------------------------------------------------------------------------ LightningDiT
def _ln(x, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def lightning_block(h, c, sd, pre, heads, rope):
    """LightningDiTBlock(x, c, feat_rope) with every option read from the keys present (RMSNorm, SwiGLU, QK-norm, wo_shift)."""
    d = h.shape[-1]
    mods = _lin(F.silu(c), sd, pre + "adaLN_modulation.1")[:, None, :]
    if mods.shape[-1] == 4 * d:  # wo_shift: modulate(x, None, scale) = x * (1 + scale)
        sc1, g1, sc2, g2 = mods.chunk(4, -1)
        sh1 = sh2 = 0.0
    else:
        sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, -1)
    rmsnorm = pre + "norm1.weight" in sd
    norm = (lambda x, n: rms(x, sd[pre + n + ".weight"])) if rmsnorm else (lambda x, n: _ln(x))  # noqa: E731
    a = norm(h, "norm1") * (1 + sc1) + sh1
    b, n, _ = a.shape
    hd = d // heads
    qkv = _lin(a, sd, pre + "attn.qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if pre + "attn.q_norm.weight" in sd:
        if rmsnorm:
            q, k = rms(q, sd[pre + "attn.q_norm.weight"]), rms(k, sd[pre + "attn.k_norm.weight"])
        else:
            q = F.layer_norm(q, (hd,), sd[pre + "attn.q_norm.weight"], sd[pre + "attn.q_norm.bias"])
            k = F.layer_norm(k, (hd,), sd[pre + "attn.k_norm.weight"], sd[pre + "attn.k_norm.bias"])
    if rope is not None:
        cos, sin = rope
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
    h = h + g1 * _lin(att.transpose(1, 2).reshape(b, n, d), sd, pre + "attn.proj")
    m = norm(h, "norm2") * (1 + sc2) + sh2
    if pre + "mlp.w12.weight" in sd:
        x1, x2 = _lin(m, sd, pre + "mlp.w12").chunk(2, -1)
        f = _lin(F.silu(x1) * x2, sd, pre + "mlp.w3")
    else:
        f = _lin(F.gelu(_lin(m, sd, pre + "mlp.fc1"), approximate="tanh"), sd, pre + "mlp.fc2")
    return h + g2 * f


def lightningdit_forward(sd, x, t, y, heads, r=None, depth=None):
    """LightningDiT.forward(x, t, y) in SiT time (t = 1 data): data - noise. With r and depth: blocks[depth:] and the
    final layer on c(r) (the decoupled split a converted flow map runs)."""
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    depth = n_blocks if depth is None else depth
    emb = lambda tt: _lin(F.silu(_lin(sinusoid(tt, 128), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")  # noqa: E731
    ye = sd["y_embedder.embedding_table.weight"][y]
    c_t = emb(t) + ye
    c_r = c_t if r is None else emb(r) + ye
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    rope = (sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]) if "feat_rope.freqs_cos" in sd else None
    for i in range(n_blocks):
        h = lightning_block(h, c_t if i < depth else c_r, sd, f"blocks.{i}.", heads, rope)
    shift, scale = _lin(F.silu(c_r), sd, "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    normed = rms(h, sd["final_layer.norm_final.weight"]) if "final_layer.norm_final.weight" in sd else _ln(h)
    out = _lin(normed * (1 + scale) + shift, sd, "final_layer.linear")
    b, side, c = x.shape[0], x.shape[-1] // p, out.shape[-1] // (p * p)
    out = out.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, side * p, side * p)
    return out[:, : x.shape[1]]


def lightningdit_euler(sd, noise, y, heads, points, shift):
    """transport Sampler.sample_ode (torchdiffeq fixed-grid Euler): t = linspace(0, 1, points), t' = s t / (1 + (s-1) t)."""
    t = torch.linspace(0, 1, points)
    t = shift * t / (1 + (shift - 1) * t)
    x = noise.clone()
    for i in range(points - 1):
        v = lightningdit_forward(sd, x, torch.full((x.shape[0],), float(t[i])), y, heads)
        x = x + (t[i + 1] - t[i]) * v
    return x


# ------------------------------------------------------------------------------------------------ REPA-E
def repae_euler(velocity, noise, y, steps):
    """REPA-E samplers.euler_sampler without CFG: fp64 state on linspace(1, 0, steps + 1), model in fp32."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for i in range(steps):
        tt = torch.full((x.shape[0],), float(ts[i]))
        x = x + (ts[i + 1] - ts[i]) * velocity(x.float(), tt, y).double()
    return x


# ------------------------------------------------------------------------------------------------ LDM AutoencoderKL
def _gn(x, sd, name):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def _conv(x, sd, name, stride=1, pad=None):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd[name + ".bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)


def _res(x, sd, pre):
    h = _conv(F.silu(_gn(x, sd, pre + "norm1")), sd, pre + "conv1")
    h = _conv(F.silu(_gn(h, sd, pre + "norm2")), sd, pre + "conv2")
    return (_conv(x, sd, pre + "nin_shortcut") if pre + "nin_shortcut.weight" in sd else x) + h


def _pix_attn(x, sd, pre):
    b, c, hh, ww = x.shape
    h = _gn(x, sd, pre + "norm")
    q = _conv(h, sd, pre + "q").reshape(b, c, hh * ww).permute(0, 2, 1)
    k = _conv(h, sd, pre + "k").reshape(b, c, hh * ww)
    v = _conv(h, sd, pre + "v").reshape(b, c, hh * ww)
    w_ = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    o = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(o, sd, pre + "proj_out")


def _level(h, sd, pre):
    """One resolution level of the LDM Encoder / Decoder: its ResnetBlocks in order, each followed by its AttnBlock
    where the level has attention."""
    j = 0
    while f"{pre}block.{j}.conv1.weight" in sd:
        h = _res(h, sd, f"{pre}block.{j}.")
        if f"{pre}attn.{j}.q.weight" in sd:
            h = _pix_attn(h, sd, f"{pre}attn.{j}.")
        j += 1
    return h


def ldm_decode(sd, z):
    """LDM AutoencoderKL.decode(z): post_quant_conv, Decoder (mid, levels from the deepest, upsample nearest x2)."""
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in")
    h = _res(_pix_attn(_res(h, sd, "decoder.mid.block_1."), sd, "decoder.mid.attn_1."), sd, "decoder.mid.block_2.")
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up."))
    for lv in reversed(range(levels)):
        h = _level(h, sd, f"decoder.up.{lv}.")
        if lv != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{lv}.upsample.conv")
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def ldm_encode_mean(sd, x):
    """LDM AutoencoderKL.encode(x).mode(): Encoder then quant_conv, first half of the moments."""
    h = _conv(x, sd, "encoder.conv_in")
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    for lv in range(levels):
        h = _level(h, sd, f"encoder.down.{lv}.")
        if lv != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.down.{lv}.downsample.conv", stride=2, pad=0)
    h = _res(_pix_attn(_res(h, sd, "encoder.mid.block_1."), sd, "encoder.mid.attn_1."), sd, "encoder.mid.block_2.")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out")
    return _conv(h, sd, "quant_conv").chunk(2, dim=1)[0]
