"""REPA SiT checkpoints (sihyun-yu/REPA; also DMF's base SiT-XL/2+REPA): canonical time, v = eps - x0.

Released files are plain state dicts, training files `{'model','ema','opt','args','steps'}` (docs/checkpoints.md).
REPA's `projectors.*` (the representation-alignment MLPs) are not part of the velocity model and are dropped
with a note; legacy `decoder_blocks.{i}` keys become `blocks.{i + encoder_depth}` (as REPA's own legacy loader renames them).
"""

from __future__ import annotations

import re

from ..config import MAX_BLOCKS
from ..errors import FlowmapError
from ..validate import int_in_range
from . import note, register
from .dit_keys import (
    build_and_load,
    check_linear_velocity,
    drop_projectors,
    has_dit_keys,
    infer_dit_config,
    is_learn_sigma,
)
from .interface import NO_OPTIONS, Family, LoadOptions, Meta, StateDict

LEGACY_RE = re.compile(r"^decoder_blocks\.(\d+)\.(.*)$")


def rename_legacy(sd: dict, encoder_depth: int | None) -> dict:
    """`decoder_blocks.{i}.*` -> `blocks.{i + encoder_depth}.*` (the old split encoder/decoder naming)."""
    if not any(LEGACY_RE.match(k) for k in sd):
        return sd
    if encoder_depth is None:
        raise FlowmapError(
            "this REPA checkpoint uses legacy `decoder_blocks.*` keys and carries no encoder depth; pass `encoder_depth` (REPA's default is 8)."
        )
    enc = sum(1 for k in sd if re.match(r"^blocks\.\d+\.attn\.qkv\.weight$", k))
    if enc != encoder_depth:
        raise FlowmapError(
            f"the legacy checkpoint has {enc} encoder blocks but `encoder_depth` is {encoder_depth}; pass `encoder_depth` {enc}."
        )
    out = {}
    for k, v in sd.items():
        m = LEGACY_RE.match(k)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k] = v
    note(f"renamed legacy decoder_blocks.* to blocks.{encoder_depth}.. (encoder_depth {encoder_depth})")
    return out


@register("repa")
class RepaFamily(Family):
    """REPA / DMF-SiT velocity models: canonical convention, no learn_sigma, optional timm-LayerNorm QK-norm."""

    tie_winner = True  # a plain canonical DiT-style file is read as REPA unless something says otherwise

    def detect(self, sd: StateDict) -> bool:
        """DiT keys, a C-channel head and no DMF log-variance head."""
        return has_dit_keys(sd) and "logvar_linear.weight" not in sd and not is_learn_sigma(sd)

    def hint(self, meta: Meta) -> bool:
        """REPA training args (encoder, projection loss) or a file named after REPA."""
        args = meta.get("args") or {}
        return (
            any(k in args for k in ("enc_type", "proj_coeff", "encoder_depth", "repa_depth"))
            or "repa" in meta.get("name", "").lower()
        )

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        """Drop projectors, undo legacy naming, infer the architecture and load strictly."""
        args = options.args
        check_linear_velocity(args, "REPA")
        sd = drop_projectors(sd)
        enc = options.encoder_depth or args.get("encoder_depth")
        sd = rename_legacy(sd, int_in_range("encoder_depth", enc, 1, MAX_BLOCKS) if enc is not None else None)
        fields = infer_dit_config(sd, options, args)
        if fields["learn_sigma"]:
            raise FlowmapError(
                "this checkpoint has a learn_sigma head (2C output channels), which REPA models do not have; use `family` sit or `family` dit."
            )
        return build_and_load({**fields, "time_convention": "canonical"}, sd, options.what or "REPA checkpoint")
