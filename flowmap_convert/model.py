"""FlowMap: any backbone behind one call, u = model(x, t, r, y), in canonical time (t=1 noise, t=0 data)."""

from __future__ import annotations

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from .config import ModelConfig, check_depth
from .errors import FlowmapError
from .io import load_canonical_state_dict, read_model_files, write_model_dir
from .layers import timestep_embedding


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """Instantiate the network named by cfg.arch (registry keyed by family name)."""
    if cfg.arch == "dit":
        from .dit import DiT

        return DiT(cfg)
    if cfg.arch == "ddt":
        from .ddt import DiTDH  # RAE DiT^DH (issue 3)

        return DiTDH(cfg)
    raise FlowmapError(f"unknown architecture {cfg.arch!r} in config.json; this flowmap knows 'dit' and 'ddt'.")


def as_time(t, batch: int, device) -> torch.Tensor:
    """Any scalar, (B,), (B,1) or (B,1,1,1) time -> a (B,) fp32 tensor (times never run in low precision)."""
    t = torch.as_tensor(t, device=device)
    t = t.float().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise FlowmapError(f"got {t.numel()} times for a batch of {batch}; pass one time per sample or a scalar.")
    return t


class FlowMap(nn.Module, ModelHubMixin, library_name="flowmap-convert", tags=["flow-map", "meanflow"]):
    """A flow map u(x_t, t, r): x_r = x_t + (r - t) * u; at r = t it is the source's velocity eps - x0."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.net = build_backbone(config)
        # DMF's log-variance head for the adaptive loss (REFERENCE §2.5): cat[emb128(t), emb128(r)] -> 1.
        self.logvar_linear = nn.Linear(256, 1) if config.logvar else None
        if self.logvar_linear is not None:
            nn.init.zeros_(self.logvar_linear.weight)
            nn.init.zeros_(self.logvar_linear.bias)

    # ------------------------------------------------------------------ convention boundary
    @property
    def depth(self) -> int:
        """Blocks conditioned on t; the remaining blocks and the head see r."""
        return self.config.depth if self.config.conditioning == "decoupled" else self.config.num_blocks

    def source_time(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical t -> the time the source network was trained with."""
        if self.config.time_convention == "reversed":
            return 1.0 - t  # original SiT: t=1 is data
        return t

    def forward(self, x: torch.Tensor, t, r=None, y=None, return_logvar: bool = False):
        """Average velocity from t to r (r defaults to t, i.e. the instantaneous velocity)."""
        b = x.shape[0]
        t = as_time(t, b, x.device)
        r = t if r is None else as_time(r, b, x.device)
        y = self.null_labels(b, x.device) if y is None else torch.as_tensor(y, device=x.device).long().reshape(-1)
        if self.config.conditioning == "velocity":
            r = t  # a base flow model has no notion of a next time
        if hasattr(self.net, "forward_flowmap"):  # families with their own convention handling (DiT eps, RAE)
            u = self.net.forward_flowmap(x, t, r, y, self.depth)
        elif self.config.time_convention == "ddpm-eps":
            u = self._ddpm_velocity(x, t, r, y)
        else:
            raw = self.net.forward_split(x, self.source_time(t), self.source_time(r), y, self.depth)
            u = raw[:, : self.config.in_channels]  # learn_sigma heads: keep the mean channels
            if self.config.time_convention == "reversed":
                u = -u  # SiT predicts x0 - eps
        if return_logvar:
            return u, self.logvar(t, r)
        return u

    def _ddpm_velocity(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Epsilon-prediction DDPM source (DiT): SNR-matched input and times, eps -> v at t (flowmap_convert.ddpm).

        blocks[:depth] see the DDPM time of t, blocks[depth:] and the head the DDPM time of r; the output
        epsilon is turned into a velocity with the algebra of the current state (x_t, t).
        """
        from .ddpm import default_schedule, eps_to_velocity, snr_matched_input

        sch = default_schedule()
        x_src = snr_matched_input(x, t)  # x_ddpm = x_t / sqrt((1-t)^2 + t^2)
        tau_t, tau_r = sch.ddpm_time(t).float(), sch.ddpm_time(r).float()  # continuous steps, clamped to [0, 999]
        raw = self.net.forward_split(x_src, tau_t, tau_r, y, self.depth)
        eps_pred = raw[:, : self.config.in_channels]  # learn_sigma: ch[C:2C] is the variance interpolation
        return eps_to_velocity(eps_pred, x, t, sch).to(x.dtype)

    def velocity(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        """Instantiate velocity v(x_t, t) = u(x_t, t, t)."""
        return self(x, t, t, y)

    def logvar(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Per-sample log-variance (B,1,1,1) of the adaptive loss; zeros without a head."""
        if self.logvar_linear is None:
            return torch.zeros(t.shape[0], 1, 1, 1, device=t.device)
        feats = torch.cat([timestep_embedding(t, 128), timestep_embedding(r, 128)], dim=-1)
        return self.logvar_linear(feats.to(self.logvar_linear.weight.dtype)).float().reshape(-1, 1, 1, 1)

    def null_labels(self, batch: int, device) -> torch.Tensor:
        """The unconditional label K for every sample (needs a null row in the class table)."""
        if self.config.class_embed_rows <= self.config.num_classes:
            raise FlowmapError("this model has no null-class embedding; pass class labels with --classes.")
        return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ conversion helpers
    def with_depth(self, depth: int) -> FlowMap:
        """The same weights as a decoupled flow map split at `depth` (no new parameters)."""
        if self.config.conditioning == "meanflow":
            raise FlowmapError(
                "this model is already a MeanFlow flow map with its own (t - r) embedder; use it without --depth."
            )
        check_depth(depth, self.config.num_blocks)
        cfg = self.config.replace(conditioning="decoupled", depth=depth)
        out = FlowMap.__new__(FlowMap)
        nn.Module.__init__(out)
        out.config = cfg
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
