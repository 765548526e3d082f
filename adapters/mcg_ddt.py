"""MCG-NJU's DDT (Decoupled Diffusion Transformer; MCG-NJU/DDT-XL-22en6de-R256 / -R512), docs/checkpoints.md.

Released files are Lightning checkpoints: `ckpt["state_dict"]` holds `ema_denoiser.*` (taken by default) and
`denoiser.*` (weights "model"); checkpoint.py picks one and strips the prefix. The network (class `DDT`) is N blocks
of one width: blocks [0, N_e) encode s_embedder(x) under c = silu(te(t) + ye(y)), blocks [N_e, N) decode
x_embedder(x) modulated token-wise by silu(te(t) + s). Nothing in the weights says N_e, the latent side or the
channel / patch split of the patch embedder, so they come from, in order: the caller's options
(`encoder_depth`, `input_size`, `in_channels`), the file's or repository's name
(`22en6de`, `R256` / `R512`), then the released model (N_e = 22 of 28, 256 px, SD-VAE's 4 channels), each
announced on stderr.

Conventions (DDT's LinearScheduler): x_t = t x0 + (1 - t) eps, so t = 0 is noise, and the network returns
x0 - eps: flowmap's "reversed" convention. Sampling defaults from DDT's configs: shift 1, CFG 2.0 (256 px) or 3.0
(512 px) applied for DDT times t in (0.3, 1), i.e. canonical t in [0, 0.7], over Euler steps.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import ModelConfig
from ..errors import FlowmapError
from . import note, register
from .dit_keys import block_count, build_and_load, latent_for
from .interface import NO_OPTIONS, Family, LoadOptions

SD_CHANNELS = 4  # DDT trains on SD-VAE ft-ema latents (configs/*.yaml `in_channels: 4`)
RELEASED_ENCODER_BLOCKS = {28: 22}  # DDT-XL/2 22en6de, the released models
CFG_BY_SIDE = {32: 2.0, 64: 3.0}  # configs/repa_improved_ddt_xlen22de6_{256,512}.yaml `guidance`
GUIDANCE_INTERVAL = (0.0, 0.7)  # DDT guides for its t in (0.3, 1.0); canonical t = 1 - DDT's t
EN_DE_RE = re.compile(r"(?i)(\d{1,4})en(\d{1,4})de")
RES_RES = (  # "R256" / "r512" (the releases' suffix), then a bare 256 / 512
    re.compile(r"(?i)(?:^|[^0-9a-z])r(\d{2,4})(?![0-9])"),
    re.compile(r"(?:^|[^0-9a-z])(256|512)(?![0-9])"),
)


def is_mcg_ddt(sd: dict) -> bool:
    """DDT's own key set: Linear patch embedders for x and s, a sinusoidal t_embedder, bias-free SwiGLU `w1/w2/w3`."""
    ws, wx = sd.get("s_embedder.proj.weight"), sd.get("x_embedder.proj.weight")
    return (
        isinstance(ws, torch.Tensor)
        and isinstance(wx, torch.Tensor)
        and ws.dim() == 2
        and wx.dim() == 2
        and "t_embedder.mlp.0.weight" in sd
        and "t_embedder.W" not in sd
        and "blocks.0.mlp.w1.weight" in sd
        and "blocks.0.adaLN_modulation.0.weight" in sd
    )


def _names(options: LoadOptions) -> list[str]:
    """Where the weights came from, file name first: path parts up to a Hub cache's models--owner--name (at most 6)."""
    parts: list[str] = []
    for part in reversed(re.split(r"[/\\]", str(options.what or ""))):
        if not part or re.fullmatch(r"[0-9a-f]{40}", part):  # a snapshot commit's hex could read as a number
            continue
        parts.append(part)
        if part.startswith("models--") or len(parts) == 6:
            break
    return parts


def encoder_blocks(n: int, options: LoadOptions) -> int:
    """N_e from `encoder_depth`, the training args, a `<N_e>en<N_d>de` name, or the released 22 of 28."""
    args = options.args or {}
    given = options.encoder_depth or args.get("num_encoder_blocks")
    if given is not None:
        ne, why = int(given), "the given encoder depth"
    else:
        found = [m for part in _names(options) for m in EN_DE_RE.finditer(part)]
        if found:
            ne, nd = int(found[0].group(1)), int(found[0].group(2))
            if ne + nd != n:
                raise FlowmapError(
                    f"the file is named {found[0].group(0)} but holds {n} blocks, not {ne + nd}; pass `encoder_depth`."
                )
            why = f"the name {found[0].group(0)}"
        elif n in RELEASED_ENCODER_BLOCKS:
            ne = RELEASED_ENCODER_BLOCKS[n]
            why = f"the released DDT-XL/2 {ne}en{n - ne}de"
        else:
            raise FlowmapError(
                f"this DDT has {n} blocks and nothing says how many form its condition encoder; pass `encoder_depth` "
                "(22 for the released 28-block DDT-XL/2)."
            )
    if not 1 <= ne < n:
        raise FlowmapError(f"`encoder_depth` {ne} is out of range for a DDT with {n} blocks; choose 1 to {n - 1}.")
    note(f"DDT: {ne} encoder + {n - ne} decoder blocks (from {why})")
    return ne


