"""Pieces every objective shares: interpolant, time proposals, label dropout, guidance, losses and du/dt.

All times are canonical (t = 1 noise, t = 0 data) fp32 tensors of shape (B,); x_t = (1 - t) x0 + t eps, v = eps - x0,
and the flow map u(x_t, t, r) moves x_r = x_t + (r - t) u. Randomness comes from an explicit generator so that a
resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import jvp

from ..errors import FlowmapError
from .recipe import Recipe


def bcast(t: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
    return t.reshape(-1, 1, 1, 1)


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Standard normal noise from the run's generator (drawn on the CPU, then moved)."""
    return torch.randn(*shape, generator=gen).to(device)


def rand(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Uniform [0, 1) numbers from the run's generator."""
    return torch.rand(*shape, generator=gen).to(device)


def interpolant(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x0 + t eps and the conditional velocity v_t = eps - x0 (rectified-flow path)."""
    tb = bcast(t).to(x0.dtype)
    return (1 - tb) * x0 + tb * eps, eps - x0


def logit_normal(n: int, mean: float, std: float, gen, device) -> torch.Tensor:
    """t = sigmoid(N(mean, std^2)) (DMF `ln(mu, sigma)`, linear path)."""
    return torch.sigmoid(mean + std * randn((n,), gen, device))


def dmf_mf_times(n: int, recipe: Recipe, gen, device) -> tuple[torch.Tensor, torch.Tensor]:
    """DMF MeanFlow times: t = max(a, b), r = min(a, b) of two logit-normals with means (P_mean_t, P_mean_r)."""
    a = logit_normal(n, recipe.time_proposal[0], recipe.time_std, gen, device)
    b = logit_normal(n, recipe.time_proposal[1], recipe.time_std, gen, device)
    return torch.maximum(a, b), torch.minimum(a, b)


def shift_time(t: torch.Tensor, s: float | None) -> torch.Tensor:
    """RAE / SD3 time shift t' = s t / (1 + (s - 1) t) (None: a recipe whose shift the Trainer has not filled in, 1)."""
    return t if s is None or s == 1.0 else s * t / (1 + (s - 1) * t)


def mfrae_times(n: int, recipe: Recipe, gen, device) -> tuple[torch.Tensor, torch.Tensor]:
    """MF-RAE `sample_mf`: two uniform times on [0, 0.999], shifted and sorted; r = t for 1 - ratio of the rows."""
    u = rand((n, 2), gen, device) * 0.999
    u = shift_time(u, recipe.time_shift)
    t, r = u.max(dim=1).values, u.min(dim=1).values
    same = rand((n,), gen, device) >= recipe.ratio_r_neq_t  # 75 % of rows get r = t (ratio 1/4)
    return t, torch.where(same, t, r)


def drop_labels(y: torch.Tensor, p: float, null: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a share p of the labels by the null class K (DMF cfg_prob, MF-RAE label dropout)."""
    drop = rand((y.shape[0],), gen, y.device) < p
    return torch.where(drop, torch.full_like(y, null), y), drop


# ---------------------------------------------------------------------------------------------------- losses
def per_sample_loss(err: torch.Tensor, lv: torch.Tensor | None, recipe: Recipe) -> torch.Tensor:
    """Per-sample loss (B,) from the error u - u_tgt, reduced in fp32."""
    err = err.float()
    if recipe.loss == "adaptive":
        mse = err.pow(2).mean(dim=(1, 2, 3))
        lv = lv.float().reshape(-1)
        return torch.log(mse * torch.exp(-lv) + recipe.logvar_eps) + lv  # DMF log_lv_loss (adaptive, DMF Eq. 6 / Eq. 9)
    if recipe.loss == "adaptive-weight":
        m = err.pow(2).sum(dim=(1, 2, 3))
        w = (
            1.0 / (m.detach() + recipe.adaptive_c) ** recipe.adaptive_p
        )  # MeanFlow adaptive weight, w = sg(1/(|e|^2 + c)^p)
        return w * m
    if recipe.loss == "mfrae":
        # MF-RAE's released training code squares the summed error once more: w = sg(1 / (m^2 + c)^p), loss = w m^2
        # with m = |e|^2 (docs/objectives.md); for m >> sqrt(c) its gradient is about twice adaptive-weight's
        m2 = err.pow(2).sum(dim=(1, 2, 3)).pow(2)
        return m2 / (m2.detach() + recipe.adaptive_c) ** recipe.adaptive_p
    return err.pow(2).mean(dim=(1, 2, 3))  # plain MSE


# ---------------------------------------------------------------------------------------------------- model calls
class Calls:
    """How the trainer calls a FlowMap: whole, or (decoder-only) with the encoder run once and without gradient.

    Every convention (source time, epsilon -> velocity, sign, learn_sigma) lives in FlowMap.encode / decode; this
    class only decides what runs under no_grad and how du/dt is taken.
    """

    def __init__(self, model, decoder_only: bool = False):
        self.model = model  # the UNWRAPPED FlowMap (torch.func.jvp must not see DDP / compile wrappers)
        self.decoder_only = decoder_only
        if decoder_only and not self.can_split(model):
            raise FlowmapError(
                "`train` decoder needs a decoupled flow map whose blocks split at a depth (not MF-RAE); use `train` all."
            )

    @staticmethod
    def can_split(model) -> bool:
        """True when the model is decoupled and its backbone runs the encoder once (FlowMap.can_split)."""
        return model.config.conditioning == "decoupled" and model.can_split

    def encode(self, x, t, y):
        """FlowMap.encode: the encoder state (x_t, t, blocks[:depth] on the source time of t)."""
        return self.model.encode(x, t, y)

    def decode(self, state, r, y):
        """FlowMap.decode: the average velocity from an encoder state, decoder and head on r."""
        return self.model.decode(state, r, y)

    def u(self, x, t, r, y):
        """u(x, t, r, y) with gradient only where trainable (encoder under no_grad in decoder-only mode)."""
        if not self.decoder_only:
            return self.model(x, t, r, y)
        with torch.no_grad():
            state = self.encode(x, t, y)
        return self.decode(state, r, y)

    def u_and_dudt_jvp(self, x, t, r, y, v):
        """u and its total derivative d/dt u(x_t, t, r) along (dx/dt, dt/dt, dr/dt) = (v, 1, 0), by torch.func.jvp.

        Decoder-only: the tangent of the whole encoder state (x_t, t and the tokens) along (v, 1), then the decoder's
        jvp from that state with r's tangent 0 (DMF Eq. 3), so du/dt equals the full model's.
        """
        one, zero = torch.ones_like(t), torch.zeros_like(r)
        v = v.to(x.dtype)
        if not self.decoder_only:
            return jvp(lambda x_, t_, r_: self.model(x_, t_, r_, y), (x, t, r), (v, one, zero))
        with torch.no_grad():  # the frozen encoder: forward and its tangent, once, no graph
            state, dstate = jvp(lambda x_, t_: self.encode(x_, t_, y), (x, t), (v, one))
        return jvp(lambda s_, r_: self.decode(s_, r_, y), (state, r), (dstate, zero))

    def u_and_dudt_fd(self, x, t, r, y, v, delta: float):
        """u and du/dt by a central difference: one batched call on [x, x + d v, x - d v] at [t, t + d, t - d] (MF-RAE)."""
        b = x.shape[0]
        v = v.to(x.dtype)
        x3 = torch.cat([x, x + delta * v, x - delta * v])
        t3 = torch.cat([t, t + delta, t - delta])
        with torch.autocast(
            x.device.type, enabled=False
        ):  # a difference quotient over 2 delta = 0.01 needs fp32, not bf16
            hi = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (float64 stays float64)
            u3 = self.u(x3.to(hi), t3, torch.cat([r, r, r]), torch.cat([y, y, y])).to(hi)
        u, up, um = u3[:b], u3[b : 2 * b], u3[2 * b :]
        return u, (up - um).detach() / (2 * delta)  # du/dt ~ (u+ - u-) / (2 delta), error O(delta^2)

    def u_and_dudt(self, x, t, r, y, v, recipe: Recipe):
        """Dispatch on recipe.derivative."""
        if recipe.derivative == "fd":
            return self.u_and_dudt_fd(x, t, r, y, v, recipe.fd_delta)
        return self.u_and_dudt_jvp(x, t, r, y, v)

    def logvar(self, t, r):
        """Per-sample log-variance of the adaptive loss (zeros when the model has no head)."""
        return self.model.logvar(t.float(), r.float())


@dataclass
class Context:
    """What an objective needs besides the batch: model calls, frozen teacher, recipe, null label, device."""

    calls: Calls
    recipe: Recipe
    null: int
    teacher: Callable | None = None  # frozen source velocity v(x, t, y) for MFD / CMT

    @property
    def model(self):
        """The unwrapped FlowMap being trained."""
        return self.calls.model


def model_guidance(ctx: Context, x_t, t, y, drop, v_t) -> torch.Tensor:
    """DMF model guidance: v_tgt = v_t + omega (v_c - v_u) at r = t with the online model, inside [g_min, g_max], not for dropped labels."""
    omega = ctx.recipe.mg_scale
    if omega == 0.0:
        return v_t
    lo, hi = ctx.recipe.guidance_interval
    use = (t >= lo) & (t <= hi) & ~drop  # cfg_ids
    if not bool(use.any()):
        return v_t
    with torch.no_grad():
        b = x_t.shape[0]
        tt = torch.cat([t, t])
        out = ctx.model(torch.cat([x_t, x_t]), tt, tt, torch.cat([y, torch.full_like(y, ctx.null)]))
        v_c, v_u = out[:b].float(), out[b:].float()
        guided = v_t + omega * (v_c - v_u)  # DMF Eq. 4 (model guidance target)
    return torch.where(bcast(use), guided, v_t).detach()


def mf_target(ctx: Context, x_t, t, r, y, v):
    """(u, u_tgt, du/dt): u_tgt = sg(v + (r - t) du/dt), du/dt the total derivative along (v, 1, 0) (DMF Eq. 3).

    MF-RAE writes the same target as v - (t - s) du/dt with its call h(z, s, t); in our u(x, t, r) both read
    u_tgt = v - (t - r) du/dt.
    """
    u, dudt = ctx.calls.u_and_dudt(x_t, t, r, y, v, ctx.recipe)
    dudt = dudt.detach().float()
    u_tgt = (v.float() + bcast(r - t) * dudt).detach()  # DMF Eq. 3 / MF-RAE Eq. 1
    return u, u_tgt, dudt
