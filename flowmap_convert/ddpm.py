"""DDPM schedule tables and the epsilon-prediction -> canonical-velocity conversion (DiT, docs/conventions.md).

Canonical time s in [0, 1] (s = 1 noise) has the state x_s = (1 - s) x0 + s eps. The DDPM state with the same
signal-to-noise ratio is x_ddpm = x_s / n(s), n(s) = sqrt((1 - s)^2 + s^2), at alpha_bar(s) = (1 - s)^2 / n(s)^2.
The continuous DDPM time tau(s) is where the table's log-SNR, interpolated linearly between integer steps, equals
log-SNR(s) = 2 log((1 - s) / s); at integer tau this is exactly the table. DiT (1000 linear-beta steps) covers
s in [0.0099, 0.9937]; outside that range tau is clamped to [0, 999] (see `eps_to_velocity` for what v does there).
All of it runs in float64; a float64 canonical time passed to FlowMap stays float64 until tau is cast for the
network, so the float64 s of an integer step reaches exactly that step (docs/conventions.md, DDPM precision).
"""

from __future__ import annotations

import functools

import torch

NUM_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def linear_betas(num_steps: int = NUM_STEPS, start: float = BETA_START, end: float = BETA_END) -> torch.Tensor:
    """DiT's linear beta schedule in float64: linspace(1e-4 * 1000/T, 0.02 * 1000/T, T) (docs/conventions.md)."""
    scale = 1000.0 / num_steps
    return torch.linspace(start * scale, end * scale, num_steps, dtype=torch.float64)


def alphas_cumprod(num_steps: int = NUM_STEPS) -> torch.Tensor:
    """The alpha_bar table, alpha_bar_k = prod_{i <= k} (1 - beta_i), float64, shape (T,)."""
    return torch.cumprod(1.0 - linear_betas(num_steps), dim=0)


class DDPMSchedule:
    """Canonical s <-> continuous DDPM time tau by log-SNR matching; all arithmetic in float64."""

    def __init__(self, num_steps: int = NUM_STEPS):
        self.num_steps = num_steps
        ab = alphas_cumprod(num_steps)
        self.log_snr = torch.log(ab) - torch.log1p(-ab)  # lambda_k = log(ab / (1 - ab)), strictly decreasing
        # Canonical times at the two ends of the table: lambda(s) = 2 log((1 - s)/s) => s = 1 / (1 + exp(lambda/2)).
        self.s_min = float(torch.sigmoid(-self.log_snr[0] / 2))  # tau = 0   (about 0.0099 for DiT)
        self.s_max = float(torch.sigmoid(-self.log_snr[-1] / 2))  # tau = T-1 (about 0.9937 for DiT)

    @staticmethod
    def canonical_log_snr(s: torch.Tensor) -> torch.Tensor:
        """log-SNR of x_s = (1 - s) x0 + s eps: 2 (log(1 - s) - log s); +inf at s = 0, -inf at s = 1."""
        s = s.double()
        return 2.0 * (torch.log1p(-s) - torch.log(s))

    def ddpm_time(self, s: torch.Tensor) -> torch.Tensor:
        """Continuous DDPM step tau(s) in [0, T-1] (float64), clamped outside the covered range."""
        lam = self.canonical_log_snr(s)
        table = (-self.log_snr).to(lam.device)  # increasing, so searchsorted applies
        x = -lam
        k = torch.searchsorted(table, x.clamp(table[0], table[-1])).clamp(1, self.num_steps - 1)
        lo, hi = table[k - 1], table[k]
        frac = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)  # linear in log-SNR between integer steps
        tau = (k - 1).double() + frac
        tau = torch.where(x <= table[0], torch.zeros_like(tau), tau)
        return torch.where(x >= table[-1], torch.full_like(tau, self.num_steps - 1.0), tau)

    def effective_alpha_bar(self, s: torch.Tensor) -> torch.Tensor:
        """alpha_bar at tau(s): exactly alpha_bar(s) inside the covered range, the table's end value outside."""
        lam = self.canonical_log_snr(s)
        lam = lam.clamp(float(self.log_snr[-1]), float(self.log_snr[0]))
        return torch.sigmoid(lam)  # ab = SNR / (1 + SNR)


def input_scale(s: torch.Tensor) -> torch.Tensor:
    """n(s) = sqrt((1 - s)^2 + s^2): x_ddpm = x_s / n(s) (float64)."""
    s = s.double()
    return torch.sqrt((1 - s) ** 2 + s**2)


def eps_to_velocity(eps_pred: torch.Tensor, x_s: torch.Tensor, s: torch.Tensor, schedule: DDPMSchedule) -> torch.Tensor:
    """Canonical velocity v = eps - x0 from an epsilon prediction at the state x_s (float64 algebra).

    Inside the covered range two exact forms agree: v = (eps - x_s) / (1 - s) and v = (x_s - x0) / s with
    x0 = (x_ddpm - sqrt(1 - ab) eps) / sqrt(ab). We use the first for s <= 1/2 and the second for s > 1/2, so
    neither divides by a number below 1/2 except through sqrt(ab) >= sqrt(ab_999) = 0.0064 (the DDPM's own x0
    prediction at its noisiest step). Outside the covered range the network has seen its clamped time tau and the
    same formulas apply with ab = ab(tau): near s = 0, v = (eps - x_s) / (1 - s) (exact canonical algebra); near
    s = 1, v = (x_s - x0_ddpm) / s with x0_ddpm the DDPM's x0 prediction at step 999, so v stays finite at s = 1.
    """
    s64 = s.double().reshape(-1, *([1] * (x_s.dim() - 1)))
    eps = eps_pred.double()
    xs = x_s.double()
    low = (eps - xs) / (1 - s64).clamp_min(0.5)  # Eq: v = (eps - x_s)/(1 - s); clamp only affects the unused branch
    ab = schedule.effective_alpha_bar(s.reshape(-1)).to(xs.device).reshape_as(s64)
    x_ddpm = xs / input_scale(s64)
    x0 = (x_ddpm - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)  # DDPM x0 prediction at tau(s)
    high = (xs - x0) / s64.clamp_min(0.5)  # Eq: v = (x_s - x0)/s
    return torch.where(s64 <= 0.5, low, high)


def snr_matched_input(x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_ddpm = x_s / n(s), in the dtype of x_s (the factor is computed in float64)."""
    n = input_scale(s).reshape(-1, *([1] * (x_s.dim() - 1))).to(x_s.device)
    return (x_s.double() / n).to(x_s.dtype)


@functools.cache
def default_schedule() -> DDPMSchedule:
    """The shared 1000-step linear schedule of DiT (built once)."""
    return DDPMSchedule()


def covered_range() -> tuple[float, float]:
    """(s_min, s_max): the canonical times DiT's 1000 steps cover."""
    sch = default_schedule()
    return sch.s_min, sch.s_max
