"""The training recipe: one frozen dataclass holding every fine-tuning option (written into config.training)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import FlowmapError

OBJECTIVES = ("dmf", "mfd", "mft", "cmt", "fm")
LOSSES = ("adaptive", "adaptive-weight", "mse")
DERIVATIVES = ("jvp", "fd")
TRAIN_PARTS = ("decoder", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("auto", "triton", "sdpa", "math")


@dataclass(frozen=True)
class Recipe:
    """Every knob of a fine-tuning run; defaults follow DMF's ImageNet scripts (docs/objectives.md) unless noted."""

    objective: str = (
        "dmf"  # dmf (FM + MeanFlow, 2510.24474) | mfd | mft | cmt (MF-RAE, 2511.13019) | fm (flow matching only)
    )
    train: str = "all"  # all parameters, or the decoder only (blocks[depth:] + head; encoder and embedders frozen)
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per-process micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate (DMF: 1e-4)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (DMF, MF-RAE)
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # max global gradient norm (DMF: 1.0); 0 disables
    ema: float = -1.0  # EMA decay; < 0 picks one from the run length (see ema_decay())
    ema_warmup: bool = True  # decay_n = min(ema, (1 + n) / (10 + n)): early EMA follows the weights
    loss: str = "adaptive"  # adaptive (DMF log-variance loss) | adaptive-weight (MeanFlow 1/(|e|^2+c)^p) | mse
    adaptive_p: float = 1.0  # power p of the adaptive weight (MeanFlow / MF-RAE)
    adaptive_c: float = 1e-3  # constant c of the adaptive weight
    logvar_eps: float = 0.01  # eps inside log(mse * exp(-lv) + eps) (DMF log_lv_loss)
    derivative: str = "jvp"  # jvp (torch.func.jvp) | fd (central finite difference, MF-RAE)
    fd_delta: float = 5e-3  # finite-difference step (MF-RAE delta_t)
    fm_mean: float = 0.0  # logit-normal mean of the FM time (DMF P_mean)
    fm_std: float = 1.0
    time_proposal: tuple[float, float] = (0.4, -1.2)  # logit-normal means of the two MF times (P_mean_t, P_mean_r)
    time_std: float = 1.0  # logit-normal std of the MF times (P_std_t = P_std_r)
    ratio_r_neq_t: float = 0.25  # MF-RAE MFT/MFD: share of samples with r != t
    time_shift: float = 1.0  # MF-RAE time shift s t / (1 + (s - 1) t) for MFT/MFD/CMT times
    cmt_states: int = 16  # CMT teacher trajectory length (MF-RAE Eq. 3, docs/objectives.md)
    mg_scale: float = 0.0  # DMF model guidance omega (0 disables; DMF uses 0.6)
    guidance_interval: tuple[float, float] = (0.0, 0.7)  # model guidance only for g_min <= t <= g_max (DMF 256: 0..0.7)
    label_dropout: float = 0.1  # share of labels replaced by the null class K
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16; fp16 is refused
    attention: str = "auto"  # attention backend for flowmap_convert.kernels
    seed: int = 0
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    log_every: int = 10  # steps between metric lines
    max_bad_steps: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint
    depth: int | None = None  # split used when the source is a base velocity model

    def __post_init__(self):
        """Validate every field; a FlowmapError names the option and the fix."""

        def one_of(name, value, options):
            if value not in options:
                raise FlowmapError(
                    f"--{name.replace('_', '-')} {value!r} is not supported; choose one of {', '.join(options)}."
                )

        one_of("objective", self.objective, OBJECTIVES)
        one_of("loss", self.loss, LOSSES)
        one_of("derivative", self.derivative, DERIVATIVES)
        one_of("train", self.train, TRAIN_PARTS)
        one_of("precision", self.precision, PRECISIONS)
        one_of("attention", self.attention, ATTENTION)
        if self.precision == "fp16":
            raise FlowmapError(
                "fp16 is refused: JVP tangents and the log-variance loss overflow or underflow in half precision without "
                "loss scaling; use --precision bf16 (or fp32)."
            )
        for name in ("steps", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise FlowmapError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise FlowmapError(f"--lr must be positive, got {self.lr}.")
        if not 0.0 <= self.mg_scale < 1.0:
            raise FlowmapError(
                f"--mg-scale must be in [0, 1) (the effective CFG scale is 1/(1 - omega)), got {self.mg_scale}."
            )
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise FlowmapError(f"the guidance interval must satisfy 0 <= g_min <= g_max <= 1, got ({lo}, {hi}).")
        if not 0.0 <= self.label_dropout < 1.0:
            raise FlowmapError(f"--label-dropout must be in [0, 1), got {self.label_dropout}.")
        if not 0.0 < self.fd_delta < 0.5:
            raise FlowmapError(f"--fd-delta must be in (0, 0.5), got {self.fd_delta}.")
        if self.ema >= 1.0:
            raise FlowmapError(f"--ema must be below 1 (or negative for automatic), got {self.ema}.")
        if self.cmt_states < 2:
            raise FlowmapError(f"--cmt-states must be at least 2, got {self.cmt_states}.")

    def ema_decay(self) -> float:
        """The EMA decay: as given, else 1 - 10 / steps clipped to [0.9, 0.9999] so the EMA forgets its start in a short run."""
        if self.ema >= 0:
            return float(self.ema)
        return float(min(0.9999, max(0.9, 1.0 - 10.0 / self.steps)))

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Inverse of to_dict; unknown keys are ignored with no effect on training."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)
