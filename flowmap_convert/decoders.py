"""Latent decoders chosen by the model's config: identity (pixel space) and SD-VAE; RAE arrives with issue 3."""

from __future__ import annotations

import torch

from .config import LatentSpace
from .errors import FlowmapError


class IdentityDecoder:
    """Pixel-space models: the sample already is the image in [-1, 1]."""

    def __init__(self, latent: LatentSpace):
        self.latent = latent

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images


class SDVAEDecoder:
    """diffusers AutoencoderKL: decode((z - bias) / scale), encode via the posterior sample * scale + bias."""

    def __init__(self, latent: LatentSpace, device):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise FlowmapError("SD-VAE decoding needs diffusers; install it with `pip install 'flowmap-convert[sdvae]'`.") from None
        repo = latent.repo or "stabilityai/sd-vae-ft-ema"
        try:
            self.vae = AutoencoderKL.from_pretrained(repo).to(device).eval()
        except OSError as e:
            raise FlowmapError(f"could not load the SD-VAE decoder {repo!r} ({str(e).splitlines()[0]}); download it once with network access or set the latent repo to a local copy.") from None
        self.latent = latent

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = (z - self.latent.bias) / self.latent.scale
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        post = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = post.sample(generator) if sample else post.mean
        return z.float() * self.latent.scale + self.latent.bias


def get_decoder(latent: LatentSpace, device="cpu"):
    """The decoder object for a latent space: `.decode(z) -> images in [-1, 1]`, `.encode(images) -> z`."""
    if latent.kind == "identity":
        return IdentityDecoder(latent)
    if latent.kind == "sd-vae":
        return SDVAEDecoder(latent, device)
    raise FlowmapError(f"no decoder for latent space {latent.kind!r} in this version; supported: identity, sd-vae.")
