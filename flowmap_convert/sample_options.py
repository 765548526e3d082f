"""The options of `flowmap sample`, declared once (flowmap_convert.options): SampleSettings (every knob of a sampling
run, carried CLI -> search / eval -> sampler) and SampleRun (how many samples, where, which files).

Kept free of torch so that building the command line stays fast; the samplers live in sampling.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import FlowmapError
from .options import check, option, register
from .validate import INT64_MAX
from .vocabulary import default_out

SAMPLERS = ("euler", "heun", "restart", "ctm")
UINT8_FORMULA = "uint8(clamp(127.5 * x + 128, 0, 255)) for decoded x in [-1, 1] (ADM / DiT sample_ddp)"
MAX_NFE = 10_000
MAX_SHIFT = 1e4  # t' = s t / (1 + (s - 1) t): beyond 1e4 (or below 1e-4) every step but one is empty
MAX_CFG = 1e3
MAX_SAMPLES = 10_000_000
MAX_BATCH = 1_000_000


def _classes_text(text: str) -> tuple[int, ...]:
    """--classes text -> class ids (an empty list is an error, not 'all classes')."""
    try:
        ids = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise FlowmapError(f"`classes` must be a comma-separated list of integers, got {text!r}.") from None
    if not ids:
        raise FlowmapError(f"`classes` lists no class ({text!r}); pass e.g. 1,2,3 or leave it out.")
    return ids


@dataclass(frozen=True)
class SampleSettings:
    """Every knob of a sampling run; written next to the images as a JSON sidecar.

    Each field is declared once (flowmap_convert.options): `flowmap sample`'s options and the checks derive from it.
    `shift`, `cfg_scale` and `guidance_interval` of None mean "the model's default" (config.sampling); `resolve(model)` fills them in.
    """

    nfe: int = option(1, "Heun: (nfe + 1) // 2 steps.", concept="nfe", lo=1, hi=MAX_NFE)
    sampler: str = option("euler", concept="sampler", choices=SAMPLERS)
    shift: float | None = option(None, concept="shift", lo=1 / MAX_SHIFT, hi=MAX_SHIFT)
    cfg_scale: float | None = option(None, concept="cfg_scale", lo=0.0, hi=MAX_CFG)
    guidance_interval: tuple[float, float] | None = option(
        None, concept="guidance_interval", lo=0.0, hi=1.0, ordered=True
    )
    gamma: float = option(0.0, "CTM re-noising strength in [0, 1).", lo=0.0, hi=1.0, hi_open=True)
    seed: int = option(0, concept="seed", lo=0, hi=INT64_MAX)
    batch_size: int = option(64, concept="batch_size", lo=1, hi=MAX_BATCH)
    device: str | None = option(None, concept="device")
    classes: tuple[int, ...] | None = option(None, concept="classes", lo=0, parse=_classes_text)
    dtype: str = option("float32", "Model dtype the samples were drawn in (filled in by resolve).", cli=False)

    def __post_init__(self):
        """Every value checked finite and in range before any work (one FlowmapError naming the parameter)."""
        check(self)
        if self.classes is not None and not self.classes:
            raise FlowmapError("`classes` lists no class; pass e.g. 1,2,3 or leave it out.")

    @property
    def steps(self) -> int:
        """Integration steps (Heun spends two evaluations per step but the last)."""
        return self.nfe if self.sampler != "heun" else (self.nfe + 1) // 2

    def resolve(self, model) -> SampleSettings:
        """Fill the model's defaults (shift, cfg scale, dtype) and reject settings this model cannot use."""
        defaults = model.config.sampling or {}
        s = replace(
            self,
            shift=float(defaults.get("shift", 1.0)) if self.shift is None else self.shift,
            cfg_scale=float(defaults.get("cfg_scale", 1.0)) if self.cfg_scale is None else self.cfg_scale,
            guidance_interval=(
                (float(defaults.get("guidance_low", 0.0)), float(defaults.get("guidance_high", 1.0)))
                if self.guidance_interval is None
                else self.guidance_interval
            ),
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        )
        if s.sampler in ("restart", "ctm") and not model.config.is_flow_map:
            raise FlowmapError(
                f"the {s.sampler} sampler needs a flow map; convert the model first or use `sampler` euler/heun."
            )
        if s.cfg_scale != 1.0 and model.config.class_embed_rows <= model.config.num_classes:
            raise FlowmapError(
                "classifier-free guidance needs a null-class embedding, which this model lacks; use `cfg_scale` 1."
            )
        if s.classes:
            check_classes(model, s.classes)
        return s

    def validate(self, model) -> None:
        """Raise a FlowmapError when these settings cannot work with `model` (kept for callers of the old API)."""
        self.resolve(model)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["guidance_interval"] = list(self.guidance_interval) if self.guidance_interval is not None else None
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d

    def key(self) -> dict:
        """What the images depend on (not the batch size or the device): for resume checks and caches."""
        d = self.to_dict()
        d.pop("batch_size")
        d.pop("device")
        return d


register(SampleSettings)


def check_classes(model, classes: Sequence[int]) -> None:
    """Every class id is a label of this model (K, the null class, only when the model has one)."""
    k = model.config.num_classes
    for c in classes:
        if not 0 <= int(c) <= k or (int(c) == k and model.config.class_embed_rows <= k):
            raise FlowmapError(f"class {c} is out of range for a model with {k} classes; use labels 0..{k - 1}.")


@dataclass(frozen=True)
class SampleRun:
    """The options of a `flowmap sample` run besides the sampler's settings (how many, where, which files)."""

    num_samples: int | None = option(
        None, "Default: one per listed class, else 16.", concept="num_samples", lo=1, hi=MAX_SAMPLES
    )
    chunk_size: int = option(1000, "Samples per resumable chunk written to .OUT.partial/.", lo=1, hi=MAX_SAMPLES)
    threads: int | None = option(None, concept="threads", lo=1, hi=4096)
    out: Path = option(Path(default_out("sample")), "PNGs, grid.png and samples.json.", concept="out")
    npz: bool = option(False, "Also write an ADM-compatible samples.npz (arr_0: uint8 NHWC).")
    no_png: bool = option(False, "Skip the per-sample PNG files (grid.png is still written).")

    def __post_init__(self):
        check(self)


register(SampleRun)
