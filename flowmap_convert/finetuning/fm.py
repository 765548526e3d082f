"""Plain flow matching (DMF Eq. 1 alone, r = t): the cheapest step, a baseline for the step-time benchmark."""

from __future__ import annotations

import torch

from .common import Context, drop_labels, interpolant, logit_normal, model_guidance, per_sample_loss, randn


def fm_loss(ctx: Context, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Flow-matching loss on u(x_t, t, t) against the (optionally guided) velocity eps - x0."""
    rec, b, dev = ctx.recipe, x0.shape[0], x0.device
    y, drop = drop_labels(y, rec.label_dropout, ctx.null, gen)
    t = logit_normal(b, rec.fm_mean, rec.fm_std, gen, dev)
    x_t, v_t = interpolant(x0, t, randn(x0.shape, gen, dev))
    v_tgt = model_guidance(ctx, x_t, t, y, drop, v_t)  # Eq. 4
    fm = per_sample_loss(ctx.calls.u(x_t, t, t, y) - v_tgt, ctx.calls.logvar(t, t), rec)  # Eq. 1 / 6
    return fm.mean(), {"fm": fm.mean().item()}
