"""Original SiT checkpoints (willisma/SiT): reversed time (t=1 data) and velocity x0 - eps (docs/conventions.md).

The released SiT-XL/2 has a learn_sigma head (2C channels). The head is kept whole: final_layer.linear rows are
ordered (p, q, c) with c fastest, so unpatchifying all 2C channels and keeping the first C (the model's
`raw[:, :C]`) is exactly SiT's `x.chunk(2, dim=1)[0]`. The convention is translated by
ModelConfig.time_convention = "reversed": t_sit = 1 - t and v = -v_sit.

SiT vs DiT: both ship learn_sigma heads under identical key names, so weights alone cannot tell a velocity model
(SiT) from an epsilon model (DiT). Decision: never guess. A release file name (`SiT-XL-2-256x256.pt`), training
args (`path_type` without REPA/DMF options, or `model='SiT-*'`) or the alias (`willisma/SiT`) decide; with none of
them, and both families installed, loading stops and asks for `--family sit` or `--family dit`. A canonical head
(C channels) without hints is read as REPA (canonical time), the convention of every modern file.
"""

from __future__ import annotations

import re

from . import register
from .dit_keys import build_and_load, check_linear_velocity, has_dit_keys, infer_dit_config
from .interface import NO_OPTIONS, Family, LoadOptions, Meta, StateDict

RELEASE_RE = re.compile(r"SiT-(S|B|L|XL)-\d+-\d+x\d+")  # released file names, e.g. SiT-XL-2-256x256.pt


@register("sit")
class SitFamily(Family):
    """SiT velocity models in the reversed-time convention, with or without learn_sigma."""

    tie_winner = False  # a learn_sigma head is also DiT's: without a hint the user must say which

    def detect(self, sd: StateDict) -> bool:
        """Any DiT-style backbone without a DMF log-variance head (weights alone cannot tell SiT from REPA/DiT)."""
        return has_dit_keys(sd) and "logvar_linear.weight" not in sd

    def hint(self, meta: Meta) -> bool:
        """SiT training args (a path type but none of REPA's or DMF's options) or a SiT release file name."""
        args = meta.get("args") or {}
        name = meta.get("name", "")
        if args:
            own = "path_type" in args and not any(k in args for k in ("enc_type", "proj_coeff", "dmf_depth"))
            return (
                own
                or str(args.get("model", "")).startswith("SiT-")
                and "enc_type" not in args
                and "dmf_depth" not in args
            )
        return bool(RELEASE_RE.search(name))

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        """Infer the architecture and load strictly; forward translates time and sign."""
        check_linear_velocity(options.args, "SiT")
        fields = infer_dit_config(sd, options, options.args)
        return build_and_load({**fields, "time_convention": "reversed"}, sd, options.what or "SiT checkpoint")
