"""The training recipe: one frozen dataclass holding every fine-tuning option (written into config.training)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import FlowmapError
from ..validate import finite_float, int_in_range, interval, seed

OBJECTIVES = ("dmf", "mfd", "mft", "cmt", "fm")
LOSSES = ("adaptive", "adaptive-weight", "mfrae", "mse")
DERIVATIVES = ("jvp", "fd")
TRAIN_PARTS = ("decoder", "decoder+time", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("auto", "triton", "sdpa", "math")


@dataclass(frozen=True)
class Recipe:
    """Every knob of a fine-tuning run; defaults follow DMF's ImageNet scripts (docs/objectives.md) unless noted."""

    objective: str = (
        "dmf"  # dmf (FM + MeanFlow, 2510.24474) | mfd | mft | cmt (MF-RAE, 2511.13019) | fm (flow matching only)
    )
    train: str = (
        "all"  # all | decoder (blocks[depth:] + head) | decoder+time (also the timestep embedder, DMF Sec. 3.1)
    )
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
    loss: str = "adaptive"  # adaptive (DMF log-variance) | adaptive-weight (MeanFlow) | mfrae (MF-RAE's code) | mse
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
    checkpoint_minutes: float = 10.0  # also a checkpoint when this many minutes passed since the last (0: off)
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
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Every number finite and in range, named as its command-line option (before any work starts)."""

        def opt(name):
            return f"--{name.replace('_', '-')}"

        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_bad_steps"):
            int_in_range(opt(name), getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every", "sample_every"):
            int_in_range(opt(name), getattr(self, name), 0)
        finite_float("`checkpoint_minutes`", self.checkpoint_minutes, 0.0, 1e6)
        int_in_range("--cmt-states", self.cmt_states, 2, 100_000)
        seed("--seed", self.seed)
        if self.depth is not None:
            int_in_range("--depth", self.depth, 1, 100_000)
        finite_float("--lr", self.lr, 0.0, lo_open=True)
        for k, b in enumerate(self.betas):
            finite_float(f"AdamW beta{k + 1}", b, 0.0, 1.0, hi_open=True)
        finite_float("--weight-decay", self.weight_decay, 0.0)
        finite_float("--grad-clip", self.grad_clip, 0.0)
        finite_float("--ema", self.ema, hi=1.0, hi_open=True)
        finite_float("--adaptive-p", self.adaptive_p, 0.0)
        finite_float("--adaptive-c", self.adaptive_c, 0.0, lo_open=True)
        finite_float("--logvar-eps", self.logvar_eps, 0.0, lo_open=True)
        finite_float("--fd-delta", self.fd_delta, 0.0, 0.5, lo_open=True, hi_open=True)
        finite_float("--fm-mean", self.fm_mean)
        finite_float("--fm-std", self.fm_std, 0.0, lo_open=True)
        if len(self.time_proposal) != 2:
            raise FlowmapError(f"--time-proposal takes 2 numbers, got {self.time_proposal!r}.")
        for k, m in enumerate(self.time_proposal):
            finite_float(f"--time-proposal {'tr'[k]} mean", m)
        finite_float("--time-std", self.time_std, 0.0, lo_open=True)
        finite_float("--ratio-r-neq-t", self.ratio_r_neq_t, 0.0, 1.0)
        finite_float("--time-shift", self.time_shift, 0.0, lo_open=True)
        finite_float("--mg-scale", self.mg_scale, 0.0, 1.0, hi_open=True)  # effective CFG scale 1 / (1 - omega)
        if len(self.guidance_interval) != 2:
            raise FlowmapError(f"--guidance-interval takes 2 numbers, got {self.guidance_interval!r}.")
        interval("--guidance-interval", *self.guidance_interval)
        finite_float("--label-dropout", self.label_dropout, 0.0, 1.0, hi_open=True)

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
