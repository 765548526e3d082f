"""Few-step samplers in canonical time: Euler (flow map or velocity), Heun, restart and CTM (DMF samplers.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import FlowmapError

SAMPLERS = ("euler", "heun", "restart", "ctm")
UINT8_FORMULA = "uint8(clamp(127.5 * x + 128, 0, 255)) for decoded x in [-1, 1] (ADM / DiT sample_ddp)"


@dataclass
class SampleSettings:
    """Every knob of a sampling run; written next to the images as a JSON sidecar."""

    nfe: int = 1
    sampler: str = "euler"
    shift: float = 1.0
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    gamma: float = 0.0
    seed: int = 0
    dtype: str = "float32"

    def validate(self, model) -> None:
        """Reject settings that cannot work with this model, with the fix in the message."""
        if self.sampler not in SAMPLERS:
            raise FlowmapError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if not isinstance(self.nfe, int) or self.nfe < 1:
            raise FlowmapError(f"--nfe must be a positive integer, got {self.nfe}.")
        if self.shift <= 0:
            raise FlowmapError(f"--shift must be positive, got {self.shift}.")
        if self.sampler in ("restart", "ctm") and not model.config.is_flow_map:
            raise FlowmapError(
                f"the {self.sampler} sampler needs a flow map; convert the model first or use --sampler euler/heun."
            )
        if self.sampler == "ctm" and not 0.0 <= self.gamma < 1.0:
            raise FlowmapError(f"--gamma must be in [0, 1), got {self.gamma}.")
        if self.cfg_scale != 1.0 and model.config.class_embed_rows <= model.config.num_classes:
            raise FlowmapError(
                "classifier-free guidance needs a null-class embedding, which this model lacks; use --cfg-scale 1."
            )

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["guidance_interval"] = list(self.guidance_interval)
        return d


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """linspace(1, 0, steps + 1) in float64, optionally shifted t' = s t / (1 + (s - 1) t) (DMF get_tsteps)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t


