"""LightningDiT checkpoints (hustvl/LightningDiT; docs/checkpoints.md): SiT's transport on VA-VAE f16d32 latents.

Keys are DiT's (`x_embedder`, `t_embedder.mlp`, `y_embedder`, `pos_embed`, `blocks.{i}`, `final_layer`) plus what
the LightningDiT block options leave in the weights: `blocks.{i}.mlp.w12/w3` (SwiGLU), `blocks.{i}.norm1.weight`
and `final_layer.norm_final.weight` (RMSNorm), `feat_rope.freqs_cos/sin` (2-D RoPE, persistent buffers),
`attn.q_norm` (QK-norm) and a 4D-wide `adaLN_modulation` (wo_shift). Each option is read from those keys.

Time: SiT's (t = 0 noise, t = 1 data, the network returns data - noise), i.e. the "reversed" convention.
A LightningDiT trained with every option off has exactly SiT's / REPA's keys and is not told apart by its weights:
such a file is read as LightningDiT only through the alias, its training args or `--family lightningdit`.

Sampling defaults (configs/reproductions/*_cfg.yaml, inference.py): Euler on linspace(0, 1, N) in SiT time with
timestep_shift s = 0.3, t' = s t / (1 + (s - 1) t). In canonical time (t_c = 1 - t) that is flowmap's shifted grid
with shift 1 / s, so `sampling["shift"] = 1 / 0.3` and N - 1 flowmap steps reproduce their N-point grid. Their CFG
(scale 6.7 for 800 epochs, 10.0 for 64; applied while t_SiT >= 0.125, resp. 0.11, i.e. canonical t <= 0.875) is
recorded under `sampling["source_guidance"]`; `forward_with_cfg` guides only the first 3 of the 32 latent channels,
which flowmap's sampler does not imitate, so the default stays unguided (cfg_scale 1) and the official values are
there for a user to pass on purpose.
"""

from __future__ import annotations

import math

from ..config import LatentSpace
from ..dit import heads_for_hidden
from ..errors import FlowmapError
from ..validate import int_in_range
from . import register
from .dit_keys import block_count, build_and_load
from .interface import NO_OPTIONS, Family, LoadOptions

VAVAE_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_FILE = "vavae-imagenet256-f16d32-dinov2.pt"
VAVAE_STATS = "latents_stats.pt"
SIT_SHIFT = 0.3  # timestep_shift of the released configs, in SiT time
# Official CFG per release (configs/reproductions); cfg_channels = 3 is forward_with_cfg's channel slice.
SOURCE_GUIDANCE = {
    "800ep": {"cfg_scale": 6.7, "guidance_low": 0.0, "guidance_high": 1 - 0.125, "cfg_channels": 3},
    "64ep": {"cfg_scale": 10.0, "guidance_low": 0.0, "guidance_high": 1 - 0.11, "cfg_channels": 3},
}
BASE_KEYS = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "pos_embed",
    "blocks.0.attn.qkv.weight",
)


def lightning_features(sd: dict) -> list[str]:
    """The LightningDiT-only options these weights carry (empty for a file with SiT's exact key set)."""
    found = []
    if "feat_rope.freqs_cos" in sd:
        found.append("rope")
    if "blocks.0.mlp.w12.weight" in sd:
        found.append("swiglu")
    if "blocks.0.norm1.weight" in sd and "s_embedder.proj.weight" not in sd:
        found.append("rmsnorm")
    w = sd.get("blocks.0.adaLN_modulation.1.weight")
    x = sd.get("x_embedder.proj.weight")
    if w is not None and x is not None and w.dim() == 2 and w.shape[0] == 4 * x.shape[0]:
        found.append("wo_shift")
    return found


def has_base_keys(sd: dict) -> bool:
    """DiT's top-level keys, and none of DiT^DH's (RAE, adapters/rae.py)."""
    return all(k in sd for k in BASE_KEYS) and "s_embedder.proj.weight" not in sd and "t_embedder.W" not in sd


