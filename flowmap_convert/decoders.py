"""Latent decoders chosen by the model's config: identity (pixel space), SD-VAE and RAE (ViT-MAE decoder + DINOv2)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import LatentSpace
from .dit import heads_for_hidden
from .downloads import hub_cache_dir, hub_download, hub_files, is_offline
from .errors import FlowmapError
from .io import check_keys_and_shapes
from .kernels import attention
from .ldm_vae import AutoencoderKL


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
            raise FlowmapError(
                "SD-VAE decoding needs diffusers; install it with `pip install 'flowmap-convert[sdvae]'`."
            ) from None
        repo = latent.repo or "stabilityai/sd-vae-ft-ema"
        sub = latent.extra.get("subfolder")  # diffusers pipelines keep the VAE in `vae/`
        kwargs = {"subfolder": sub} if sub else {}
        if not Path(repo).is_dir():  # a Hub id: the same cache and offline switch as every other download
            kwargs.update(cache_dir=str(hub_cache_dir()), local_files_only=is_offline())
        try:
            self.vae = AutoencoderKL.from_pretrained(repo, **kwargs).to(device).eval()
        except (OSError, ValueError) as e:
            raise FlowmapError(
                f"could not load the SD-VAE decoder {repo!r} ({str(e).splitlines()[0]}); download it once with network access or set the latent repo to a local copy."
            ) from None
        self.latent = latent
        got = int(self.vae.config.latent_channels)
        if got != latent.channels:
            raise FlowmapError(
                f"the VAE at {repo!r} has {got} latent channels but the model samples {latent.channels}; point the model's latent repo at the VAE it was trained with."
            )

    def check(self, z: torch.Tensor) -> None:
        """Latents must have the VAE's channel count."""
        if z.dim() != 4 or z.shape[1] != self.latent.channels:
            raise FlowmapError(
                f"latents of shape {tuple(z.shape)} do not fit this SD-VAE ({self.latent.channels} channels); use the decoder that matches the model."
            )

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.check(z)
        z = (z - self.latent.bias) / self.latent.scale
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        post = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = post.sample(generator) if sample else post.mean
        return z.float() * self.latent.scale + self.latent.bias

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of images in [-1, 1] as cat(mean, std) along channels, unscaled (REPA's vae-sd files)."""
        post = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return torch.cat([post.mean, post.std], dim=1).float()


# ------------------------------------------------------------------------------------------------ RAE
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 processor statistics (docs/checkpoints.md, RAE latents)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_file(repo: str, filename: str, revision: str | None = None) -> Path:
    """A file of a latent-space repo: `repo` is a local directory or a Hub id (cache honoured, HF_HUB_OFFLINE too)."""
    local = Path(repo) / filename
    if Path(repo).is_dir():
        if not local.is_file():
            raise FlowmapError(
                f"{local} does not exist; put the RAE file there or set the model's latent repo to a directory that has it."
            )
        return local
    return hub_download(repo, filename, revision)  # cache + HF_HUB_OFFLINE read now; failures are FlowmapErrors


def load_weights_only(path: Path, what: str) -> dict:
    """torch.load(weights_only=True) (or safetensors) with readable errors."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or pickled-with-code files
        raise FlowmapError(f"cannot read the {what} {path} ({type(e).__name__}); re-download it.") from None


class ViTMAELayer(nn.Module):
    """transformers' ViTMAELayer: pre-norm attention and GELU MLP with residuals (keys as in RAE's decoder, docs/checkpoints.md)."""

    def __init__(self, dim: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.attention = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.attention, name, nn.Linear(dim, dim))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(dim, dim)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(dim, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.layernorm_before(x)
        a = self.attention.attention
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        o = attention(split(a.query(h)), split(a.key(h)), split(a.value(h))).transpose(1, 2).reshape(b, n, d)
        x = x + self.attention.output.dense(o)  # first residual
        m = self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))  # exact GELU
        return x + m  # second residual


class RAEPixelDecoder(nn.Module):
    """RAE's GeneralDecoder (ViT-MAE decoder): embed -> [cls] + tokens + pos -> layers -> norm -> pred -> drop cls."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        layers: int,
        heads: int,
        intermediate: int,
        num_patches: int,
        out_dim: int,
        eps: float,
    ):
        super().__init__()
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_layers = nn.ModuleList(ViTMAELayer(dim, heads, intermediate, eps) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(dim, eps=eps)
        self.decoder_pred = nn.Linear(dim, out_dim)

    @classmethod
    def from_state_dict(cls, sd: dict, heads: int | None, eps: float, what: str) -> RAEPixelDecoder:
        """Architecture from shapes (heads from the standard ViT tables unless given); strict load."""
        try:
            dim, in_dim = sd["decoder_embed.weight"].shape
            layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_layers."))
            inter = sd["decoder_layers.0.intermediate.dense.weight"].shape[0]
            patches = sd["decoder_pos_embed"].shape[1] - 1
            out_dim = sd["decoder_pred.weight"].shape[0]
        except (KeyError, ValueError):
            raise FlowmapError(
                f"{what} is not an RAE ViT-MAE decoder state dict (decoder_embed, decoder_layers.*, decoder_pred); check the model's latent decoder file."
            ) from None
        net = cls(in_dim, dim, layers, heads or heads_for_hidden(dim), inter, patches, out_dim, eps)
        check_keys_and_shapes(sd, {k: v.shape for k, v in net.state_dict().items()}, what)
        net.load_state_dict(sd, strict=True)
        return net.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # logits without the cls row


class RAEDecoder:
    """RAE latent space: per-element stats (eps 1e-5), ViT-MAE pixel decoder, frozen DINOv2-with-registers encoder."""

    def __init__(self, latent: LatentSpace, device="cpu", encoder=None):
        ex = latent.extra
        if not latent.repo or not ex.get("decoder") or not ex.get("stats"):
            raise FlowmapError(
                "this RAE model names no decoder/stats files in its latent space; set latent.repo, latent.extra.decoder and latent.extra.stats in config.json."
            )
        self.latent, self.device = latent, torch.device(device)
        self.eps = float(ex.get("eps", 1e-5))
        c, n = latent.channels, latent.size
        stats = load_weights_only(resolve_file(latent.repo, ex["stats"]), "RAE statistics file")
        if not isinstance(stats, dict) or "mean" not in stats or "var" not in stats:
            raise FlowmapError(f"the RAE statistics file {ex['stats']} must hold {{'mean', 'var'}}; use RAE's stat.pt.")
        mean, var = stats["mean"].float(), stats["var"].float()
        for name, t in (("mean", mean), ("var", var)):
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]  # accept [1, C, H, W] as well as [C, H, W]
            if tuple(t.shape) != (c, n, n):
                raise FlowmapError(
                    f"the RAE statistics {name} has shape {tuple(t.shape)} but the model's latents are {(c, n, n)}; use the stat.pt of the same resolution (imagenet1k for 256 px, imagenet1k_512 for 512 px)."
                )
            if name == "mean":
                mean = t
            else:
                var = t
        self.mean, self.std = (
            mean.to(self.device),
            torch.sqrt(var + self.eps).to(self.device),
        )  # z' = (z - mean)/sqrt(var + eps)
        sd = load_weights_only(resolve_file(latent.repo, ex["decoder"]), "RAE decoder file")
        self.net = RAEPixelDecoder.from_state_dict(
            sd, ex.get("decoder_heads"), float(ex.get("layer_norm_eps", 1e-12)), f"the RAE decoder {ex['decoder']}"
        ).to(self.device)
        in_dim = self.net.decoder_embed.in_features
        patches = self.net.decoder_pos_embed.shape[1] - 1
        if in_dim != c or patches != n * n:
            raise FlowmapError(
                f"the RAE decoder expects {patches} tokens of {in_dim} channels but the model samples {c}x{n}x{n} latents; pick the decoder of the same resolution and encoder."
            )
        self.patch = int(round(math.sqrt(self.net.decoder_pred.out_features / latent.image_channels)))
        self.pixel_mean = torch.tensor(ex.get("image_mean", IMAGENET_MEAN), device=self.device).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(ex.get("image_std", IMAGENET_STD), device=self.device).view(1, -1, 1, 1)
        self._encoder = encoder

    def check(self, z: torch.Tensor) -> None:
        """Latents must be (B, C, H, W) with the model's C and side."""
        c, n = self.latent.channels, self.latent.size
        if z.dim() != 4 or tuple(z.shape[1:]) != (c, n, n):
            raise FlowmapError(
                f"latents of shape {tuple(z.shape)} do not fit this RAE decoder ({c}x{n}x{n}); use the decoder that matches the model."
            )

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (RAE decode, then x * std + mean in [0, 1], then 2x - 1)."""
        self.check(z)
        z = z.float().to(self.device) * self.std + self.mean  # undo the per-element normalisation
        b, c, h, w = z.shape
        logits = self.net(z.reshape(b, c, h * w).transpose(1, 2))
        p, ch = self.patch, self.latent.image_channels
        x = logits.reshape(b, h, w, p, p, ch)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, ch, h * p, w * p)  # unpatchify
        x = x * self.pixel_std + self.pixel_mean  # image in [0, 1]
        return x.clamp(0, 1) * 2 - 1

    def encoder(self):
        """The frozen DINOv2-with-registers encoder (transformers), final LayerNorm without affine (Dinov2withNorm)."""
        if self._encoder is None:
            try:
                from transformers import Dinov2WithRegistersModel
            except ImportError:
                raise FlowmapError(
                    "encoding images into RAE latents needs transformers; install it with `pip install 'flowmap-convert[rae]'`."
                ) from None
            name = self.latent.extra.get("encoder", "facebook/dinov2-with-registers-base")
            try:
                enc = Dinov2WithRegistersModel.from_pretrained(name)
            except OSError as e:
                raise FlowmapError(
                    f"could not load the RAE encoder {name!r} ({str(e).splitlines()[0]}); download it once with network access."
                ) from None
            enc.layernorm.elementwise_affine = False
            enc.layernorm.weight = None
            enc.layernorm.bias = None
            enc = enc.to(self.device).eval().requires_grad_(False)
            self._encoder = lambda x: enc(x).last_hidden_state[:, 5:]  # drop CLS + 4 registers
        return self._encoder

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> normalised RAE latents (B, C, H, W); deterministic (RAE adds no noise at eval)."""
        x = (images.float().to(self.device) + 1) / 2
        size = int(self.latent.extra.get("encoder_input_size", 224))
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.encoder()(x)
        b, n, c = tokens.shape
        side = int(round(math.sqrt(n)))
        z = tokens.transpose(1, 2).reshape(b, c, side, side)
        self.check(z)
        return (z - self.mean) / self.std


