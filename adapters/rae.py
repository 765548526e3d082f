"""RAE DiT^DH stage-2 models (nyu-visionx/RAE-collections) and MF-RAE (sony/mf-rae); layouts in docs/checkpoints.md.

Both are canonical-time models over RAE's DINOv2 latent space [768, 16, 16] (256 px) or [768, 32, 32] (512 px).
RAE becomes a velocity FlowMap on arch "ddt" (convert splits it; the default depth puts the whole DDT head on r);
MF-RAE keeps its own "meanflow" conditioning (an r_embedder of t - r), so it already is a flow map.

Sampling defaults. RAE models get `sampling["shift"] = sqrt(C H W / 4096)` (sqrt(48) = 6.93 at 256 px, sqrt(192) at
512 px), the shift RAE applies to its training times and its sampling grid (docs/conventions.md). RAE's own ODE grid is
shift(1 - linspace(0, 0.999, N)): N - 1 Euler steps that stop at shift(0.001) ~ 0.0069 with no final denoise.
Our grid is shift(linspace(1, 0, nfe + 1)): nfe steps that end exactly at t = 0, so the last step jumps all the way
to data (a flow map's u(x_t, t, 0) is made for that). For a base RAE velocity model at many steps the two agree up
to that last 0.0069 of time; at a few steps ours spends one more step's worth of time on the cleanest end.
MF-RAE samples on an unshifted uniform grid with 1-4 steps, so its default shift is 1.
"""

from __future__ import annotations

import math

from ..config import LatentSpace, ModelConfig
from ..dit import heads_for_hidden
from ..errors import FlowmapError
from . import register
from .dit_keys import block_count, build_and_load
from .interface import NO_OPTIONS, Family, LoadOptions, StateDict

RAE_REPO = "nyu-visionx/RAE-collections"
DINO_ENCODER = "facebook/dinov2-with-registers-base"
# Decoder and normalisation statistics per latent side (docs/checkpoints.md; paths in RAE-collections).
RAE_FILES = {
    16: ("decoders/dinov2/wReg_base/ViTXL_n08/model.pt", "stats/dinov2/wReg_base/imagenet1k/stat.pt", 224),
    32: ("decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt", "stats/dinov2/wReg_base/imagenet1k_512/stat.pt", 448),
}
# Stage-2 checkpoints inside RAE-collections (docs/checkpoints.md), for the alias table / file picking.
RAE_STAGE2 = {
    "DiTDH-XL-256": "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt",
    "DiTDH-S-256": "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt",
    "DiTDH-XL-512": "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-XL_ep400/stage2_model.pt",
    "DiTDH-S-512": "DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-S_ep20/stage2_model.pt",
}


def rae_time_shift(channels: int, side: int, base: int = 4096) -> float:
    """RAE's resolution-dependent shift sqrt(C H W / 4096): sqrt(48) at 256 px, sqrt(192) at 512 px."""
    return math.sqrt(channels * side * side / base)


def unwrap(sd: dict) -> dict:
    """RAE's loader: use 'ema' when present; plain state dicts pass through."""
    if isinstance(sd.get("ema"), dict):
        return sd["ema"]
    return sd


def is_ddt(sd: dict) -> bool:
    """DiT^DH keys: s_embedder (encoder path), x_embedder (head path) and a Gaussian-Fourier t_embedder.W."""
    return "s_embedder.proj.weight" in sd and "x_embedder.proj.weight" in sd and "t_embedder.W" in sd


