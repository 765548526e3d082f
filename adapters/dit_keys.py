"""Shared reading of DiT-style state dicts (DiT, SiT, REPA, DMF): infer the architecture from keys and shapes.

Key patterns and shapes: docs/checkpoints.md. Everything `ModelConfig` needs is read from the weights; only the head
count is not stored, so it comes from `--num-heads`, the training args' model name (`SiT-XL/2`), the QK-norm
width, or the standard table by hidden size (`dit.heads_for_hidden`), in that order.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import torch

from ..config import MAX_BLOCKS, SD_VAE_SCALE, LatentSpace, ModelConfig
from ..dit import SIZES, heads_for_hidden
from ..errors import FlowmapError
from ..io import check_keys_and_shapes, load_canonical_state_dict
from ..model import FlowMap
from ..validate import int_in_range
from . import note
from .interface import LoadOptions

REQUIRED = (
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "pos_embed",
)
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# Keys no DiT / SiT / REPA / DMF file has: LightningDiT's RoPE, SwiGLU and RMSNorm (adapters/lightningdit.py) and
# REPA-E's latent BatchNorm (adapters/repae.py).
NOT_DIT = ("feat_rope.freqs_cos", "blocks.0.mlp.w12.weight", "blocks.0.norm1.weight", "bn.running_mean")


def has_dit_keys(sd: dict[str, torch.Tensor]) -> bool:
    """True when the state dict carries the DiT-family backbone keys (blocks may still be legacy-named)."""
    if "s_embedder.proj.weight" in sd or "t_embedder.W" in sd:
        return False  # RAE DiT^DH / MF-RAE (adapters/rae.py): same top-level names, different network
    if getattr(sd.get("x_embedder.proj.weight"), "dim", lambda: 4)() != 4:
        return False  # a Linear patch embedder (MCG-NJU's DDT and its plain DiT): same names, not a conv patchifier
    if any(k in sd for k in NOT_DIT):
        return False  # LightningDiT block options or REPA-E's latent BatchNorm: their own adapters read these
    return all(k in sd for k in REQUIRED) and any(BLOCK_RE.match(k) or k.startswith("decoder_blocks.") for k in sd)


def block_count(sd: dict, pattern: re.Pattern = BLOCK_RE, what: str = "blocks") -> int:
    """Number of blocks named by `pattern` (group 1 = index), in one pass over the keys.

    Indices must run 0..N-1 without gaps and N <= MAX_BLOCKS; anything else is a damaged or foreign file.
    """
    idx = set()
    for k in sd:
        m = pattern.match(k)
        if m:
            text = m.group(1)
            if len(text) > 6 or int(text) >= MAX_BLOCKS:
                raise FlowmapError(
                    f"the checkpoint has the key {k[:80]!r}: more than {MAX_BLOCKS} {what} is not a plausible model; the file is damaged."
                )
            idx.add(int(text))
    if not idx:
        raise FlowmapError(f"the checkpoint has no `{what}.{{i}}` keys; it is not a DiT-style model (check `family`).")
    n = max(idx) + 1
    if len(idx) != n:
        gaps = sorted(set(range(n)) - idx)
        raise FlowmapError(
            f"the checkpoint's {what} indices are not contiguous from 0 (missing {', '.join(map(str, gaps[:4]))}{' ...' if len(gaps) > 4 else ''} below {n - 1}); the file is damaged or holds stray keys."
        )
    return n


def num_blocks(sd: dict[str, torch.Tensor]) -> int:
    """1 + the largest `blocks.{i}` index (indices contiguous from 0, at most MAX_BLOCKS)."""
    return block_count(sd)


def is_learn_sigma(sd: dict[str, torch.Tensor]) -> bool:
    """The head emits 2C channels per pixel (DiT/SiT learn_sigma)."""
    c, p = sd["x_embedder.proj.weight"].shape[1], sd["x_embedder.proj.weight"].shape[2]
    return sd["final_layer.linear.weight"].shape[0] == p * p * 2 * c


def heads_from_args(args: dict[str, Any]) -> int | None:
    """Head count from a training args model name such as 'SiT-XL/2' or 'DMFT-XL/2'."""
    name = str(args.get("model", "") or "")
    m = re.search(r"-(S|B|M|L|XL)/\d+$", name)
    return SIZES[m.group(1)][2] if m else None


def infer_dit_config(
    sd: dict[str, torch.Tensor], options: LoadOptions, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ModelConfig fields of a DiT-style state dict (already renamed to `blocks.{i}` and stripped of extras).

    The one DiT architecture inference: DiT, SiT, REPA, DMF and diffusers DiT (after renaming) all use it.
    """
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        raise FlowmapError(
            f"the checkpoint lacks DiT keys {missing[:3]}; it is not a DiT/SiT/REPA/DMF model (check `family`)."
        )
    args = args or {}
    w = sd["x_embedder.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise FlowmapError(
            f"x_embedder.proj.weight has shape {tuple(w.shape)}, not [D, C, p, p]; the checkpoint is not a DiT-style model."
        )
    hidden, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    if sd["pos_embed"].dim() < 2 or sd["final_layer.linear.weight"].dim() != 2:
        raise FlowmapError("pos_embed or final_layer.linear.weight has the wrong rank; the checkpoint is damaged.")
    if sd["y_embedder.embedding_table.weight"].dim() != 2:
        raise FlowmapError("y_embedder.embedding_table.weight is not a matrix; the checkpoint is damaged.")
    tokens = int(sd["pos_embed"].shape[-2])
    grid = int(round(tokens**0.5))
    if grid * grid != tokens:
        raise FlowmapError(
            f"pos_embed has {tokens} tokens, not a square grid; the checkpoint is not a DiT-style image model."
        )
    out_rows = int(sd["final_layer.linear.weight"].shape[0])
    if out_rows % (patch * patch):
        raise FlowmapError(
            f"final_layer.linear has {out_rows} rows, not a multiple of patch^2={patch * patch}; the checkpoint is damaged."
        )
    out_channels = out_rows // (patch * patch)
    if out_channels not in (channels, 2 * channels):
        raise FlowmapError(
            f"the head emits {out_channels} channels for {channels} input channels; expected {channels} or {2 * channels} (learn_sigma)."
        )
    n = num_blocks(sd)
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    # The class table has K + 1 rows when a null label exists (class dropout > 0, docs/checkpoints.md); training
    # args name K when present, otherwise the standard layout (null row last) is assumed.
    num_classes = args.get("num_classes", rows - 1) or rows - 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes not in (rows, rows - 1):
        num_classes = rows - 1
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_hidden = int(fc1.shape[0]) if fc1 is not None and fc1.dim() >= 1 else 4 * hidden
    if "blocks.0.attn.q_norm.scale" in sd:
        qk_norm = "rms"  # DMF RMSNorm (param `scale`)
    elif "blocks.0.attn.q_norm.weight" in sd:
        qk_norm = "layernorm"  # timm LayerNorm (REPA/DMF-SiT qk_norm=True)
    else:
        qk_norm = "none"
    heads = options.num_heads
    norm_width = None
    for key in ("blocks.0.attn.q_norm.scale", "blocks.0.attn.q_norm.weight"):
        if key in sd:
            norm_width = int(sd[key].shape[0]) if sd[key].dim() >= 1 else 0  # the head dimension hd = D / H
    if heads is None:
        if norm_width:
            heads = max(1, hidden // norm_width)  # the QK-norm weight has one entry per head dimension
        elif heads_from_args(args):
            heads = heads_from_args(args)
        else:
            heads = heads_for_hidden(hidden)
            if hidden not in {d for d, _, _ in SIZES.values()}:
                note(
                    f"hidden size {hidden} is not a standard DiT size: assuming {heads} heads of 64; pass --num-heads if that is wrong"
                )
    heads = int_in_range("`num_heads`", heads, 1, 4096)
    if hidden < 1 or hidden % heads:
        raise FlowmapError(
            f"`num_heads` {heads} does not divide the hidden size {hidden} (not divisible); pass a head count that does."
        )
    if norm_width is not None and hidden // heads != norm_width:
        raise FlowmapError(
            f"the QK-norm width {norm_width} implies {hidden // norm_width} heads, not {heads}; drop `num_heads` or pass {hidden // norm_width}."
        )
    input_size = grid * patch
    return dict(
        arch="dit",
        input_size=input_size,
        in_channels=channels,
        patch_size=patch,
        hidden_size=hidden,
        num_blocks=n,
        num_heads=heads,
        mlp_ratio=mlp_hidden / hidden,
        num_classes=num_classes,
        class_embed_rows=rows,
        learn_sigma=out_channels == 2 * channels,
        qk_norm=qk_norm,
        latent=latent_for(channels, input_size),
    )


def drop_projectors(sd: dict) -> dict:
    """Remove REPA's projector MLPs (training-only heads aligned with DINOv2 features)."""
    dropped = [k for k in sd if k.startswith("projectors.")]
    if dropped:
        note(f"dropped {len(dropped)} REPA projector tensors (projectors.*): they are training-only alignment heads")
    return {k: v for k, v in sd.items() if not k.startswith("projectors.")}


def check_linear_velocity(args: dict[str, Any], family: str) -> None:
    """Refuse training args that say the model is not a linear-path velocity model (cosine/GVP/VP paths, eps/score)."""
    path = str(args.get("path_type", "linear") or "linear").lower()
    pred = str(args.get("prediction", "v") or "v").lower()
    if path != "linear":
        raise FlowmapError(
            f"this {family} checkpoint was trained on the {path!r} path; flowmap converts linear-path models only (x_t = (1 - t) x0 + t eps)."
        )
    if pred not in ("v", "velocity"):
        raise FlowmapError(
            f"this {family} checkpoint predicts {pred!r}, not a velocity; flowmap converts velocity-prediction models only."
        )


def latent_for(channels: int, input_size: int) -> LatentSpace:
    """SD-VAE latents for 4-channel ImageNet models (docs/checkpoints.md); pixels otherwise."""
    if channels == 4:
        return LatentSpace(
            kind="sd-vae",
            channels=4,
            size=input_size,
            image_channels=3,
            image_size=8 * input_size,
            repo="stabilityai/sd-vae-ft-ema",
            scale=SD_VAE_SCALE,
        )
    return LatentSpace(
        kind="identity", channels=channels, size=input_size, image_channels=channels, image_size=input_size
    )


@contextmanager
def _no_weight_init():
    """Skip weight initialisation while a module is built on the meta device (the checkpoint's tensors replace it).

    Initialising meta tensors computes nothing, but `normal_` on meta runs through torch._refs, whose first call
    imports torch._dynamo: 3-9 s of a conversion on two cores.
    """
    import torch.nn.init as init

    names = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_")
    names += ("xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")
    saved = {n: getattr(init, n) for n in names if hasattr(init, n)}
    classes = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d, torch.nn.LayerNorm)
    own = {cls: vars(cls).get("reset_parameters") for cls in classes}
    try:
        for n in saved:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        for cls in classes:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)
        for cls, fn in own.items():
            if fn is None:
                delattr(cls, "reset_parameters")
            else:
                cls.reset_parameters = fn


def build_and_load(cfg_fields: dict[str, Any], sd: dict[str, torch.Tensor], what: str):
    """Instantiate a FlowMap from config fields and load the canonical state dict strictly (fp32, CPU).

    The module is built on the meta device and the checkpoint tensors are assigned into it, which skips the
    random initialisation (15 s for XL/2 on two cores) that the load would overwrite anyway.
    """
    cfg = ModelConfig(**cfg_fields)
    with torch.device("meta"), _no_weight_init():
        model = FlowMap(cfg)
    own = model.state_dict()  # once: rebuilding it per key made loading quadratic in the number of tensors
    names = {k[len("net.") :] if k.startswith("net.") else k: k for k in own}
    check_keys_and_shapes(sd, {c: own[k].shape for c, k in names.items()}, what)
    state = {names[k]: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}  # fp32 on load
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a non-persistent buffer stayed unmaterialised
        model = FlowMap(cfg)
        load_canonical_state_dict(model, sd, what)
    return model.eval()