class NoiseBank:
    """Per-sample generators: sample i's noise depends only on (seed, i), never on batching."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.gens = [torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i)) for i in indices]

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(*shape, generator=g, dtype=torch.float32) for g in self.gens])


def _call(model, x, t, r, y, s: SampleSettings) -> torch.Tensor:
    """One network evaluation with optional CFG inside the guidance interval (state float64 outside)."""
    dtype = next(model.parameters()).dtype
    b = x.shape[0]
    tt = torch.full((b,), float(t), device=x.device)
    rr = torch.full((b,), float(r), device=x.device)
    lo, hi = s.guidance_interval
    xin = x.to(dtype)
    with torch.no_grad():
        if s.cfg_scale != 1.0 and lo <= float(t) <= hi:
            null = torch.full_like(y, model.config.num_classes)
            out = model(torch.cat([xin, xin]), torch.cat([tt, tt]), torch.cat([rr, rr]), torch.cat([y, null]))
            cond, unc = out.double().chunk(2)
            return unc + s.cfg_scale * (cond - unc)  # CFG: u_unc + s (u_cond - u_unc)
        return model(xin, tt, rr, y).double()


def sample_latents(
    model, noise: torch.Tensor, y: torch.Tensor, s: SampleSettings, noise_bank: NoiseBank | None = None, on_step=None
) -> torch.Tensor:
    """Integrate from t=1 (noise) to t=0 with the chosen sampler; returns float32 latents."""
    x = noise.double()
    t = time_grid(s.nfe if s.sampler != "heun" else (s.nfe + 1) // 2, s.shift)
    n = len(t) - 1
    fresh = (
        (lambda: noise_bank.draw(noise.shape[1:]).to(x.device).double())
        if noise_bank
        else (lambda: torch.randn_like(x))
    )
    for i in range(n):
        t_cur, t_nxt = float(t[i]), float(t[i + 1])
        last = i == n - 1
        if s.sampler == "euler":
            u = _call(model, x, t_cur, t_nxt, y, s)
            x = x + (t_nxt - t_cur) * u  # x_r = x_t + (r - t) u
        elif s.sampler == "heun":
            v = _call(model, x, t_cur, t_cur, y, s)
            x_e = x + (t_nxt - t_cur) * v
            if last:
                x = x_e  # final step is plain Euler, so N evaluations give (N + 1) / 2 steps
            else:
                v2 = _call(model, x_e, t_nxt, t_nxt, y, s)
                x = x + (t_nxt - t_cur) * 0.5 * (v + v2)
        elif s.sampler == "restart":
            u = _call(model, x, t_cur, 0.0, y, s)
            x0 = x - t_cur * u  # jump to data, then re-noise to the next time
            x = x0 if last else (1 - t_nxt) * x0 + t_nxt * fresh()
        else:  # ctm
            t_g = t_nxt if last else t_nxt * (1 - s.gamma**2) ** 0.5
            u = _call(model, x, t_cur, t_g, y, s)
            x = x + (t_g - t_cur) * u
            if not last:
                alpha = (1 - t_nxt) / (1 - t_g)
                x = alpha * x + (1 - alpha) * fresh()  # DMF ctm: sigma = 1 - alpha
        if on_step is not None:
            on_step()
    return x.float()


def labels_for(model, classes: Sequence[int] | None, num_samples: int) -> torch.Tensor:
    """Class labels cycling through `classes` (all classes when None); K means unconditional."""
    k = model.config.num_classes
    pool = list(classes) if classes else list(range(k))
    for c in pool:
        if not 0 <= int(c) <= k or (int(c) == k and model.config.class_embed_rows <= k):
            raise FlowmapError(f"class {c} is out of range for a model with {k} classes; use labels 0..{k - 1}.")
    return torch.tensor([int(pool[i % len(pool)]) for i in range(num_samples)], dtype=torch.long)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images in [-1, 1], NCHW -> uint8 NHWC (see UINT8_FORMULA)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample(
    model,
    nfe: int = 1,
    classes: Sequence[int] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    sampler: str = "euler",
    shift: float | None = None,
    cfg_scale: float | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    gamma: float = 0.0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    decoder=None,
    progress: bool = False,
    return_latents: bool = False,
):
    """Draw samples and decode them: uint8 NHWC numpy (and the latents when asked)."""
    from .decoders import get_decoder

    defaults = model.config.sampling or {}
    s = SampleSettings(
        nfe=nfe,
        sampler=sampler,
        shift=float(defaults.get("shift", 1.0) if shift is None else shift),
        cfg_scale=float(defaults.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale),
        guidance_interval=tuple(guidance_interval),
        gamma=gamma,
        seed=seed,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )
    s.validate(model)
    if num_samples is None:
        num_samples = len(classes) if classes else 16
    if num_samples < 1 or batch_size < 1:
        raise FlowmapError("--num-samples and --batch-size must be positive.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    decoder = decoder if decoder is not None else get_decoder(model.config.latent, device)
    labels = labels_for(model, classes, num_samples)
    c, size = model.config.in_channels, model.config.input_size
    images, latents = [], []
    steps_per_batch = s.nfe if s.sampler != "heun" else (s.nfe + 1) // 2
    n_batches = (num_samples + batch_size - 1) // batch_size
    bar = _progress(progress, n_batches * steps_per_batch)
    try:
        for b0 in range(0, num_samples, batch_size):
            idx = list(range(b0, min(b0 + batch_size, num_samples)))
            bank = NoiseBank(seed, idx)
            noise = bank.draw((c, size, size)).to(device)
            z = sample_latents(
                model, noise, labels[idx].to(device), s, noise_bank=bank, on_step=bar.advance if bar else None
            )
            with torch.no_grad():
                images.append(to_uint8(decoder.decode(z)))
            if return_latents:
                latents.append(z.cpu())
    finally:
        if bar:
            bar.stop()
    out = np.concatenate(images)
    if return_latents:
        return out, torch.cat(latents), labels, s
    return out


class _Bar:
    """A minimal rich progress bar over network evaluations."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("sampling"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.p.add_task("sampling", total=total)
        self.p.start()

    def advance(self) -> None:
        self.p.advance(self.task)

    def stop(self) -> None:
        self.p.stop()


def _progress(enabled: bool, total: int):
    return _Bar(total) if enabled else None
