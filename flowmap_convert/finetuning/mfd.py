"""MeanFlow distillation MFD (MF-RAE, arXiv 2511.13019, `training_losses_mfd`): the frozen source supplies v."""

from __future__ import annotations

import torch

from .common import Context, drop_labels, interpolant, mf_target, mfrae_times, per_sample_loss, randn


def mfd_loss(ctx: Context, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """MF loss with w = v_teacher(z_t, t, y) (MF-RAE Eq. 2 with w = v_phi): no CFG, labels incl. the dropped ones."""
    rec, b, dev = ctx.recipe, x0.shape[0], x0.device
    y, _ = drop_labels(y, rec.label_dropout, ctx.null, gen)
    t, r = mfrae_times(b, rec, gen, dev)
    x_t, _ = interpolant(x0, t, randn(x0.shape, gen, dev))
    with torch.no_grad():
        v = ctx.teacher(x_t, t, y).float()  # frozen source model (the base before fine-tuning), velocity at r = t
    u, u_tgt, dudt = mf_target(ctx, x_t, t, r, y, v)  # MF-RAE Eq. 2: sg(v - (t - r) du/dt)
    mf = per_sample_loss(u - u_tgt, ctx.calls.logvar(t, r), rec)
    return mf.mean(), {"mf": mf.mean().item(), "dudt": dudt.float().pow(2).mean().sqrt().item()}