def ddt_config(sd: dict, options: LoadOptions, meanflow: bool) -> ModelConfig:
    """Architecture from shapes: widths from the embedders, heads from the RoPE tables, flags from key presence."""
    ws = sd["s_embedder.proj.weight"]
    d_e, c, p = ws.shape[0], ws.shape[1], ws.shape[2]
    d_d = sd["x_embedder.proj.weight"].shape[0]
    if p != 1:
        raise FlowmapError(f"this DiT^DH has patch size {p}; flowmap supports RAE's released patch size 1.")
    blocks = list(range(block_count(sd)))  # indices contiguous from 0 and plausible, one pass
    width = lambda i: sd[f"blocks.{i}.adaLN_modulation.1.weight"].shape[1]  # noqa: E731
    if d_e != d_d:
        n_e = sum(1 for i in blocks if width(i) == d_e)
    else:
        n_e = len(blocks) - int(options.decoder_blocks or 2)
    n_d = len(blocks) - n_e
    if n_e < 1 or n_d < 1:
        raise FlowmapError(
            "could not split this DiT^DH into encoder and head blocks; pass `family` and check the file."
        )
    rope = "enc_feat_rope.freqs_cos" in sd
    if rope:
        side = int(round(math.sqrt(sd["enc_feat_rope.freqs_cos"].shape[0])))
        heads_e = d_e // sd["enc_feat_rope.freqs_cos"].shape[1]
        heads_d = d_d // sd["dec_feat_rope.freqs_cos"].shape[1]
    else:
        side = int(round(math.sqrt(sd["pos_embed"].shape[1]))) if "pos_embed" in sd else int(options.input_size or 16)
        heads_e, heads_d = heads_for_hidden(d_e), 16
    heads_e = int(options.num_heads or heads_e)
    rmsnorm = f"blocks.{blocks[0]}.norm1.weight" in sd
    swiglu = f"blocks.{blocks[0]}.mlp.w12.weight" in sd
    wo_shift = sd[f"blocks.{blocks[0]}.adaLN_modulation.1.weight"].shape[0] == 4 * d_e
    hidden = sd["blocks.0.mlp.w3.weight"].shape[1] * 1.5 if swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = round(hidden / d_e * 4) / 4  # SwiGLU hidden = int(2/3 * ratio * D): recover the ratio
    qk = "none"
    if "blocks.0.attn.q_norm.weight" in sd:
        qk = "rms" if rmsnorm else "layernorm"
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    dec_file, stat_file, enc_size = RAE_FILES.get(side, (None, None, side * 14))
    latent = LatentSpace(
        kind="rae",
        channels=c,
        size=side,
        image_channels=3,
        image_size=side * 16,
        repo=options.decoder_repo or RAE_REPO,
        extra={
            "decoder": options.decoder_file or dec_file,
            "stats": options.stats_file or stat_file,
            "encoder": DINO_ENCODER,
            "encoder_input_size": enc_size,
            "eps": 1e-5,
            "layer_norm_eps": 1e-12,
        },
    )
    shift = 1.0 if meanflow else rae_time_shift(c, side)  # MF-RAE samples on a uniform grid
    extra = {
        "decoder_hidden": d_d,
        "decoder_blocks": n_d,
        "decoder_heads": heads_d,
        "rmsnorm": rmsnorm,
        "swiglu": swiglu,
        "rope": rope,
        "wo_shift": wo_shift,
        "pos_embed": "pos_embed" in sd,
    }
    return ModelConfig(
        arch="ddt",
        input_size=side,
        in_channels=c,
        patch_size=1,
        hidden_size=d_e,
        num_blocks=n_e,
        num_heads=heads_e,
        mlp_ratio=mlp_ratio,
        num_classes=rows - 1 if rows > 1 else rows,
        class_embed_rows=rows,
        learn_sigma=False,
        qk_norm=qk,
        time_convention="canonical",
        conditioning="meanflow" if meanflow else "velocity",
        extra=extra,
        latent=latent,
        sampling={"shift": shift},
    )


def build_ddt(sd: dict, options: LoadOptions, meanflow: bool):
    """FlowMap over a DiT^DH state dict, loaded strictly (frozen W, pos_embed and RoPE buffers included)."""
    import dataclasses

    sd = unwrap(sd)
    cfg = ddt_config(sd, options, meanflow)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}  # built on meta, tensors assigned
    return build_and_load(
        fields, sd, options.what or ("the MF-RAE checkpoint" if meanflow else "the RAE DiT^DH checkpoint")
    )


@register("mf-rae")
class MFRAEFamily(Family):
    """sony/mf-rae DiTwDDTHead_MF: DiT^DH plus r_embedder (t - r); loaded as a 'meanflow' flow map."""

    def detect(self, sd: StateDict) -> bool:
        sd = unwrap(sd)
        return is_ddt(sd) and "r_embedder.W" in sd

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        return build_ddt(sd, options, meanflow=True)


@register("rae")
class RAEFamily(Family):
    """bytetriper/RAE DiTwDDTHead (stage 2): a canonical velocity model on arch 'ddt'."""

    def detect(self, sd: StateDict) -> bool:
        sd = unwrap(sd)
        return is_ddt(sd) and "r_embedder.W" not in sd

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        sd = unwrap(sd)
        if "r_embedder.W" in sd:
            raise FlowmapError("this DiT^DH has an r_embedder, so it is an MF-RAE checkpoint; use `family` mf-rae.")
        return build_ddt(sd, options, meanflow=False)
