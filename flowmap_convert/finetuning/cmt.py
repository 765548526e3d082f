"""Consistency Mid-Training CMT (MF-RAE, arXiv 2511.13019, `training_losses_cmt_v2`): regress teacher-trajectory chords."""

from __future__ import annotations

import torch

from .common import Context, drop_labels, per_sample_loss, randn, shift_time


def teacher_trajectory(teacher, z: torch.Tensor, y: torch.Tensor, n: int, shift: float) -> torch.Tensor:
    """n states of the teacher's Euler ODE on shift(1 - linspace(0, 0.999, n)); states[0] = z (t = 1)."""
    grid = shift_time(1.0 - torch.linspace(0.0, 0.999, n, dtype=torch.float64), shift)
    states = [z.double()]
    x = z.double()
    with torch.no_grad():
        for i in range(n - 1):
            t = torch.full((z.shape[0],), float(grid[i]), device=z.device)
            v = teacher(x.float(), t, y).double()
            x = x + float(grid[i + 1] - grid[i]) * v  # Euler step toward data
            states.append(x)
    return torch.stack(states)  # (n, B, C, H, W), float64


def cmt_loss(ctx: Context, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """u(z_{t_i}, t_i, t_j) regresses (z_{t_i} - z_{t_j}) / (t_i - t_j) for random pairs i > j (MF-RAE Eq. 3).

    Each of the b teacher trajectories gives `cmt_pairs` rows, so the student sees b x cmt_pairs pairs per batch.
    """
    rec, b, dev = ctx.recipe, x0.shape[0], x0.device
    n = rec.cmt_states
    y, _ = drop_labels(y, rec.label_dropout, ctx.null, gen)
    states = teacher_trajectory(ctx.teacher, randn(x0.shape, gen, dev), y, n, rec.time_shift)
    t_all = torch.linspace(0.0, 1.0, n, dtype=torch.float64)  # time labels as written (unshifted, docs/objectives.md)
    ii, jj = torch.tril_indices(n, n, offset=-1)  # all pairs i > j: n (n - 1) / 2 of them
    k = rec.cmt_pairs  # pairs per trajectory, drawn with replacement (MF-RAE: 64 at 256 px, 8 at 512 px)
    pair = torch.randint(0, len(ii), (b * k,), generator=gen)
    row = torch.arange(b).repeat_interleave(k)
    i, j = ii[pair], jj[pair]
    src, dst = states[n - 1 - i, row], states[n - 1 - j, row]
    ti, tj = t_all[i], t_all[j]
    target = ((src - dst) / (ti - tj).reshape(-1, 1, 1, 1)).float().to(dev)  # chord slope, Eq. 3
    t, r = ti.float().to(dev), tj.float().to(dev)
    u = ctx.calls.u(src.float().to(dev), t, r, y[row.to(dev)])
    loss = per_sample_loss(u - target, ctx.calls.logvar(t, r), rec)
    return loss.mean(), {"cmt": loss.mean().item()}
