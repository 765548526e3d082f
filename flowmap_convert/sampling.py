"""Few-step samplers in canonical time: Euler (flow map or velocity), Heun, restart and CTM (DMF samplers.py).

Every knob of a run travels as one frozen `SampleSettings` (CLI -> search / eval -> sampler). Sample i's noise
depends only on (seed, i), so any batching, any split over processes and any resumed run draws the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .decoders import get_decoder
from .errors import FlowmapError
from .progress import Progress
from .runtime import resolve_device
from .sample_options import (  # noqa: F401  (re-exported: sampling.SampleSettings is the public name)
    MAX_BATCH,
    MAX_CFG,
    MAX_NFE,
    MAX_SAMPLES,
    MAX_SHIFT,
    SAMPLERS,
    UINT8_FORMULA,
    SampleRun,
    SampleSettings,
    _classes_text,
    check_classes,
)
from .validate import int_in_range


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """linspace(1, 0, steps + 1) in float64, optionally shifted t' = s t / (1 + (s - 1) t) (DMF get_tsteps)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


class NoiseBank:
    """Per-sample generators: sample i's noise depends only on (seed, i), never on batching or the process."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.gens = [torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (1 << 64)) for i in indices]

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        """One draw per sample from its own stream (later draws continue it: restart / CTM re-noising)."""
        out = torch.empty((len(self.gens), *shape), dtype=torch.float32)
        for j, g in enumerate(self.gens):
            torch.randn(tuple(shape), generator=g, out=out[j])
        return out


def _call(model, x, t, r, y, s: SampleSettings, dtype) -> torch.Tensor:
    """One network evaluation with optional CFG inside the guidance interval (state float64 outside)."""
    b = x.shape[0]
    tt = torch.full((b,), float(t), device=x.device)
    rr = torch.full((b,), float(r), device=x.device)
    lo, hi = s.guidance_interval or (0.0, 1.0)  # unresolved settings: guide everywhere
    xin = x.to(dtype)
    if s.cfg_scale != 1.0 and lo <= float(t) <= hi:
        null = torch.full_like(y, model.config.num_classes)
        out = model(torch.cat([xin, xin]), torch.cat([tt, tt]), torch.cat([rr, rr]), torch.cat([y, null]))
        cond, unc = out.double().chunk(2)
        return unc + s.cfg_scale * (cond - unc)  # CFG: u_unc + s (u_cond - u_unc)
    return model(xin, tt, rr, y).double()


def _check_finite(x: torch.Tensor, step: int, t_cur: float, t_nxt: float) -> None:
    """Stop at the first non-finite output with one line naming the step and time."""
    if not bool(torch.isfinite(x).all()):
        raise FlowmapError(
            f"sampling produced non-finite values at step {step + 1} (t = {t_cur:.4g} -> {t_nxt:.4g}); the weights "
            "hold NaN/inf or overflow in this dtype: check the weights (convert refuses them unless `allow_nonfinite`)."
        )


@torch.no_grad()
def sample_latents(
    model, noise: torch.Tensor, y: torch.Tensor, s: SampleSettings, noise_bank: NoiseBank | None = None, on_step=None
) -> torch.Tensor:
    """Integrate from t=1 (noise) to t=0 with the chosen sampler; returns float32 latents."""
    dtype = next(model.parameters()).dtype
    x = noise.double()
    t = time_grid(s.steps, s.shift).tolist()
    n = len(t) - 1
    fresh = (
        (lambda: noise_bank.draw(noise.shape[1:]).to(x.device).double())
        if noise_bank
        else (lambda: torch.randn_like(x))
    )
    for i in range(n):
        t_cur, t_nxt = t[i], t[i + 1]
        last = i == n - 1
        if s.sampler == "euler":
            u = _call(model, x, t_cur, t_nxt, y, s, dtype)
            x = x + (t_nxt - t_cur) * u  # x_r = x_t + (r - t) u
        elif s.sampler == "heun":
            v = _call(model, x, t_cur, t_cur, y, s, dtype)
            x_e = x + (t_nxt - t_cur) * v
            if last:
                x = x_e  # final step is plain Euler, so N evaluations give (N + 1) / 2 steps
            else:
                v2 = _call(model, x_e, t_nxt, t_nxt, y, s, dtype)
                x = x + (t_nxt - t_cur) * 0.5 * (v + v2)
        elif s.sampler == "restart":
            u = _call(model, x, t_cur, 0.0, y, s, dtype)
            x0 = x - t_cur * u  # jump to data, then re-noise to the next time
            x = x0 if last else (1 - t_nxt) * x0 + t_nxt * fresh()
        else:  # ctm
            t_g = t_nxt if last else t_nxt * (1 - s.gamma**2) ** 0.5
            u = _call(model, x, t_cur, t_g, y, s, dtype)
            x = x + (t_g - t_cur) * u
            if not last:
                alpha = (1 - t_nxt) / (1 - t_g)
                x = alpha * x + (1 - alpha) * fresh()  # DMF ctm: sigma = 1 - alpha
        _check_finite(x, i, t_cur, t_nxt)
        if on_step is not None:
            on_step()
    return x.float()


def labels_for(model, classes: Sequence[int] | None, num_samples: int) -> torch.Tensor:
    """Class labels cycling through `classes` (all classes when None); K means unconditional."""
    k = model.config.num_classes
    pool = list(classes) if classes else list(range(k))
    check_classes(model, pool)
    return torch.tensor([int(pool[i % len(pool)]) for i in range(num_samples)], dtype=torch.long)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images in [-1, 1], NCHW -> uint8 NHWC (see UINT8_FORMULA)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """--classes text -> a tuple of class ids (None when not given); `,,,` is an error, not 'all classes'."""
    return None if text is None else _classes_text(text)


def default_num_samples(classes: Sequence[int] | None) -> int:
    """One sample per listed class, else 16."""
    return len(classes) if classes else 16


class Sampler:
    """A model bound to resolved settings: draws any set of sample indices (same images however they are split)."""

    def __init__(self, model, settings: SampleSettings, decoder=None):
        self.settings = settings.resolve(model)
        self.device = resolve_device(settings.device) if settings.device is not None else None
        if self.device is None:
            self.device = next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.decoder = decoder if decoder is not None else get_decoder(model.config.latent, self.device)
        cfg = model.config
        self.shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    def labels(self, num_samples: int) -> torch.Tensor:
        """Labels of samples 0..num_samples-1."""
        return labels_for(self.model, self.settings.classes, num_samples)

    def draw(self, indices: Sequence[int], labels: torch.Tensor, on_batch=None, return_latents: bool = False):
        """uint8 NHWC images (and float latents) of the given sample indices, in batches of settings.batch_size."""
        s = self.settings
        images, latents = [], []
        for b0 in range(0, len(indices), s.batch_size):
            idx = list(indices[b0 : b0 + s.batch_size])
            bank = NoiseBank(s.seed, idx)
            noise = bank.draw(self.shape).to(self.device)
            z = sample_latents(self.model, noise, labels[idx].to(self.device), s, noise_bank=bank)
            with torch.no_grad():
                images.append(to_uint8(self.decoder.decode(z)))
            if return_latents:
                latents.append(z.cpu())
            if on_batch is not None:
                on_batch(len(idx))
        out = np.concatenate(images) if images else np.zeros((0, 0, 0, 0), np.uint8)
        return (out, torch.cat(latents)) if return_latents else out


def sample(
    model,
    nfe: int = 1,
    classes: Sequence[int] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    sampler: str = "euler",
    shift: float | None = None,
    cfg_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    gamma: float = 0.0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    decoder=None,
    progress: bool = False,
    return_latents: bool = False,
    settings: SampleSettings | None = None,
):
    """Draw samples and decode them: uint8 NHWC numpy (and latents, labels, resolved settings when asked).

    Pass either the loose keywords (`fm.sample(model, nfe=1, classes=[1, 2], seed=0)`) or one `settings` object.
    """
    if settings is None:
        settings = SampleSettings(
            nfe=nfe,
            sampler=sampler,
            shift=shift,
            cfg_scale=cfg_scale,
            guidance_interval=tuple(guidance_interval) if guidance_interval is not None else None,
            gamma=gamma,
            seed=seed,
            batch_size=batch_size,
            device=str(device) if device is not None else None,
            classes=tuple(classes) if classes is not None else None,
        )
    n = default_num_samples(settings.classes) if num_samples is None else num_samples
    n = int_in_range("`num_samples`", n, 1, MAX_SAMPLES)
    run = Sampler(model, settings, decoder)
    labels = run.labels(n)
    if progress:
        with Progress(n, "sample", "images") as bar:
            out = run.draw(range(n), labels, on_batch=bar.advance, return_latents=return_latents)
    else:
        out = run.draw(range(n), labels, return_latents=return_latents)
    if return_latents:
        images, latents = out
        return images, latents, labels, run.settings
    return out
