"""Objective registry: name -> loss(ctx, x0, y, gen) -> (scalar loss, metrics)."""

from __future__ import annotations

from .cmt import cmt_loss
from .dmf import dmf_loss
from .fm import fm_loss
from .mfd import mfd_loss
from .mft import mft_loss

OBJECTIVE_FNS = {"dmf": dmf_loss, "fm": fm_loss, "mft": mft_loss, "mfd": mfd_loss, "cmt": cmt_loss}
NEEDS_TEACHER = {"mfd", "cmt"}
