"""The training recipe: one frozen dataclass holding every fine-tuning option (written into config.training).

Each field is declared once with flowmap_convert.options: its type, default, range or choices and help. The
`flowmap finetune` options, the `finetune()` keywords and the checks are all derived from these declarations.
The named recipes of the papers (finetuning/recipes.py) are values for these fields, each with its source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import options as op
from ..errors import FlowmapError
from ..options import option
from ..validate import INT64_MAX

OBJECTIVES = ("dmf", "mfd", "mft", "cmt", "fm")
LOSSES = ("adaptive", "adaptive-weight", "mfrae", "mse")
DERIVATIVES = ("jvp", "fd")
TRAIN_PARTS = ("decoder", "decoder+time", "all")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION = ("auto", "triton", "sdpa", "math")


def _seed_text(text: str) -> int:
    """--seed text -> an int ('1e3' is read as 1000; fractions, NaN and 1e20 are refused by the range check)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise FlowmapError(f"`seed` must be an integer, got {text!r}.") from None


@dataclass(frozen=True)
class Recipe:
    """Every knob of a fine-tuning run. The defaults are the fallback where no named recipe sets a field."""

    objective: str = option(
        "dmf",
        "dmf (FM + MeanFlow, DMF), mfd (MeanFlow distillation from the teacher), mft (MeanFlow training), "
        "cmt (consistency mid-training), fm (flow matching only).",
        choices=OBJECTIVES,
    )
    train: str = option(
        "all",
        "all; decoder (the blocks from --depth on + head; encoder and embedders frozen, run once without gradient, "
        "fastest); or decoder+time (DMF Sec. 3.1: the decoder and the timestep embedder).",
        choices=TRAIN_PARTS,
    )
    steps: int = option(1000, "Optimizer steps (of each stage of a staged recipe).", lo=1)
    batch_size: int | None = option(
        64,
        "Here: per process and micro-step (None: global_batch / (processes x grad_accum)).",
        lo=1,
        concept="batch_size",
    )
    global_batch: int | None = option(
        None,
        "Samples per optimizer step over all processes and micro-steps (used when batch_size is not given).",
        lo=1,
    )
    grad_accum: int = option(1, "Micro-batches per optimizer step.", lo=1)
    lr: float = option(1e-4, "AdamW learning rate.", lo=0.0, lo_open=True)
    betas: tuple[float, float] = option(
        (0.9, 0.95), "AdamW betas B1,B2.", lo=0.0, hi=1.0, hi_open=True, metavar="B1,B2"
    )
    weight_decay: float = option(0.0, "AdamW weight decay.", lo=0.0)
    warmup: int = option(0, "Linear learning-rate warm-up steps.", lo=0)
    grad_clip: float = option(1.0, "Max global gradient norm (0: off).", lo=0.0)
    ema: float = option(-1.0, "EMA decay (negative: 1 - 10/steps clipped to [0.9, 0.9999]).", hi=1.0, hi_open=True)
    ema_warmup: bool = option(
        True, "EMA warm-up: decay_n = min(ema, (1 + n) / (10 + n)), early EMA follows the weights."
    )
    loss: str = option(
        "adaptive",
        "adaptive (DMF log-variance loss), adaptive-weight (MeanFlow: |e|^2 / (|e|^2 + c)^p, weight detached), "
        "mfrae (MF-RAE's released code: |e|^4 / (|e|^4 + c)^p) or mse.",
        choices=LOSSES,
    )
    adaptive_p: float = option(1.0, "Power p of the adaptive weight.", lo=0.0)
    adaptive_c: float = option(1e-3, "Constant c of the adaptive weight.", lo=0.0, lo_open=True)
    logvar_eps: float = option(
        0.01, "eps inside log(mse exp(-lv) + eps) (DMF log-variance loss).", lo=0.0, lo_open=True
    )
    derivative: str = option(
        "jvp", "jvp (torch.func.jvp) or fd (central finite difference, one batched call).", choices=DERIVATIVES
    )
    fd_delta: float = option(5e-3, "Finite-difference step.", lo=0.0, hi=0.5, lo_open=True, hi_open=True)
    fm_mean: float = option(0.0, "Logit-normal mean of the flow-matching time.")
    fm_std: float = option(1.0, "Logit-normal std of the flow-matching time.", lo=0.0, lo_open=True)
    time_proposal: tuple[float, float] = option(
        (0.4, -1.2), "Logit-normal means of the two MeanFlow times (t = max, r = min).", metavar="T,R"
    )
    time_std: float = option(1.0, "Logit-normal std of the MeanFlow times.", lo=0.0, lo_open=True)
    ratio_r_neq_t: float = option(0.25, "MF-RAE mfd/mft: share of samples with r != t.", lo=0.0, hi=1.0)
    time_shift: float | None = option(
        None,
        "Time shift s t / (1 + (s - 1) t) of the mfd/mft/cmt times (default: from the latent shape, "
        "sqrt(C H W / 4096), as RAE and MF-RAE).",
        lo=0.0,
        lo_open=True,
    )
    cmt_states: int = option(16, "CMT teacher trajectory length (Euler states, MF-RAE Eq. 3).", lo=2, hi=100_000)
    cmt_pairs: int = option(1, "CMT (i, j) pairs drawn per teacher trajectory.", lo=1, hi=100_000)
    mg_scale: float = option(
        0.0, "Model guidance omega in [0, 1) (effective CFG 1/(1 - omega)); 0 disables.", lo=0.0, hi=1.0, hi_open=True
    )
    guidance_interval: tuple[float, float] = option(
        (0.0, 0.7),
        "Here: model guidance during training.",
        lo=0.0,
        hi=1.0,
        ordered=True,
        concept="guidance_interval",
    )
    label_dropout: float = option(0.1, "Share of labels replaced by the null class.", lo=0.0, hi=1.0, hi_open=True)
    qk_norm: bool = option(
        False, "Add QK RMSNorm (scale 1) to every attention before fine-tuning (DMF App. E, 512 px)."
    )
    sample_shift: float = option(1.0, "Sampling time shift recorded in the exported model's defaults.", lo=1e-4, hi=1e4)
    teacher: str | None = option(
        None, "MFD/CMT teacher: a flow model source (default: the pretrained model the run started from)."
    )
    precision: str = option(
        "auto", "auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (fp16 is refused).", choices=PRECISIONS
    )
    attention: str = option("auto", "Attention backend: auto, triton, sdpa or math.", choices=ATTENTION)
    seed: int = option(
        0,
        "Here it also orders the data and draws the times (0 to 2^63 - 1).",
        lo=0,
        hi=INT64_MAX,
        parse=_seed_text,
        concept="seed",
    )
    checkpoint_every: int = option(500, "Steps between checkpoints (0: at the end only).", lo=0)
    checkpoint_minutes: float = option(
        10.0,
        "Also a checkpoint when this many minutes passed since the last (0: off; bounds the loss on preemption).",
        lo=0.0,
        hi=1e6,
    )
    sample_every: int = option(0, "Steps between sample grids in OUT/samples (0: at the end only).", lo=0)
    log_every: int = option(10, "Steps between console lines when no progress bar is shown.", lo=1)
    max_bad_steps: int = option(5, "Non-finite steps in a row before rolling back to the last checkpoint.", lo=1)
    depth: int | None = option(
        None,
        "Encoder/decoder split when MODEL is a base flow model (default: the recipe's, else the depth search-depth "
        "chose, else 2/3 of the blocks).",
        lo=1,
        hi=100_000,
        short="-d",
    )

    def __post_init__(self):
        """Validate every field (one FlowmapError naming the parameter), then the rules between fields."""
        op.check(self)
        if self.batch_size is None and self.global_batch is None:
            raise FlowmapError("give `batch_size` (per process) or `global_batch` (over all processes).")
        if self.precision == "fp16":
            raise FlowmapError(
                "fp16 is refused: JVP tangents and the log-variance loss overflow or underflow in half precision "
                "without loss scaling; use `precision` bf16 (or fp32)."
            )

    def per_process_batch(self, processes: int) -> int:
        """The micro-batch of one process: batch_size, else global_batch / (processes x grad_accum) (must divide)."""
        if self.batch_size is not None:
            return self.batch_size
        parts = processes * self.grad_accum
        if self.global_batch % parts:
            raise FlowmapError(
                f"`global_batch` {self.global_batch} does not split over {processes} process(es) x {self.grad_accum} "
                "accumulation steps; give `batch_size` or change `grad_accum`."
            )
        return self.global_batch // parts

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
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kw)


def latent_shift(config) -> float:
    """sqrt(C H W / 4096) for the model's latent (C channels, H = W = input size): RAE / MF-RAE's shift (sqrt 48 at 256 px)."""
    return math.sqrt(config.in_channels * config.input_size**2 / 4096)


op.register(Recipe)
