"""An independent plain-PyTorch DDT (MCG-NJU/DDT `DDT`) and its stateful Euler sampler, on DDT's own keys (test oracle).

Written from reading the official code (docs/checkpoints.md lists the facts), in the official's own operations:
unfold / fold patchify, Linear patch embedders, complex-number 2-D RoPE, the bias-free FeedForward w1 / w2 / w3.
Nothing here imports flowmap_convert, so a bug in the package cannot hide in its reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_ddt_sd(
    hidden: int = 32,
    heads: int = 4,
    blocks: int = 5,
    channels: int = 4,
    patch: int = 2,
    classes: int = 10,
    seed: int = 0,
    std: float = 0.1,
    unit_norms: bool = False,
) -> dict:
    """A DDT state dict with exactly the official key set and shapes, random values everywhere (no zero init).

    Tiny by default; `std` scales every random N(0, 1) draw (0.1 keeps a tiny model's outputs O(1), so fp32 rounding
    stays ~1e-7; a real-size model wants a release-like 0.02), and `unit_norms` sets the RMSNorm weights to 1 instead
    of 1 + noise.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * std  # noqa: E731
    norm = (lambda n: torch.ones(n)) if unit_norms else (lambda n: 1 + r(n))
    d, cpp, hd = hidden, channels * patch * patch, hidden // heads
    ff = int(2 * int(d * 4.0) / 3)
    sd = {
        "x_embedder.proj.weight": r(d, cpp),
        "x_embedder.proj.bias": r(d),
        "s_embedder.proj.weight": r(d, cpp),
        "s_embedder.proj.bias": r(d),
        "t_embedder.mlp.0.weight": r(d, 256),
        "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d),
        "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(classes + 1, d),
        "final_layer.linear.weight": r(cpp, d),
        "final_layer.linear.bias": r(cpp),
        "final_layer.adaLN_modulation.0.weight": r(2 * d, d),
        "final_layer.adaLN_modulation.0.bias": r(2 * d),
    }
    for i in range(blocks):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": norm(d),
                p + "norm2.weight": norm(d),
                p + "attn.qkv.weight": r(3 * d, d),
                p + "attn.q_norm.weight": norm(hd),
                p + "attn.k_norm.weight": norm(hd),
                p + "attn.proj.weight": r(d, d),
                p + "attn.proj.bias": r(d),
                p + "mlp.w1.weight": r(ff, d),
                p + "mlp.w3.weight": r(ff, d),
                p + "mlp.w2.weight": r(d, ff),
                p + "adaLN_modulation.0.weight": r(6 * d, d),
                p + "adaLN_modulation.0.bias": r(6 * d),
            }
        )
    return sd


def _rms(x, w, eps=1e-6):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _freqs_cis(head_dim: int, h: int, w: int, theta: float = 10000.0, scale: float = 16.0) -> torch.Tensor:
    xs, ys = torch.linspace(0, scale, w), torch.linspace(0, scale, h)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    xc = torch.polar(torch.ones(h * w, f.numel()), torch.outer(xs.reshape(-1), f))
    yc = torch.polar(torch.ones(h * w, f.numel()), torch.outer(ys.reshape(-1), f))
    return torch.stack([xc, yc], dim=-1).reshape(h * w, -1)  # (N, head_dim / 2), x and y interleaved


def _rope(q, cis):  # q: (B, N, H, hd)
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    return torch.view_as_real(qc * cis[None, :, None, :]).flatten(3).type_as(q)


