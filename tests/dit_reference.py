"""An independent plain-PyTorch DiT/SiT/REPA/DMF forward over a raw state dict, and tiny checkpoints in real formats.

Written from docs/checkpoints.md and docs/conventions.md only (no flowmap code): it is the "source model" the adapters are
checked against. Every function takes the raw state dict exactly as the checkpoint stores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ref_time_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (dim/2)) (docs/conventions.md)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / half)
    a = t.double()[:, None] * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1).float()


def _lin(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def _cond(sd, t_src, y):
    """c = MLP(emb(t)) + table[y]."""
    e = ref_time_embedding(t_src)
    e = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", e)))
    return e + sd["y_embedder.embedding_table.weight"][y]


def _qk_norm(sd, prefix, q, kind):
    if kind == "layernorm":  # timm Attention's default norm_layer nn.LayerNorm over the head dim: eps 1e-5
        return F.layer_norm(q, q.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)
    if kind == "rms":  # DMF RMSNorm: x * rsqrt(mean x^2 + eps) * scale
        return q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[prefix + ".scale"]
    return q


def _block(sd, i, x, c, heads, qk):
    """One adaLN-Zero block, attention written out with an explicit softmax."""
    p = f"blocks.{i}."
    mods = _lin(sd, p + "adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
    sh1, sc1, g1, sh2, sc2, g2 = [m[:, None, :] for m in mods]
    b, n, d = x.shape
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc1) + sh1
    qkv = _lin(sd, p + "attn.qkv", h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = _qk_norm(sd, p + "attn.q_norm", q, qk), _qk_norm(sd, p + "attn.k_norm", k, qk)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    a = (w @ v).transpose(1, 2).reshape(b, n, d)
    x = x + g1 * _lin(sd, p + "attn.proj", a)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc2) + sh2
    m = _lin(sd, p + "mlp.fc2", F.gelu(_lin(sd, p + "mlp.fc1", h), approximate="tanh"))
    return x + g2 * m


def ref_forward(sd, x, t_src, y, heads, qk="none", r_src=None, depth=None):
    """Raw network output (B, C_out, H, W): blocks[:depth] on c(t), blocks[depth:] and the head on c(r)."""
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    depth = n if depth is None else depth
    r_src = t_src if r_src is None else r_src
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    ct, cr = _cond(sd, t_src, y), _cond(sd, r_src, y)
    for i in range(n):
        h = _block(sd, i, h, ct if i < depth else cr, heads, qk)
    sh, sc = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(cr)).chunk(2, dim=1)
    h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + sc[:, None]) + sh[:, None]
    out = _lin(sd, "final_layer.linear", h)
    b, tokens, _ = out.shape
    g = int(round(tokens**0.5))
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(b, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
    return out.reshape(b, c_out, g * p, g * p)


def ref_sit_velocity(sd, x, t_sit, y, heads, qk="none"):
    """Original SiT: unpatchify all channels, then keep the first half under learn_sigma (x.chunk(2, dim=1)[0])."""
    out = ref_forward(sd, x, t_sit, y, heads, qk)
    c = x.shape[1]
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * c else out


def ref_logvar(sd, t, r):
    """DMF logvar head on cat[emb128(t), emb128(r)] (DMF Eq. 6)."""
    feats = torch.cat([ref_time_embedding(t, 128), ref_time_embedding(r, 128)], dim=1)
    return _lin(sd, "logvar_linear", feats).reshape(-1, 1, 1, 1)


def dit_stem_sd(r, d, channels, patch, out_channels, classes, pos_embed) -> dict:
    """The DiT layout's keys outside the blocks (docs/checkpoints.md): patch embedder, timestep MLP, class table with
    its null row, pos_embed and the adaLN head. `r(*shape)` draws one random tensor; `pos_embed()` gives the (1, T, d)
    table and is called in its place in the key order, so a random one is drawn between the class table and the head.
    """
    return {
        "x_embedder.proj.weight": r(d, channels, patch, patch),
        "x_embedder.proj.bias": r(d),
        "t_embedder.mlp.0.weight": r(d, 256),
        "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d),
        "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(classes + 1, d),
        "pos_embed": pos_embed(),
        "final_layer.linear.weight": r(patch * patch * out_channels, d),
        "final_layer.linear.bias": r(patch * patch * out_channels),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d),
        "final_layer.adaLN_modulation.1.bias": r(2 * d),
    }


def dit_block_sd(r, p, d, mlp_hidden=None, modulations=6) -> dict:
    """One block's attention and adaLN keys under prefix `p`, with the GELU MLP (fc1, fc2) when `mlp_hidden` is given;
    `modulations` is the adaLN's chunk count (6, or 4 without the shifts)."""
    sd = {
        p + "attn.qkv.weight": r(3 * d, d),
        p + "attn.qkv.bias": r(3 * d),
        p + "attn.proj.weight": r(d, d),
        p + "attn.proj.bias": r(d),
    }
    if mlp_hidden:
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(mlp_hidden, d), r(mlp_hidden)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(d, mlp_hidden), r(d)
    sd[p + "adaLN_modulation.1.weight"] = r(modulations * d, d)
    sd[p + "adaLN_modulation.1.bias"] = r(modulations * d)
    return sd


def make_sd(
    hidden=64,
    blocks=4,
    channels=4,
    patch=2,
    size=8,
    classes=10,
    learn_sigma=False,
    qk="none",
    logvar=False,
    projectors=False,
    seed=0,
    std=0.1,
):
    """A random state dict with exactly the key names and shapes of docs/checkpoints.md (DiT layout + DMF / REPA extras)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * std

    d, c_out, t = hidden, channels * (2 if learn_sigma else 1), (size // patch) ** 2
    sd = dit_stem_sd(r, d, channels, patch, c_out, classes, pos_embed=lambda: r(1, t, d))
    for i in range(blocks):
        p = f"blocks.{i}."
        sd.update(dit_block_sd(r, p, d, mlp_hidden=4 * d))
        hd = d // 4  # the tests build qk-norm models with 4 heads
        if qk == "layernorm":
            for n in ("q_norm", "k_norm"):
                sd[p + f"attn.{n}.weight"] = 1 + r(hd)
                sd[p + f"attn.{n}.bias"] = r(hd)
        elif qk == "rms":
            for n in ("q_norm", "k_norm"):
                sd[p + f"attn.{n}.scale"] = 1 + r(hd)
    if logvar:
        sd["logvar_linear.weight"], sd["logvar_linear.bias"] = r(1, 256), r(1)
    if projectors:
        for j in range(1):
            sd.update(
                {
                    f"projectors.{j}.0.weight": r(32, d),
                    f"projectors.{j}.0.bias": r(32),
                    f"projectors.{j}.2.weight": r(32, 32),
                    f"projectors.{j}.2.bias": r(32),
                    f"projectors.{j}.4.weight": r(16, 32),
                    f"projectors.{j}.4.bias": r(16),
                }
            )
    return sd
