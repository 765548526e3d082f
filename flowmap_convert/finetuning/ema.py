"""Exponential moving average of the trainable weights (what a fine-tuning run exports).

The shadow holds the trainable tensors only: a frozen tensor's average is the tensor itself, so the model's own
weights stand in for it (docs/memory.md). The EMA model (`model_view`) is built from the shadow's tensors
and the model's frozen ones, so sample grids and the export need no second copy of the weights.
"""

from __future__ import annotations

import copy

import torch


def _trainable(model) -> dict:
    """name -> parameter for the parameters that train."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


class EMA:
    """Exponential moving average of the trainable weights, with warm-up decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: p.detach().clone().float() for k, p in _trainable(model).items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        """One EMA step on the parameters that train."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for name, p in _trainable(model).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # ema = d ema + (1 - d) p
        self.updates += 1

    def nbytes(self) -> int:
        """Bytes held by the shadow."""
        return sum(v.numel() * v.element_size() for v in self.shadow.values())

    def state_dict(self) -> dict:
        """Shadow weights and update count, for checkpoints."""
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of state_dict; copied into the shadow in place (a checkpoint of an older format may also carry
        frozen tensors, which are the model's own weights and are skipped)."""
        with torch.no_grad():
            for k, v in self.shadow.items():
                v.copy_(sd["shadow"][k])
        self.updates = int(sd["updates"])

    @torch.no_grad()
    def copy_to(self, model) -> None:
        """Copy the EMA weights into a model with the same parameter names (frozen tensors stay as they are)."""
        params = dict(model.named_parameters())
        for k, v in self.shadow.items():
            params[k].copy_(v)

    def model_view(self, model):
        """The model with the EMA weights, built without copying a weight: its trainable tensors are the shadow's own
        (as frozen parameters) and every other tensor is the model's (shared). Changes as the shadow does."""
        memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad}
        for name, p in model.named_parameters():
            if name in self.shadow:
                memo[id(p)] = torch.nn.Parameter(self.shadow[name], requires_grad=False)
        return copy.deepcopy(model, memo=memo).eval()
