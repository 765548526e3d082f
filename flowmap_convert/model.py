"""FlowMap: any backbone behind one call, u = model(x, t, r, y), in canonical time (t=1 noise, t=0 data)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .config import ModelConfig, check_depth
from .ddpm import default_schedule, eps_to_velocity, snr_matched_input
from .ddt import MCGDDT, DiTDH
from .dit import DiT
from .errors import FlowmapError
from .io import load_canonical_state_dict, read_model_files, write_model_dir
from .layers import timestep_embedding
from .lightningdit import LightningDiT


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network named by cfg.arch (registry keyed by family name)."""
    if cfg.arch == "dit":
        return DiT(cfg)
    if cfg.arch == "ddt":
        return DiTDH(cfg)  # RAE DiT^DH
    if cfg.arch == "mcg-ddt":
        return MCGDDT(cfg)  # MCG-NJU's DDT
    if cfg.arch == "lightningdit":
        return LightningDiT(cfg)
    raise FlowmapError(
        f"unknown architecture {cfg.arch!r} in config.json; this flowmap knows 'dit', 'ddt', 'mcg-ddt' and 'lightningdit'."
    )


def as_time(t, batch: int, device) -> torch.Tensor:
    """Any scalar, (B,), (B,1) or (B,1,1,1) time -> a (B,) tensor: float64 stays float64, anything else is fp32.

    Times never run in low precision. Float64 is kept because one float32 ulp of t near 1 moves a DDPM source's
    step by about 1e-4 at step 999 (docs/conventions.md); each backbone casts its own source time to fp32 at the end.
    """
    t = torch.as_tensor(t, device=device)
    t = (t if t.dtype == torch.float64 else t.float()).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise FlowmapError(f"got {t.numel()} times for a batch of {batch}; pass one time per sample or a scalar.")
    return t