def _block(x, c, sd, pre, heads, cis):
    m = F.linear(c, sd[pre + "adaLN_modulation.0.weight"], sd[pre + "adaLN_modulation.0.bias"])  # no SiLU
    sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, dim=-1)
    b, n, d = x.shape
    h = _rms(x, sd[pre + "norm1.weight"]) * (1 + sc1) + sh1
    qkv = F.linear(h, sd[pre + "attn.qkv.weight"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 1, 3, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = _rms(q, sd[pre + "attn.q_norm.weight"]), _rms(k, sd[pre + "attn.k_norm.weight"])
    q, k = _rope(q, cis), _rope(k, cis)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    x = x + g1 * F.linear(a.transpose(1, 2).reshape(b, n, d), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
    h = _rms(x, sd[pre + "norm2.weight"]) * (1 + sc2) + sh2
    ff = F.linear(
        F.silu(F.linear(h, sd[pre + "mlp.w1.weight"])) * F.linear(h, sd[pre + "mlp.w3.weight"]),
        sd[pre + "mlp.w2.weight"],
    )
    return x + g2 * ff


def ddt_forward(sd, x, t, y, heads: int, encoder_blocks: int, patch: int = 2, t_dec=None) -> torch.Tensor:
    """DDT.forward(x, t, y) -> velocity x0 - eps in DDT time (t = 0 noise); `t_dec` swaps the time of s = silu(te + s)."""
    b, _, hh, ww = x.shape
    n = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    cis = _freqs_cis(sd["blocks.0.attn.q_norm.weight"].shape[0], hh // patch, ww // patch)
    tok = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)

    def temb(tt):
        half = 128
        f = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32) / half)
        a = tt.float()[:, None] * f[None]  # fp32 as the official computes it
        e = torch.cat([torch.cos(a), torch.sin(a)], -1).to(sd["t_embedder.mlp.0.weight"].dtype)
        e = F.linear(
            F.silu(F.linear(e, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
            sd["t_embedder.mlp.2.weight"],
            sd["t_embedder.mlp.2.bias"],
        )
        return e.view(b, 1, -1)

    te = temb(t)
    c = F.silu(te + sd["y_embedder.embedding_table.weight"][y].view(b, 1, -1))
    s = F.linear(tok, sd["s_embedder.proj.weight"], sd["s_embedder.proj.bias"])
    for i in range(encoder_blocks):
        s = _block(s, c, sd, f"blocks.{i}.", heads, cis)
    s = F.silu((te if t_dec is None else temb(t_dec)) + s)
    h = F.linear(tok, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])
    for i in range(encoder_blocks, n):
        h = _block(h, s, sd, f"blocks.{i}.", heads, cis)
    sh, sc = F.linear(s, sd["final_layer.adaLN_modulation.0.weight"], sd["final_layer.adaLN_modulation.0.bias"]).chunk(
        2, -1
    )
    h = F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + sc) + sh
    out = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return F.fold(out.transpose(1, 2).contiguous(), (hh, ww), kernel_size=patch, stride=patch)


def euler_sample(
    net,
    noise,
    y,
    null: int,
    num_steps: int,
    guidance: float,
    lo: float = 0.3,
    hi: float = 1.0,
    shift: float = 1.0,
    last_step=None,
):
    """DDT's stateful EulerSampler with simple_guidance_fn (state refreshed every step), in DDT time 0 -> 1.

    Grid linspace(0, 1 - last_step, N) then 1.0 (last_step None: 1 / N, a uniform grid), respaced by
    t / (t + (1 - t) shift); guidance u + g (c - u) only where lo < t < hi, the batch [uncond; cond].
    """
    last = 1.0 / num_steps if last_step is None or num_steps == 1 else last_step
    ts = torch.cat([torch.linspace(0.0, 1 - last, num_steps), torch.tensor([1.0])])
    ts = ts / (ts + (1 - ts) * shift)
    b = noise.shape[0]
    x = noise
    labels = torch.cat([torch.full_like(y, null), y])
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        out = net(torch.cat([x, x]), t_cur.repeat(2 * b), labels)
        unc, cond = out.chunk(2)
        g = guidance if lo < float(t_cur) < hi else 1.0
        x = x + (unc + g * (cond - unc)) * (t_next - t_cur)
    return x
