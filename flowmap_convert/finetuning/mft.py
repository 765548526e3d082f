"""MeanFlow training MFT (MF-RAE, arXiv 2511.13019, `training_losses_mft`): one-point velocity eps - x0."""

from __future__ import annotations

import torch

from .common import Context, drop_labels, interpolant, mf_target, mfrae_times, per_sample_loss, randn


def mft_loss(ctx: Context, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """MF loss with target v_t - (t - r) du/dt and v_t = eps - x0 (MF-RAE Eq. 1 with the one-point estimate)."""
    rec, b, dev = ctx.recipe, x0.shape[0], x0.device
    y, _ = drop_labels(y, rec.label_dropout, ctx.null, gen)
    t, r = mfrae_times(b, rec, gen, dev)
    x_t, v_t = interpolant(x0, t, randn(x0.shape, gen, dev))
    u, u_tgt, dudt = mf_target(ctx, x_t, t, r, y, v_t)  # MF-RAE Eq. 1: sg(v_t - (t - r) du/dt)
    mf = per_sample_loss(u - u_tgt, ctx.calls.logvar(t, r), rec)
    return mf.mean(), {"mf": mf.mean().item(), "dudt": dudt.float().pow(2).mean().sqrt().item()}
