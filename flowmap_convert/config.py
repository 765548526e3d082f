"""Typed, serialisable configuration: what `config.json` of an exported model holds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import FlowmapError

# Every convention a source can speak; adapters pick one, the model translates at its boundary (docs/conventions.md).
TIME_CONVENTIONS = (
    "canonical",  # t=1 noise, t=0 data, network returns v = eps - x0 (REPA, DMF, RAE, our own)
    "reversed",  # original SiT: t=1 data, network returns x0 - eps
    "ddpm-eps",  # original / diffusers DiT: integer DDPM step, network returns epsilon (issue 3)
)
CONDITIONINGS = (
    "velocity",  # a base flow model: every block and the head see t (r is ignored)
    "decoupled",  # DMF: blocks[:depth] see t, blocks[depth:] and the head see r
    "meanflow",  # MF-RAE: an extra embedder of (t - r) added to the t embedding
)


SD_VAE_SCALE = 0.18215  # the SD-VAE latent scale every DiT-family code base hard-codes (docs/checkpoints.md)


@dataclass(frozen=True)
class LatentSpace:
    """Where the model's samples live and how to turn them into pixels."""

    kind: str = "identity"  # identity | sd-vae | rae
    channels: int = 4  # latent channels C
    size: int = 32  # latent side length
    image_channels: int = 3  # channels of the decoded image
    image_size: int = 256  # side of the decoded image
    repo: str | None = None  # decoder location (Hub id or local path), e.g. stabilityai/sd-vae-ft-ema
    scale: float = 1.0  # latent = (raw - bias) * scale; SD-VAE uses SD_VAE_SCALE
    bias: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. RAE stats file, encoder id


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a flow map without its source checkpoint."""

    arch: str = "dit"  # backbone family in flowmap_convert.backbones
    input_size: int = 32  # latent side length
    in_channels: int = 4  # latent channels
    patch_size: int = 2
    hidden_size: int = 1152
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # K; label K is the null class
    class_embed_rows: int = 1001  # K + 1 when a null embedding exists
    learn_sigma: bool = False  # the source head has 2C output channels; only the first C are used
    qk_norm: str = "none"  # none | rms (DMF's RMSNorm, param `scale`) | layernorm (timm, REPA)
    time_convention: str = "canonical"
    conditioning: str = "velocity"
    depth: int | None = None  # encoder/decoder split for "decoupled"; None for base models
    logvar: bool = False  # the small log-variance head of DMF's adaptive loss
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific architecture fields
    latent: LatentSpace = field(default_factory=LatentSpace)
    provenance: dict[str, Any] = field(default_factory=dict)  # source id, revision, file, sha256, version
    training: dict[str, Any] = field(default_factory=dict)  # recipe and guidance defaults after fine-tuning
    sampling: dict[str, Any] = field(default_factory=dict)  # default sampler settings (shift, cfg, nfe)

    def __post_init__(self):
        if self.time_convention not in TIME_CONVENTIONS:
            raise FlowmapError(f"unknown time convention {self.time_convention!r}; expected one of {TIME_CONVENTIONS}.")
        if self.conditioning not in CONDITIONINGS:
            raise FlowmapError(f"unknown conditioning {self.conditioning!r}; expected one of {CONDITIONINGS}.")
        if self.conditioning == "decoupled":
            check_depth(self.depth, self.num_blocks)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (nested dicts are taken as given)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the content of config.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from config.json content; unknown keys are a user error naming them."""
        data = dict(data)
        data.pop("flowmap_format", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FlowmapError(
                f"config.json has unknown fields {unknown}; it was written by a newer flowmap, upgrade with `pip install -U flowmap-convert`."
            )
        latent = data.get("latent") or {}
        if isinstance(latent, dict):
            lnames = {f.name for f in dataclasses.fields(LatentSpace)}
            data["latent"] = LatentSpace(**{k: v for k, v in latent.items() if k in lnames})
        return cls(**data)

    @property
    def out_channels(self) -> int:
        """Channels the source head produces (2C with learn_sigma)."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def is_flow_map(self) -> bool:
        """True when the model takes a distinct next time r (not just a velocity field)."""
        return self.conditioning != "velocity"


def default_depth(cfg: ModelConfig) -> int:
    """The one default encoder/decoder split, used by convert, finetune and the digits demo.

    In order: the split of a model that is already decoupled; the depth `flowmap search-depth` chose for this
    model (`provenance["search"]["best_depth"]`, written by `--write-best`); for RAE DiT^DH all encoder blocks
    (the whole DDT head sees r); otherwise 2/3 of the blocks (DMF's choice, 20 of 28 for SiT-XL/2).
    """
    n = cfg.num_blocks
    if cfg.conditioning == "decoupled" and cfg.depth is not None:
        return cfg.depth
    searched = (cfg.provenance.get("search") or {}).get("best_depth") if isinstance(cfg.provenance, dict) else None
    if isinstance(searched, int) and not isinstance(searched, bool) and 1 <= searched <= n:
        return searched
    if cfg.arch == "ddt":
        return n
    return max(1, round(2 * n / 3))


def check_depth(depth: Any, num_blocks: int) -> int:
    """Validate an encoder/decoder split: legal depths are 1..N."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_blocks:
        raise FlowmapError(
            f"depth {depth} is out of range for a model with {num_blocks} blocks; choose a depth from 1 to {num_blocks}."
        )
    return depth