def make_logvar_head() -> nn.Linear:
    """DMF's log-variance head of the adaptive loss (DMF Eq. 6): Linear(cat[emb128(t), emb128(r)]) -> 1, zero-init."""
    head = nn.Linear(256, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class FlowState(NamedTuple):
    """What `FlowMap.encode` hands to `FlowMap.decode`: the canonical x_t and t, and the backbone's encoder state.

    `h` is in the backbone's own source time (DiT tokens after blocks[:depth]; a (tokens, head-input) pair for
    DiT^DH; None for a family that cannot split, whose decode then runs the whole network). A NamedTuple, so
    torch.func.jvp carries tangents for every field.
    """

    x: torch.Tensor
    t: torch.Tensor
    h: Any


class FlowMap(nn.Module, ModelHubMixin, library_name="flowmap-convert", tags=["flow-map", "meanflow"]):
    """A flow map u(x_t, t, r): x_r = x_t + (r - t) * u; at r = t it is the source's velocity eps - x0.

    The one place where source conventions meet canonical time (docs/conventions.md): backbones compute in their
    own time; `encode` / `decode` translate (reversed SiT time and sign, DDPM epsilon with the SNR-matched input,
    the learn_sigma slice), and `forward` is decode(encode(x, t, y), r, y).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.net = build_backbone(config)
        self.logvar_linear = make_logvar_head() if config.logvar else None

    def add_logvar_head(self) -> None:
        """Give the model a zero-initialised log-variance head (lv = 0 at the start) unless it has one."""
        if self.logvar_linear is None:
            self.logvar_linear = make_logvar_head()
            self.config = self.config.replace(logvar=True)

    # ------------------------------------------------------------------ convention boundary
    @property
    def depth(self) -> int:
        """Blocks conditioned on t; the remaining blocks and the head see r."""
        return self.config.depth if self.config.conditioning == "decoupled" else self.config.num_blocks

    @property
    def can_split(self) -> bool:
        """True when encode really runs the first blocks once (False for MF-RAE's (t - r) embedder)."""
        return self.config.conditioning != "meanflow" and hasattr(self.net, "encode")

    def source_time(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical t -> the time the source network was trained with (fp32; the DDPM step for epsilon sources)."""
        conv = self.config.time_convention
        if conv == "ddpm-eps":
            return default_schedule().ddpm_time(t).float()  # float64 inversion, cast at the end
        if conv == "reversed":
            return (1.0 - t).float()  # original SiT: t=1 is data
        return t.float()

    def encode(self, x: torch.Tensor, t, y=None) -> FlowState:
        """Run the t-conditioned part once: blocks[:depth] on the source time of t (the SNR-matched input for DDPM)."""
        b = x.shape[0]
        t = as_time(t, b, x.device)
        y = self.labels(y, b, x.device)
        if not self.can_split:
            return FlowState(x, t, None)  # decode runs the whole network
        x_src = x
        if self.config.time_convention == "ddpm-eps":
            x_src = snr_matched_input(x, t)  # x_ddpm = x_t / sqrt((1-t)^2 + t^2)
        return FlowState(x, t, self.net.encode(x_src, self.source_time(t), y, self.depth))

    def decode(self, state: FlowState, r=None, y=None) -> torch.Tensor:
        """Average velocity u(x_t, t, r) in canonical time from an encoder state (r defaults to the state's t)."""
        x, t = state.x, state.t
        b = x.shape[0]
        r = t if r is None else as_time(r, b, x.device)
        y = self.labels(y, b, x.device)
        if self.config.conditioning == "velocity":
            r = t  # a base flow model has no notion of a next time
        if state.h is None:
            return self.net.forward_flowmap(x, t.float(), r.float(), y, self.depth)  # canonical-time family
        raw = self.net.decode(state.h, self.source_time(r), y, self.depth)
        out = raw[:, : self.config.in_channels]  # learn_sigma heads: ch[C:2C] is the variance, dropped
        conv = self.config.time_convention
        if conv == "ddpm-eps":
            return eps_to_velocity(out, x, t, default_schedule()).to(x.dtype)  # eps -> v at the state (x_t, t)
        if conv == "reversed":
            return -out  # SiT predicts x0 - eps
        return out

    def forward(self, x: torch.Tensor, t, r=None, y=None, return_logvar: bool = False):
        """Average velocity from t to r (r defaults to t, i.e. the instantaneous velocity)."""
        state = self.encode(x, t, y)
        u = self.decode(state, r, y)
        if return_logvar:
            plain = r is None or self.config.conditioning == "velocity"
            return u, self.logvar(state.t, state.t if plain else as_time(r, x.shape[0], x.device))
        return u

    def labels(self, y, batch: int, device) -> torch.Tensor:
        """Class labels as a (B,) long tensor; None -> the null class."""
        return self.null_labels(batch, device) if y is None else torch.as_tensor(y, device=device).long().reshape(-1)

    def velocity(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        """Instantiate velocity v(x_t, t) = u(x_t, t, t)."""
        return self(x, t, t, y)

    def logvar(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Per-sample log-variance (B,1,1,1) of the adaptive loss; zeros without a head."""
        if self.logvar_linear is None:
            return torch.zeros(t.shape[0], 1, 1, 1, device=t.device)
        t, r = t.float(), r.float()
        feats = torch.cat([timestep_embedding(t, 128), timestep_embedding(r, 128)], dim=-1)
        return self.logvar_linear(feats.to(self.logvar_linear.weight.dtype)).float().reshape(-1, 1, 1, 1)

    def null_labels(self, batch: int, device) -> torch.Tensor:
        """The unconditional label K for every sample (needs a null row in the class table)."""
        if self.config.class_embed_rows <= self.config.num_classes:
            raise FlowmapError("this model has no null-class embedding; pass class labels with `classes`.")
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ conversion helpers
    def with_depth(self, depth: int) -> FlowMap:
        """The same weights as a decoupled flow map split at `depth` (no new parameters)."""
        if self.config.conditioning == "meanflow":
            raise FlowmapError(
                "this model is already a MeanFlow flow map with its own (t - r) embedder; use it without `depth`."
            )
        check_depth(depth, self.config.num_blocks)
        return self.view(self.config.replace(conditioning="decoupled", depth=depth))

    def view(self, config: ModelConfig) -> FlowMap:
        """The same weights (backbone and log-variance head shared, not copied) under another config."""
        out = FlowMap.__new__(FlowMap)
        nn.Module.__init__(out)
        out.config = config
        out.net = self.net
        out.logvar_linear = self.logvar_linear
        return out

    def num_parameters(self) -> int:
        """Total parameter count (frozen tables included)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ hub mixin
    def _save_pretrained(self, save_directory) -> None:
        write_model_dir(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, **kwargs):
        from pathlib import Path

        if not Path(model_id).is_dir():
            from huggingface_hub import snapshot_download

            model_id = snapshot_download(
                model_id,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=["config.json", "model.safetensors", "README.md"],
            )
        return read_model_dir(model_id)


def read_model_dir(directory) -> FlowMap:
    """Rebuild a FlowMap from an exported directory, strictly (io.read_model_files reads and checks the files).

    The module is built on the meta device and the file's tensors are assigned into it after the key/shape check,
    so a config.json with absurd sizes costs nothing unless the weights file really holds that many numbers.
    """
    cfg, sd = read_model_files(directory)
    what = f"{directory}/model.safetensors"
    with torch.device("meta"):
        model = FlowMap(cfg)
    load_canonical_state_dict(model, {k: v.float() for k, v in sd.items()}, what, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a non-persistent buffer stayed on meta
        model = FlowMap(cfg)
        load_canonical_state_dict(model, sd, what)
    return model.eval()
