"""Exponential moving average of the trainable weights (what a fine-tuning run exports)."""

from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the trainable weights, with warm-up decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        """One EMA step on the parameters that train."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # ema = d ema + (1 - d) p
        self.updates += 1

    def state_dict(self) -> dict:
        """Shadow weights and update count, for checkpoints."""
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of state_dict."""
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}
        self.updates = int(sd["updates"])

    def copy_to(self, model) -> None:
        """Load the EMA weights into a model with the same keys."""
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in sd.items()})