def lightning_config(sd: dict, options: LoadOptions) -> dict:
    """ModelConfig fields from shapes and key presence."""
    w = sd["x_embedder.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise FlowmapError(f"x_embedder.proj.weight has shape {tuple(w.shape)}, not [D, C, p, p]; the file is damaged.")
    d, c, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(sd["pos_embed"].shape[-2])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise FlowmapError(f"pos_embed has {tokens} tokens, not a square grid; the file is not a LightningDiT.")
    n = block_count(sd)
    feats = lightning_features(sd)
    rope, swiglu, rmsnorm, wo_shift = ("rope" in feats, "swiglu" in feats, "rmsnorm" in feats, "wo_shift" in feats)
    heads = options.num_heads
    if heads is None and "blocks.0.attn.q_norm.weight" in sd:
        heads = d // int(sd["blocks.0.attn.q_norm.weight"].shape[0])
    if heads is None and rope:
        heads = d // int(sd["feat_rope.freqs_cos"].shape[-1])  # the RoPE table is one head wide
    heads = int_in_range("num_heads", heads if heads is not None else heads_for_hidden(d), 1, 4096)
    if d % heads:
        raise FlowmapError(f"`num_heads` {heads} does not divide the hidden size {d}; pass a head count that does.")
    if swiglu:
        hidden = int(sd["blocks.0.mlp.w3.weight"].shape[1]) * 1.5  # SwiGLU width int(2/3 * ratio * D)
    else:
        hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    mlp_ratio = round(hidden / d * 4) / 4
    qk = "none"
    if "blocks.0.attn.q_norm.weight" in sd:
        qk = "rms" if rmsnorm else "layernorm"
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    out_rows = int(sd["final_layer.linear.weight"].shape[0])
    if out_rows not in (p * p * c, 2 * p * p * c):
        raise FlowmapError(
            f"final_layer.linear has {out_rows} rows for {c} channels at patch {p}; the file is damaged."
        )
    return dict(
        arch="lightningdit",
        input_size=grid * p,
        in_channels=c,
        patch_size=p,
        hidden_size=d,
        num_blocks=n,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=rows - 1 if rows > 1 else rows,
        class_embed_rows=rows,
        learn_sigma=out_rows == 2 * p * p * c,
        qk_norm=qk,
        time_convention="reversed",
        conditioning="velocity",
        extra={"rmsnorm": rmsnorm, "swiglu": swiglu, "rope": rope, "wo_shift": wo_shift},
    )


def vavae_latent(channels: int, size: int) -> LatentSpace:
    """VA-VAE f16d32 with its channel statistics (latents_stats.pt); other widths: pixels or nothing to decode."""
    if channels == 32:
        return LatentSpace(
            kind="ldm-vae",
            channels=32,
            size=size,
            image_channels=3,
            image_size=16 * size,
            repo=VAVAE_REPO,
            extra={"checkpoint": VAVAE_FILE, "stats": VAVAE_STATS, "stats_format": "mean-std"},
        )
    return LatentSpace(kind="identity", channels=channels, size=size, image_channels=channels, image_size=size)


def release_of(options: LoadOptions) -> str:
    """Which release's guidance applies ('64ep' when the source names it, else '800ep')."""
    info = options.source_info or {}
    text = " ".join(str(info.get(k, "")) for k in ("source", "repo", "file")) + " " + str(options.what or "")
    return "64ep" if "64ep" in text.lower() else "800ep"


@register("lightningdit")
class LightningDiTFamily(Family):
    """hustvl/LightningDiT: SiT-time velocity model, LightningDiT blocks (arch 'lightningdit')."""

    name = "lightningdit"

    def detect(self, sd) -> bool:
        """DiT's keys plus at least one LightningDiT-only option (RoPE, SwiGLU, RMSNorm, adaLN without shift)."""
        return has_base_keys(sd) and bool(lightning_features(sd))

    def accepts(self, sd) -> bool:
        """Any DiT-style file (every option off = SiT's keys): read as LightningDiT when a hint says so."""
        return has_base_keys(sd)

    def hint(self, meta) -> bool:
        """LightningDiT training args (its block switches) or a file named after it."""
        args = meta.get("args") or {}
        model = args.get("model") if isinstance(args.get("model"), dict) else {}
        switches = ("use_swiglu", "use_rope", "use_rmsnorm", "wo_shift")
        return any(k in args or k in model for k in switches) or "lightningdit" in str(meta.get("name", "")).lower()

    def build(self, sd, options):
        """Infer the architecture, attach VA-VAE latents and sampling defaults, load strictly."""
        options = options or NO_OPTIONS
        if "bn.running_mean" in sd:
            raise FlowmapError(
                "this file has a latent BatchNorm (`bn.*`), so it is a REPA-E SiT, not a LightningDiT; use `family` repa-e."
            )
        fields = lightning_config(sd, options)
        fields["latent"] = vavae_latent(fields["in_channels"], fields["input_size"])
        fields["sampling"] = {
            "shift": 1.0 / SIT_SHIFT,
            "cfg_scale": 1.0,
            "source_guidance": dict(SOURCE_GUIDANCE[release_of(options)]),
            "source_sampler": "euler, 250 points on linspace(0, 1) in SiT time, timestep_shift 0.3",
        }
        return build_and_load(fields, sd, options.what or "the LightningDiT checkpoint")