# ------------------------------------------------------------------------------------------------ LDM AutoencoderKL
VAE_FILE_RE = re.compile(r"(?i)\.(?:safetensors|pt|pth|ckpt)$")
NOT_VAE_RE = re.compile(r"(?i)(latents?[-_]stats|discriminator|optimizer)")


def pick_vae_file(repo: str) -> str:
    """The one VAE weights file of a repo / directory (stats and discriminator files skipped), printed."""
    if Path(repo).is_dir():
        files = sorted(str(p.relative_to(repo)) for p in Path(repo).rglob("*") if p.is_file())
    else:
        files, _ = hub_files(repo, None)
    picked = sorted(f for f in files if VAE_FILE_RE.search(f) and not NOT_VAE_RE.search(f))
    if len(picked) != 1:
        raise FlowmapError(
            f"{repo} holds {len(picked)} VAE weight files ({', '.join(picked[:4]) or 'none'}); set latent.extra.checkpoint in config.json to the one to use."
        )
    print(f"flowmap: VAE weights: {repo}/{picked[0]}", file=sys.stderr, flush=True)
    return picked[0]


def _as_channel_vector(t, channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    if t.numel() != channels or not bool(torch.isfinite(t).all()):
        raise FlowmapError(
            f"the latent {what} must be {channels} finite numbers, got {t.numel()}; use the statistics of the VAE the model was trained on."
        )
    return t


class LDMVAEDecoder:
    """LDM AutoencoderKL latents (VA-VAE, E2E-VAE) with per-channel normalisation z = (z_vae - mean) / std."""

    def __init__(self, latent: LatentSpace, device="cpu"):
        ex, c = latent.extra, latent.channels
        if not latent.repo:
            raise FlowmapError("this model names no VAE in its latent space; set latent.repo in config.json.")
        self.latent, self.device = latent, torch.device(device)
        name = ex.get("checkpoint") or pick_vae_file(latent.repo)
        sd = load_weights_only(resolve_file(latent.repo, name), "VAE checkpoint")
        for key in ("state_dict", "model", "ema"):  # Lightning files keep the weights one level down
            if isinstance(sd, dict) and isinstance(sd.get(key), dict) and "decoder.conv_in.weight" not in sd:
                sd = sd[key]
        if not isinstance(sd, dict):
            raise FlowmapError(
                f"the VAE file {name} holds no state dict; use the VAE checkpoint of the model's release."
            )
        self.vae = AutoencoderKL.from_state_dict(sd, f"the VAE {name}", with_encoder="encoder.conv_in.weight" in sd)
        self.vae = self.vae.to(self.device)
        got = self.vae.post_quant_conv.in_channels
        if got != c:
            raise FlowmapError(
                f"the VAE {name} has {got} latent channels but the model samples {c}; use the model's VAE."
            )
        if "channel_mean" in ex and "channel_std" in ex:
            mean, std = ex["channel_mean"], ex["channel_std"]
        elif ex.get("stats"):
            stats = load_weights_only(resolve_file(latent.repo, ex["stats"]), "latent statistics file")
            if not isinstance(stats, dict):
                raise FlowmapError(f"the latent statistics file {ex['stats']} holds no dict; use the release's file.")
            if "mean" in stats and "std" in stats:  # LightningDiT latents_stats.pt
                mean, std = stats["mean"], stats["std"]
            elif "latents_scale" in stats and "latents_bias" in stats:  # REPA-E *-latents-stats.pt
                mean, std = stats["latents_bias"], 1.0 / torch.as_tensor(stats["latents_scale"]).double()
            else:
                raise FlowmapError(
                    f"the latent statistics file {ex['stats']} has neither mean/std nor latents_scale/bias."
                )
        else:
            mean, std = torch.zeros(c), torch.ones(c)
        self.mean = _as_channel_vector(mean, c, "mean").view(1, c, 1, 1).to(self.device)
        self.std = _as_channel_vector(std, c, "std").view(1, c, 1, 1).to(self.device)
        if not bool((self.std > 0).all()):
            raise FlowmapError("the latent std must be positive; the statistics file is damaged.")

    def check(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.latent.channels:
            raise FlowmapError(
                f"latents of shape {tuple(z.shape)} do not fit this VAE ({self.latent.channels} channels); use the decoder that matches the model."
            )

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (the VAE's own range, unclamped)."""
        self.check(z)
        return self.vae.decode(z.float().to(self.device) * self.std + self.mean)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents (a posterior sample, or its mean with sample=False)."""
        mean, logvar = self.vae.encode_moments(images.float().to(self.device))
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
            mean = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return (mean - self.mean) / self.std


def get_decoder(latent: LatentSpace, device="cpu"):
    """The decoder object for a latent space: `.decode(z) -> images in [-1, 1]`, `.encode(images) -> z`."""
    if latent.kind == "identity":
        return IdentityDecoder(latent)
    if latent.kind == "sd-vae":
        return SDVAEDecoder(latent, device)
    if latent.kind == "rae":
        return RAEDecoder(latent, device)
    if latent.kind == "ldm-vae":
        return LDMVAEDecoder(latent, device)
    raise FlowmapError(
        f"no decoder for latent space {latent.kind!r} in this version; supported: identity, sd-vae, rae, ldm-vae."
    )
