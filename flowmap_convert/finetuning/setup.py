"""Run set-up: the model to train, what trains, the attention backend, trackers, and size / memory reports."""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import kernels
from ..api import convert, load
from ..config import default_depth
from ..errors import FlowmapError
from ..layers import RMSNorm
from ..model import FlowMap
from .common import Calls
from .recipe import Recipe


def depth_origin(cfg, recipe: Recipe) -> str:
    """Where the encoder/decoder split of a run comes from, in words (printed before training)."""
    if recipe.depth is not None:
        return "--depth"
    if cfg.conditioning == "decoupled" and cfg.depth is not None:
        return "the model's own split"
    searched = (cfg.provenance.get("search") or {}).get("best_depth") if isinstance(cfg.provenance, dict) else None
    if isinstance(searched, int) and searched == default_depth(cfg):
        return "the depth search-depth chose, carried by the model"
    if cfg.arch == "mcg-ddt":
        return "DDT's encoder / decoder boundary"
    return "all encoder blocks (RAE)" if cfg.arch == "ddt" else "2/3 of the blocks"


def prepare_model(model_or_source, recipe: Recipe):
    """(model, depth origin): a decoupled FlowMap ready to train, converted from a source if needed, with a
    log-variance head for the adaptive loss."""
    if isinstance(model_or_source, FlowMap):
        model = model_or_source
    elif recipe.depth is not None:
        model = convert(str(model_or_source), depth=recipe.depth)
    else:  # loaded as it is, so that the split below (and its origin) follows config.default_depth
        model = load(str(model_or_source))
    origin = depth_origin(model.config, recipe)
    if model.config.conditioning == "velocity":
        model = model.with_depth(recipe.depth or default_depth(model.config))
    elif recipe.depth is not None and model.config.conditioning == "decoupled" and recipe.depth != model.config.depth:
        model = model.with_depth(recipe.depth)
    if recipe.qk_norm:
        add_qk_norm(model)
    if recipe.loss == "adaptive":
        model.add_logvar_head()  # DMF's log-variance head, zero-init: lv = 0 at the start
    needs_null = recipe.label_dropout > 0 or recipe.mg_scale > 0
    if needs_null and model.config.class_embed_rows <= model.config.num_classes:
        raise FlowmapError(
            "this model has no null-class embedding, which label dropout and model guidance need; pass `label_dropout` 0 and `mg_scale` 0."
        )
    return model.float(), origin


def add_qk_norm(model) -> None:
    """Add QK RMSNorm (DMF's: parameter `scale` = 1, eps 1e-6) to every attention that has none (DMF App. E).

    Added at fine-tune time, as DMF does at 512 px; the config says qk_norm "rms" so the export reloads it.
    """
    if model.config.qk_norm == "rms":
        return
    if model.config.qk_norm != "none" or model.config.arch != "dit":
        raise FlowmapError(
            f"`qk_norm` adds QK RMSNorm to a DiT-family model without QK norm; this one is {model.config.arch} with "
            f"qk_norm {model.config.qk_norm!r}; turn `qk_norm` off."
        )
    ref = next(model.parameters())
    for blk in model.net.blocks:
        attn = blk.attn
        attn.q_norm = RMSNorm(attn.head_dim).to(ref.device, ref.dtype)
        attn.k_norm = RMSNorm(attn.head_dim).to(ref.device, ref.dtype)
    model.config = model.config.replace(qk_norm="rms")


def set_trainable(model, part: str, loss: str = "adaptive") -> list[nn.Parameter]:
    """Freeze what --train excludes (docs/objectives.md, decoder-only fine-tuning).

    decoder: the embedders and blocks[:depth] stay fixed; decoder+time: the same but the timestep embedder trains
    (DMF Sec. 3.1 fine-tunes "the decoder (and timestep embeddings layers)"). Parameters an architecture defines as
    fixed (a sin-cos position table, RAE's random Fourier frequencies) never train. A log-variance head that the loss
    does not use (any loss but adaptive) stays frozen too: DDP needs a gradient for every parameter that trains.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    net = model.net
    if part in ("decoder", "decoder+time"):
        if not Calls.can_split(model):
            raise FlowmapError(f"`train` {part} needs a decoupled DiT-style flow map; use `train` all for this model.")
        for mod in (net.x_embedder, net.t_embedder, net.y_embedder, *net.blocks[: model.depth]):
            mod.requires_grad_(False)
        if hasattr(net, "s_embedder"):  # DDT / DiT^DH encoder input: runs in encode only, so it gets no gradient
            net.s_embedder.requires_grad_(False)
        if part == "decoder+time":
            net.t_embedder.requires_grad_(True)
    if hasattr(net, "pos_embed"):
        net.pos_embed.requires_grad_(False)  # fixed sin-cos table
    for mod in net.modules():
        for name in getattr(mod, "fixed_parameters", ()):
            getattr(mod, name).requires_grad_(False)
    if loss != "adaptive" and getattr(model, "logvar_linear", None) is not None:
        model.logvar_linear.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def with_attention_backend(method):
    """A Trainer method that runs with `recipe.attention` as the attention backend (`kernels.use_backend`): the
    choice holds for the run's own forwards only, and whatever default the caller had is back when it returns."""

    @functools.wraps(method)
    def scoped(self, *args, **kwargs):
        with kernels.use_backend(self.recipe.attention):
            return method(self, *args, **kwargs)

    return scoped


TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "trackio": ("trackio",),
    "swanlab": ("swanlab",),
}


def check_trackers(log_with) -> None:
    """Refuse --log-with names whose package is missing (Accelerate would only warn and log nothing)."""
    import importlib.util

    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    for name in (n.strip() for item in names for n in str(item).split(",")):
        if not name or name == "all":
            continue
        mods = TRACKER_MODULES.get(name)
        if mods is None:
            raise FlowmapError(f"unknown tracker {name!r} for `log_with`; choose from {', '.join(TRACKER_MODULES)}.")
        if not any(importlib.util.find_spec(m) for m in mods):
            raise FlowmapError(
                f"`log_with` {name} needs the `{mods[0]}` package; install it with `pip install {mods[0]}` or drop `log_with`."
            )


def count_params(model) -> dict:
    """Total / trainable / frozen parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": train, "frozen": total - train}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource  # POSIX only

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
