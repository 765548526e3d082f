"""The latent-diffusion AutoencoderKL (CompVis layout) that VA-VAE and REPA-E's E2E-VAEs ship (docs/checkpoints.md).

Keys: `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`. Every size is read from the weights: the base width
from `decoder.conv_out`, the level widths from each level's first ResNet block, the ResNet count per level, and which
levels carry attention (LDM puts self-attention at the 16-px level of a 256-px model: the last level of f16d32, none
in f8d4). GroupNorm(32, eps 1e-6), swish, nearest x2 upsampling, stride-2 convs after a (0, 1, 0, 1) zero pad.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FlowmapError
from .io import check_keys_and_shapes


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm-swish-conv twice with a 1x1 `nin_shortcut` when the width changes (no time embedding)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """Single-head attention over pixels with 1x1-conv q, k, v and proj_out; residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(o.transpose(1, 2).reshape(b, c, hh, ww))


class _Level(nn.Module):
    """One resolution level: `block` (ResNets), `attn` (possibly empty), optional `downsample` / `upsample`."""

    def __init__(self, widths: list[tuple[int, int]], attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(a, b) for a, b in widths)
        self.attn = nn.ModuleList(SpatialAttention(b) for _, b in widths) if attn else nn.ModuleList()

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Resample(nn.Module):
    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=0 if stride == 2 else 1)


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResBlock(ch, ch), SpatialAttention(ch), ResBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, base: int, widths: list[int], blocks: int, attn: list[bool], z: int, in_ch: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down = nn.ModuleList()
        cin = base
        for i, w in enumerate(widths):
            level = _Level([(cin if j == 0 else w, w) for j in range(blocks)], attn[i])
            cin = w
            if i != len(widths) - 1:
                level.downsample = _Resample(cin, 2)
            self.down.append(level)
        self.mid = _mid(cin)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, base: int, widths: list[int], blocks: int, attn: list[bool], z: int, out_ch: int = 3):
        super().__init__()
        cin = base
        self.conv_in = nn.Conv2d(z, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels = []
        for i in reversed(range(len(widths))):
            level = _Level([(cin if j == 0 else widths[i], widths[i]) for j in range(blocks + 1)], attn[i])
            cin = widths[i]
            if i != 0:
                level.upsample = _Resample(cin, 1)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))  # up[i] is level i, run from the last level down to 0
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def _arch(sd: dict, side: str) -> dict:
    """(base, widths, blocks, attn per level, z) of `side` ('encoder' / 'decoder') from its keys."""
    levels = {}
    key = "down" if side == "encoder" else "up"
    pat = re.compile(rf"^{side}\.{key}\.(\d+)\.(block|attn)\.(\d+)\.")
    for k in sd:
        m = pat.match(k)
        if m:
            lv = levels.setdefault(int(m.group(1)), {"block": set(), "attn": set()})
            lv[m.group(2)].add(int(m.group(3)))
    if not levels or sorted(levels) != list(range(len(levels))):
        raise FlowmapError(
            f"the VAE file has no contiguous `{side}.{key}.{{i}}` levels; it is not an LDM AutoencoderKL."
        )
    n = len(levels)
    widths = [int(sd[f"{side}.{key}.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)]
    base = int(sd[f"{side}.conv_in.weight"].shape[0])  # encoder: the stem width; decoder: the deepest width
    blocks = len(levels[0]["block"]) - (1 if side == "decoder" else 0)
    attn = [bool(levels[i]["attn"]) for i in range(n)]
    if side == "encoder":
        z = int(sd["encoder.conv_out.weight"].shape[0]) // 2
    else:
        z = int(sd["decoder.conv_in.weight"].shape[1])
    return {"base": base, "widths": widths, "blocks": blocks, "attn": attn, "z": z}


class AutoencoderKL(nn.Module):
    """decode(z) = decoder(post_quant_conv(z)); encode(x) = (mean, logvar) of quant_conv(encoder(x)), logvar clamped."""

    def __init__(self, decoder_arch: dict, encoder_arch: dict | None = None):
        super().__init__()
        a = decoder_arch
        self.decoder = Decoder(a["base"], a["widths"], a["blocks"], a["attn"], a["z"])
        self.post_quant_conv = nn.Conv2d(a["z"], a["z"], 1)
        if encoder_arch is not None:
            e = encoder_arch
            self.encoder = Encoder(e["base"], e["widths"], e["blocks"], e["attn"], e["z"])
            self.quant_conv = nn.Conv2d(2 * e["z"], 2 * e["z"], 1)
        else:
            self.encoder = self.quant_conv = None

    @classmethod
    def from_state_dict(cls, sd: dict, what: str, with_encoder: bool = True) -> AutoencoderKL:
        """Architecture from the keys, then a strict load of the autoencoder's own tensors (losses etc. dropped)."""
        own = ("decoder.", "post_quant_conv.") + (("encoder.", "quant_conv.") if with_encoder else ())
        sd = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(own)}
        try:
            net = cls(_arch(sd, "decoder"), _arch(sd, "encoder") if with_encoder else None)
        except KeyError as e:
            raise FlowmapError(f"{what} lacks {e.args[0]}; it is not an LDM AutoencoderKL checkpoint.") from None
        check_keys_and_shapes(sd, {k: v.shape for k, v in net.state_dict().items()}, what)
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return net.eval()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise FlowmapError("this VAE was loaded without its encoder; load it with the encoder to encode images.")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)
