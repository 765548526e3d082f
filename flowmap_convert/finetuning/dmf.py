"""Decoupled MeanFlow objective (arXiv 2510.24474, Eqs. 1 and 3, as the official `DMFLoss`): FM at (t, t) plus MeanFlow at (t, r)."""

from __future__ import annotations

import torch

from .common import (
    Context,
    dmf_mf_times,
    drop_labels,
    interpolant,
    logit_normal,
    mf_target,
    model_guidance,
    per_sample_loss,
    randn,
)


def dmf_loss(ctx: Context, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """0.5 (FM + MF) with independent noise and times for the two branches (DMF Algorithm 1)."""
    rec, b, dev = ctx.recipe, x0.shape[0], x0.device
    y, drop = drop_labels(y, rec.label_dropout, ctx.null, gen)  # 10 % null class for guidance / CFG

    # FM branch at r = t: the boundary condition u(x_t, t, t) = v (Eq. 1)
    t_fm = logit_normal(b, rec.fm_mean, rec.fm_std, gen, dev)
    x_t, v_t = interpolant(x0, t_fm, randn(x0.shape, gen, dev))
    v_tgt = model_guidance(ctx, x_t, t_fm, y, drop, v_t)  # Eq. 4 (model guidance), detached
    u_fm = ctx.calls.u(x_t, t_fm, t_fm, y)
    fm = per_sample_loss(u_fm - v_tgt, ctx.calls.logvar(t_fm, t_fm), rec)  # Eq. 6 on the FM error

    # MF branch at r < t with fresh noise and times
    t, r = dmf_mf_times(b, rec, gen, dev)
    x_t, v_t = interpolant(x0, t, randn(x0.shape, gen, dev))
    v_tgt = model_guidance(ctx, x_t, t, y, drop, v_t)
    u, u_tgt, dudt = mf_target(ctx, x_t, t, r, y, v_tgt)  # Eq. 3: sg(v_tgt + (r - t) du/dt), du/dt along (v_tgt, 1, 0)
    mf = per_sample_loss(u - u_tgt, ctx.calls.logvar(t, r), rec)  # Eq. 6 on the MF error

    loss = (0.5 * (fm + mf)).mean()
    return loss, {"fm": fm.mean().item(), "mf": mf.mean().item(), "dudt": dudt.float().pow(2).mean().sqrt().item()}
