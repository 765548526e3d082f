"""Official Decoupled MeanFlow checkpoints (kyungmnlee/DMF `DMFT`): already flow maps in canonical time.

The file does not store the encoder/decoder split; `--depth` gives it, else a training checkpoint's
`args.dmf_depth`, else DMF's released split (20 for XL/2), else 2/3 of the blocks (docs/checkpoints.md). The
`logvar_linear` head of the adaptive loss is kept (ModelConfig.logvar); QK-norm is DMF's RMSNorm (`q_norm.scale`).
"""

from __future__ import annotations

from ..config import check_depth
from ..errors import FlowmapError
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

RELEASED_DEPTH = {(1152, 28): 20}  # (hidden, blocks) -> dmf_depth of the released DMF-XL/2 models


def default_depth(hidden: int, blocks: int, args: dict) -> tuple[int, str]:
    """The split to use when --depth is not given, and where it came from."""
    if args.get("dmf_depth") is not None:
        return int(args["dmf_depth"]), "the checkpoint's training args"
    if (hidden, blocks) in RELEASED_DEPTH:
        return RELEASED_DEPTH[(hidden, blocks)], "DMF's released XL/2 split"
    return max(1, round(2 * blocks / 3)), "2/3 of the blocks"


@register("dmf")
class DmfFamily(Family):
    """DMFT flow maps: blocks[:depth] see t, the rest and the head see r; a log-variance head."""

    tie_winner = True

    def detect(self, sd: StateDict) -> bool:
        """DiT keys plus DMF's `logvar_linear` head."""
        return has_dit_keys(sd) and "logvar_linear.weight" in sd

    def accepts(self, sd: StateDict) -> bool:
        """A DMFT file saved without its log-variance head (e.g. from a generate-time model) when named as DMF."""
        return has_dit_keys(sd) and not is_learn_sigma(sd)

    def hint(self, meta: Meta) -> bool:
        """DMF training args or a file named like the DMF releases."""
        return "dmf_depth" in (meta.get("args") or {}) or meta.get("name", "").lower().startswith("dmf")

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        """Decoupled FlowMap at the requested (or default) depth."""
        args = options.args
        check_linear_velocity(args, "DMF")
        sd = drop_projectors(sd)
        fields = infer_dit_config(sd, options, args)
        if fields["learn_sigma"] or args.get("pretrained_sigma"):
            # DMF's --pretrained-sigma variant starts from an original-SiT head whose time direction is not documented.
            raise FlowmapError(
                "this DMF checkpoint has a learn_sigma head (DMF's pretrained_sigma training), whose convention flowmap does not know; convert the base SiT instead."
            )
        depth = options.depth
        if depth is None:
            depth, why = default_depth(fields["hidden_size"], fields["num_blocks"], args)
            note(f"DMF depth {depth} ({why}); pass --depth to choose another split")
        check_depth(depth, fields["num_blocks"])
        cfg = {
            **fields,
            "time_convention": "canonical",
            "conditioning": "decoupled",
            "depth": depth,
            "logvar": "logvar_linear.weight" in sd,
        }
        return build_and_load(cfg, sd, options.what or "DMF checkpoint")
