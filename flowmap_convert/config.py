"""Typed, serialisable configuration: what `config.json` of an exported model holds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .budget import check_model
from .errors import FlowmapError

LATENT_KINDS = ("identity", "sd-vae", "rae", "ldm-vae")  # ldm-vae: VA-VAE / E2E-VAE (decoders.LDMVAEDecoder)
QK_NORMS = ("none", "rms", "layernorm")
MAX_BLOCKS = 1024  # no transformer flowmap reads comes near; a larger count is a damaged or hostile file
# Plausible ranges of the size fields (a config.json outside them is damaged, not a bigger model).
INT_RANGES = {
    "input_size": (1, 4096),
    "in_channels": (1, 4096),
    "patch_size": (1, 256),
    "hidden_size": (1, 65536),
    "num_blocks": (1, MAX_BLOCKS),
    "num_heads": (1, 4096),
    "num_classes": (0, 10_000_000),
    "class_embed_rows": (1, 10_000_001),
}
LATENT_INT_RANGES = {"channels": (1, 4096), "size": (1, 4096), "image_channels": (1, 64), "image_size": (1, 65536)}
NUMERIC_SAMPLING = ("shift", "cfg_scale", "gamma", "nfe", "guidance_low", "guidance_high")


def _where(where: str | None) -> str:
    return where or "config.json"


def _int_field(name: str, value: Any, lo: int, hi: int, where: str | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlowmapError(f"{_where(where)}: {name} must be an integer, got {value!r}; re-export the model.")
    if not lo <= value <= hi:
        raise FlowmapError(f"{_where(where)}: {name} = {value} is outside [{lo}, {hi}]; the file is damaged.")


def _float_field(name: str, value: Any, where: str | None, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and not 0 < value <= 1e6):
        what = "a positive finite number" if positive else "a finite number"
        raise FlowmapError(f"{_where(where)}: {name} must be {what}, got {value!r}; re-export the model.")


def _check_latent(latent: Any, where: str | None) -> None:
    if not isinstance(latent, LatentSpace):
        raise FlowmapError(f"{_where(where)}: latent must be an object, got {latent!r}; re-export the model.")
    if latent.kind not in LATENT_KINDS:
        raise FlowmapError(f"{_where(where)}: latent.kind {latent.kind!r} is not one of {', '.join(LATENT_KINDS)}.")
    for name, (lo, hi) in LATENT_INT_RANGES.items():
        _int_field(f"latent.{name}", getattr(latent, name), lo, hi, where)
    _float_field("latent.scale", latent.scale, where)
    _float_field("latent.bias", latent.bias, where)
    if latent.repo is not None and not isinstance(latent.repo, str):
        raise FlowmapError(f"{_where(where)}: latent.repo must be a string or null, got {latent.repo!r}.")
    if not isinstance(latent.extra, dict):
        raise FlowmapError(f"{_where(where)}: latent.extra must be an object, got {latent.extra!r}.")


# Every convention a source can speak; adapters pick one, the model translates at its boundary (docs/conventions.md).
TIME_CONVENTIONS = (
    "canonical",  # t=1 noise, t=0 data, network returns v = eps - x0 (REPA, DMF, RAE, our own)
    "reversed",  # original SiT: t=1 data, network returns x0 - eps
    "ddpm-eps",  # original / diffusers DiT: integer DDPM step, network returns epsilon (docs/conventions.md)
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

    kind: str = "identity"  # identity | sd-vae | rae | ldm-vae
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

    arch: str = "dit"  # the backbone module: "dit" (dit.py) or "ddt" (ddt.py), built by model.build_backbone
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
        self.validate()

    def validate(self, where: str | None = None) -> None:
        """Types and plausible ranges of every field; one FlowmapError naming the field otherwise."""
        if not isinstance(self.arch, str):
            raise FlowmapError(f"{_where(where)}: arch must be a string, got {self.arch!r}.")
        for name, (lo, hi) in INT_RANGES.items():
            _int_field(name, getattr(self, name), lo, hi, where)
        _float_field("mlp_ratio", self.mlp_ratio, where, positive=True)
        check_model(self, _where(where))  # sizes multiplied out against the memory here, before anything is built
        if self.hidden_size % self.num_heads:
            raise FlowmapError(
                f"{_where(where)}: num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}."
            )
        if self.patch_size > self.input_size:
            raise FlowmapError(f"{_where(where)}: patch_size {self.patch_size} exceeds input_size {self.input_size}.")
        for name in ("learn_sigma", "logvar"):
            if not isinstance(getattr(self, name), bool):
                raise FlowmapError(f"{_where(where)}: {name} must be true or false, got {getattr(self, name)!r}.")
        if self.qk_norm not in QK_NORMS:
            raise FlowmapError(f"{_where(where)}: qk_norm {self.qk_norm!r} is not one of {', '.join(QK_NORMS)}.")
        for name in ("extra", "provenance", "training", "sampling"):
            if not isinstance(getattr(self, name), dict):
                raise FlowmapError(f"{_where(where)}: {name} must be an object, got {getattr(self, name)!r}.")
        for name in NUMERIC_SAMPLING:
            if name in self.sampling:
                _float_field(f"sampling.{name}", self.sampling[name], where)
        _check_latent(self.latent, where)
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, int)):
            raise FlowmapError(f"{_where(where)}: depth must be an integer or null, got {self.depth!r}.")
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
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> ModelConfig:
        """Rebuild from config.json content; unknown keys, wrong types and absurd sizes are one error each."""
        if not isinstance(data, dict):
            raise FlowmapError(
                f"{_where(where)} holds a JSON {type(data).__name__}, not an object; re-export the model."
            )
        data = dict(data)
        data.pop("flowmap_format", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - names))
        if unknown:
            raise FlowmapError(
                f"{_where(where)} has unknown fields {unknown}; it was written by a newer flowmap, upgrade with `pip install -U flowmap-convert`."
            )
        latent = data.get("latent", {})
        if not isinstance(latent, dict):
            raise FlowmapError(f"{_where(where)}: latent must be an object, got {latent!r}; re-export the model.")
        lnames = {f.name for f in dataclasses.fields(LatentSpace)}
        data["latent"] = LatentSpace(**{k: v for k, v in latent.items() if k in lnames})
        try:
            cfg = cls.__new__(cls)
            for f in dataclasses.fields(cls):  # fill without __post_init__, then validate with the file's name
                value = data[f.name] if f.name in data else dataclasses.MISSING
                if value is dataclasses.MISSING:
                    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                object.__setattr__(cfg, f.name, value)
        except TypeError as e:
            raise FlowmapError(f"{_where(where)} is not a flowmap config ({e}); re-export the model.") from None
        cfg.validate(where)
        return cfg

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
    (the whole DDT head sees r); for MCG-NJU's DDT its encoder / decoder boundary (22 of 28); otherwise 2/3 of the blocks (DMF's choice, 20 of 28 for SiT-XL/2).
    """
    n = cfg.num_blocks
    if cfg.conditioning == "decoupled" and cfg.depth is not None:
        return cfg.depth
    searched = (cfg.provenance.get("search") or {}).get("best_depth") if isinstance(cfg.provenance, dict) else None
    if isinstance(searched, int) and not isinstance(searched, bool) and 1 <= searched <= n:
        return searched
    if cfg.arch == "ddt":
        return n
    if cfg.arch == "mcg-ddt" and isinstance(cfg.extra.get("encoder_blocks"), int):
        return cfg.extra["encoder_blocks"]  # DDT's own encoder / decoder boundary: its velocity decoder sees r
    return max(1, round(2 * n / 3))


def check_depth(depth: Any, num_blocks: int) -> int:
    """Validate an encoder/decoder split: legal depths are 1..N."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_blocks:
        raise FlowmapError(
            f"depth {depth} is out of range for a model with {num_blocks} blocks; choose a depth from 1 to {num_blocks}."
        )
    return depth