def latent_side(options: LoadOptions) -> int:
    """Latent side: `input_size` option, else R256 / R512 in the file or repository name, else 32 (256 px)."""
    if options.input_size is not None:
        return int(options.input_size)
    for part, pattern in ((part, pattern) for pattern in RES_RES for part in _names(options)):
        m = pattern.search(part)
        if m and int(m.group(1)) % 8 == 0:
            note(
                f"DDT: {m.group(1)} px images ({int(m.group(1)) // 8}x{int(m.group(1)) // 8} latents) from the name {part!r}"
            )
            return int(m.group(1)) // 8
    note(
        "DDT: the weights do not record the resolution; assuming 256 px (32x32 SD-VAE latents), as DDT-XL-22en6de-R256 "
        "(for a 512-px model, put R512 in the file name)"
    )
    return 32


def ddt_config(sd: dict, options: LoadOptions):
    """ModelConfig from shapes (width, heads from the QK-norm, SwiGLU hidden, classes) and the options above."""
    d, cpp = sd["s_embedder.proj.weight"].shape
    c = int(options.in_channels or SD_CHANNELS)
    p = math.isqrt(max(cpp // c, 1))
    if c * p * p != cpp:
        raise FlowmapError(
            f"the patch embedder reads {cpp} features, not {c} channels times a square patch; pass `in_channels`."
        )
    n = block_count(sd)
    ne = encoder_blocks(n, options)
    head_dim = sd["blocks.0.attn.q_norm.weight"].shape[0]
    heads = d // head_dim
    if options.num_heads and int(options.num_heads) != heads:
        raise FlowmapError(
            f"this DDT's QK-norm has head size {head_dim}, so it has {heads} heads, not {options.num_heads}; drop `num_heads`."
        )
    hidden = sd["blocks.0.mlp.w1.weight"].shape[0]
    ratio = round(hidden * 1.5 / d * 4) / 4  # FeedForward hidden = int(2 * int(D * ratio) / 3)
    if int(2 * int(d * ratio) / 3) != hidden:
        raise FlowmapError(
            f"this DDT's feed-forward width {hidden} fits no mlp ratio of hidden size {d}; check the file."
        )
    side = latent_side(options)
    if side % p:
        raise FlowmapError(f"a {side}x{side} latent does not split into {p}x{p} patches; pass `input_size`.")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    return ModelConfig(
        arch="mcg-ddt",
        input_size=side,
        in_channels=c,
        patch_size=p,
        hidden_size=d,
        num_blocks=n,
        num_heads=heads,
        mlp_ratio=ratio,
        num_classes=rows - 1 if rows > 1 else rows,
        class_embed_rows=rows,
        learn_sigma=False,
        qk_norm="rms",
        time_convention="reversed",
        conditioning="velocity",
        extra={"encoder_blocks": ne},
        latent=latent_for(c, side),
        sampling={
            "shift": 1.0,
            "cfg_scale": CFG_BY_SIDE.get(side, 2.0),
            "guidance_low": GUIDANCE_INTERVAL[0],
            "guidance_high": GUIDANCE_INTERVAL[1],
        },
    )


def canonical_keys(sd: dict, cfg) -> dict:
    """DDT's keys -> MCGDDT's: conv-shaped patch embedders, stacked [w1; w3], w2 -> w3, adaLN `.0.` -> `.1.`."""
    c, p = cfg.in_channels, cfg.patch_size
    out = {}
    for k, v in sd.items():
        if k in ("x_embedder.proj.weight", "s_embedder.proj.weight"):
            out[k] = v.reshape(v.shape[0], c, p, p)  # unfold's (c, kh, kw) feature order is the conv weight's
        elif k.endswith(".mlp.w1.weight"):
            w3 = sd.get(k[: -len("w1.weight")] + "w3.weight")
            if w3 is None:
                raise FlowmapError(f"the checkpoint has {k} but no matching w3; the file is damaged.")
            out[k[: -len("w1.weight")] + "w12.weight"] = torch.cat([v, w3], dim=0)
        elif k.endswith(".mlp.w3.weight"):
            continue  # stacked with w1 above
        elif k.endswith(".mlp.w2.weight"):
            out[k[: -len("w2.weight")] + "w3.weight"] = v
        elif ".adaLN_modulation.0." in k:
            out[k.replace(".adaLN_modulation.0.", ".adaLN_modulation.1.")] = v
        else:
            out[k] = v
    return out


@register("ddt")
class DDTFamily(Family):
    """MCG-NJU/DDT `DDT` (condition encoder + velocity decoder): a velocity model in reversed time on arch 'mcg-ddt'."""

    name = "ddt"

    def detect(self, sd: dict) -> bool:
        return is_mcg_ddt(sd)

    def hint(self, meta: dict) -> bool:
        """Training args naming DDT's encoder split, or a file named like the releases (`…22en6de…`)."""
        args = meta.get("args") or {}
        return "num_encoder_blocks" in args or bool(EN_DE_RE.search(meta.get("name", "")))

    def build(self, sd: dict, options: LoadOptions):
        import dataclasses

        if not is_mcg_ddt(sd):
            raise FlowmapError(
                "the weights are not a DDT (MCG-NJU/DDT) state dict: it needs Linear x/s embedders, blocks.{i}.mlp.w1 and adaLN_modulation.0; check `family`."
            )
        options = options or NO_OPTIONS
        cfg = ddt_config(sd, options)
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        return build_and_load(fields, canonical_keys(sd, cfg), options.what or "the DDT checkpoint")
