"""REPA-E SiT checkpoints (End2End-Diffusion/REPA-E; docs/checkpoints.md): REPA's SiT plus a latent BatchNorm.

`models/sit.py` is REPA's SiT (canonical time: t = 1 noise, v = eps - x0) with `bn = BatchNorm2d(C, eps=1e-4,
affine=False)`, whose running statistics normalise the VAE latents before the network sees them. The state dict adds
`bn.running_mean`, `bn.running_var` (C floats each) and `bn.num_batches_tracked` (an int64 scalar). The velocity model
is REPA's and is read by the REPA path; the BatchNorm is not part of it: it becomes the latent space's per-channel
normalisation z_model = (z_vae - mean) / std with std = sqrt(running_var), the pair `generate.py` inverts before
decoding (`latents / rsqrt(running_var) + running_mean`; the eps of 1e-4 is left out there, and so here).

Releases (README): `REPA-E/sit-repae-{sdvae,invae,vavae}` (end-to-end; files `checkpoints/0400000.pt` with
`{'model', 'ema', 'vae', 'opt', 'args', ...}`) and `REPA-E/sit-ldm-e2e-vavae` (SiT-XL/1 trained on the frozen E2E-VAVAE).
Each decodes with its E2E-VAE (`REPA-E/e2e-sdvae` f8d4, `e2e-invae` / `e2e-vavae` f16d32). The SiT weights alone cannot
tell an IN-VAE model from a VA-VAE one (both f16d32), so the VAE repo comes from the source name, and the E2E-VAVAE
is the default for f16d32. Guidance of each release (README, generate.py `--cfg-scale --guidance-low/high`) is recorded
under `sampling["source_guidance"]`; their sampler is flowmap's Euler on linspace(1, 0) (shift 1).
"""

from __future__ import annotations

import torch

from ..config import LatentSpace
from ..errors import FlowmapError
from . import note, register
from .dit_keys import build_and_load, check_linear_velocity, drop_projectors, has_dit_keys, infer_dit_config
from .interface import NO_OPTIONS, Family, LoadOptions

BN_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
# release -> (E2E-VAE repo, guidance from the README's tables)
RELEASES = {
    "sit-ldm-e2e-vavae": ("REPA-E/e2e-vavae", {"cfg_scale": 2.5, "guidance_low": 0.0, "guidance_high": 0.75}),
    "sit-repae-vavae": ("REPA-E/e2e-vavae", {"cfg_scale": 1.9, "guidance_low": 0.0, "guidance_high": 0.825}),
    "sit-repae-invae": ("REPA-E/e2e-invae", {"cfg_scale": 1.8, "guidance_low": 0.0, "guidance_high": 0.825}),
    "sit-repae-sdvae": ("REPA-E/e2e-sdvae", {"cfg_scale": 2.2, "guidance_low": 0.0, "guidance_high": 0.65}),
}
F8D4 = {"ch_mult": [1, 2, 4, 4], "embed_dim": 4}
F16D32 = {"ch_mult": [1, 1, 2, 2, 4], "embed_dim": 32}


def release_of(options: LoadOptions, channels: int) -> str:
    """The release named by the source (alias, repo or path), else the default for the latent width."""
    info = options.source_info or {}
    text = " ".join(str(info.get(k, "")) for k in ("source", "repo", "file")) + " " + str(options.what or "")
    for name in RELEASES:
        if name in text.lower():
            return name
    return "sit-repae-sdvae" if channels == 4 else "sit-ldm-e2e-vavae"


def bn_stats(sd: dict, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel from the BatchNorm's running statistics, checked for shape and sign."""
    mean, var = sd["bn.running_mean"], sd["bn.running_var"]
    for name, t in (("bn.running_mean", mean), ("bn.running_var", var)):
        if not torch.is_tensor(t) or tuple(t.shape) != (channels,) or not t.is_floating_point():
            raise FlowmapError(
                f"{name} has shape {tuple(getattr(t, 'shape', ()))}, not ({channels},); the REPA-E checkpoint is damaged."
            )
    var = var.double()
    if not bool(torch.isfinite(var).all()) or not bool((var > 0).all()) or not bool(torch.isfinite(mean).all()):
        raise FlowmapError("bn.running_var must be finite and positive; the REPA-E checkpoint is damaged.")
    return [float(v) for v in mean.double()], [float(v) for v in var.sqrt()]


def e2e_latent(channels: int, size: int, repo: str, mean: list[float], std: list[float]) -> LatentSpace:
    """The E2E-VAE latent space with the BatchNorm's per-channel normalisation (docs/checkpoints.md)."""
    arch = F8D4 if channels == 4 else F16D32
    factor = 2 ** (len(arch["ch_mult"]) - 1)
    return LatentSpace(
        kind="ldm-vae",
        channels=channels,
        size=size,
        image_channels=3,
        image_size=factor * size,
        repo=repo,
        extra={"checkpoint": None, "channel_mean": mean, "channel_std": std, **arch},
    )


@register("repa-e")
class RepaEFamily(Family):
    """REPA-E SiT: REPA's velocity model (canonical time) whose `bn` statistics define the latent normalisation."""

    name = "repa-e"

    def detect(self, sd) -> bool:
        """REPA's keys plus the latent BatchNorm's running statistics."""
        if not all(k in sd for k in BN_KEYS[:2]):
            return False
        return has_dit_keys({k: v for k, v in sd.items() if not k.startswith("bn.")})

    def hint(self, meta) -> bool:
        """A file or training args naming REPA-E (its args carry `bn_momentum`)."""
        args = meta.get("args") or {}
        return "bn_momentum" in args or "repae" in str(meta.get("name", "")).lower().replace("-", "")

    def build(self, sd, options):
        """Split off `bn.*` into the latent space, then read the rest as REPA's SiT (strict)."""
        options = options or NO_OPTIONS
        args = options.args or {}
        check_linear_velocity(args, "REPA-E")
        missing = [k for k in BN_KEYS[:2] if k not in sd]
        if missing:
            raise FlowmapError(f"the checkpoint lacks {missing[0]}; it is not a REPA-E SiT (try `family` repa).")
        rest = drop_projectors({k: v for k, v in sd.items() if not k.startswith("bn.")})
        fields = infer_dit_config(rest, options, args)
        if fields["learn_sigma"]:
            raise FlowmapError("this REPA-E checkpoint has a learn_sigma head (2C channels), which REPA-E's SiT lacks.")
        c, side = fields["in_channels"], fields["input_size"]
        mean, std = bn_stats(sd, c)
        release = release_of(options, c)
        repo, guidance = RELEASES[release]
        if c not in (4, 32):
            raise FlowmapError(
                f"this REPA-E SiT has {c} latent channels; REPA-E's VAEs have 4 (f8d4) or 32 (f16d32), so the file is not a REPA-E release."
            )
        if (c == 4) != (release == "sit-repae-sdvae"):
            note(f"the source names {release}, whose VAE does not have {c} channels; using the default for {c}")
            release = "sit-repae-sdvae" if c == 4 else "sit-ldm-e2e-vavae"
            repo, guidance = RELEASES[release]
        fields.update(
            time_convention="canonical",
            latent=e2e_latent(c, side, repo, mean, std),
            sampling={"shift": 1.0, "cfg_scale": 1.0, "source_guidance": {"release": release, **guidance}},
        )
        return build_and_load(fields, rest, options.what or "the REPA-E checkpoint")
