"""The papers' recipes as data: every training setting with where it comes from (table, section or released config).

A named recipe is a set of Recipe field values, each with its source; a staged recipe (MF-RAE) adds stages that run
one after another in one run directory, each with its own values. `resolve` turns a recipe, the model and the
options the user typed into the Recipe of every stage plus the origin of every field (printed in the plan).

Sources: DMF = Decoupled MeanFlow (arXiv 2510.24474), Tab. 6 and App. B / C / E; MF-RAE = MeanFlow with
Representation Autoencoders (arXiv 2511.13019), Sec. 3.2 / 4 and its released training code (training_losses_cmt_v2,
training_losses_mfd, the MF and CMT train configs), summarised in docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import default_depth
from ..errors import FlowmapError
from .recipe import Recipe

Values = dict[str, tuple[Any, str]]  # field -> (value, source)


@dataclass(frozen=True)
class Stage:
    """One stage of a staged recipe: a name (cmt / mfd / mft) and the fields it sets on top of the recipe's."""

    name: str
    values: Values
    optional: bool = False  # run only when asked (--stages)


@dataclass(frozen=True)
class Named:
    """A named recipe: what it is for, its values with their sources, and its stages (empty: one stage)."""

    name: str
    summary: str
    values: Values
    stages: tuple[Stage, ...] = ()
    default_stages: tuple[str, ...] = ()

    def stage_names(self) -> tuple[str, ...]:
        """All stages the recipe knows (in order)."""
        return tuple(s.name for s in self.stages)


# ---------------------------------------------------------------------------------------------------- DMF
T6 = "DMF Tab. 6"


def _dmf(name: str, column: str, depth: int, mg: float, interval: tuple[float, float], steps: int, **extra) -> Named:
    values: Values = {
        "objective": ("dmf", "DMF Sec. 3, Alg. 1 (FM + MeanFlow loss)"),
        "train": ("all", "DMF Sec. 3.1 (the whole model is fine-tuned for 1-step quality)"),
        "depth": (depth, f"{T6} 'DMF depth', {column}"),
        "steps": (steps, f"{T6} 'DMF flow map training: Training iteration', {column}"),
        "batch_size": (None, f"{T6} 'Batch size' is global: split over processes"),
        "global_batch": (256, f"{T6} 'Batch size'"),
        "grad_accum": (1, "DMF scripts (no accumulation)"),
        "lr": (1e-4, f"{T6} 'Learning rate'"),
        "betas": ((0.9, 0.95), f"{T6} 'Adam beta'"),
        "weight_decay": (0.0, f"{T6} 'Adam weight decay'"),
        "grad_clip": (1.0, "DMF train script (grad clip 1.0)"),
        "ema": (0.9999, f"{T6} 'EMA decay rate'"),
        "ema_warmup": (False, f"{T6} (a constant EMA decay)"),
        "loss": ("adaptive", "DMF loss.py log_lv_loss (adaptive log-variance loss, eps 0.01)"),
        "logvar_eps": (0.01, "DMF loss.py log_lv_loss"),
        "derivative": ("jvp", "DMF loss.py (torch.func.jvp)"),
        "fm_mean": (0.0, f"{T6} 'Time proposal' (FM)"),
        "fm_std": (1.0, "DMF train script (P_std 1.0)"),
        "time_proposal": ((0.4, -1.2), f"{T6} 'Time proposal' (t, r)"),
        "time_std": (1.0, "DMF train script (P_std_t = P_std_r = 1.0)"),
        "mg_scale": (mg, f"{T6} 'Model guidance scale', {column}"),
        "guidance_interval": (interval, f"{T6} 'Guidance interval', {column}"),
        "label_dropout": (0.1, f"{T6} 'Class dropout probability'"),
        "qk_norm": (False, f"{T6} 'QK norm', {column}"),
        "sample_shift": (1.0, "DMF App. C (no shift at 256 px)"),
    }
    for k, v in extra.items():
        values[k] = v
    return Named(name, f"DMF-{column} fine-tune of a converted flow model", values)


DMF_B2 = _dmf("dmf-b2-256", "B/2 256", 8, 0.5, (0.0, 1.0), 400_000)
DMF_L2 = _dmf("dmf-l2-256", "L/2 256", 18, 0.6, (0.0, 0.7), 400_000)
DMF_XL2 = _dmf("dmf-xl2-256", "XL/2 256", 20, 0.6, (0.0, 0.7), 400_000)
DMF_XL2_512 = _dmf(
    "dmf-xl2-512",
    "XL/2 512",
    20,
    0.6,
    (0.0, 0.8),
    700_000,
    qk_norm=(True, f"{T6} 'QK norm' (512 column) and App. E (QK RMSNorm added for DMF training at 512 px)"),
    sample_shift=(1.5, "DMF App. C (shift 1.5 for ImageNet 512)"),
)

# ---------------------------------------------------------------------------------------------------- MF-RAE
MF = "MF-RAE"


def _mfrae(res: int) -> Named:
    at512 = res == 512
    common: Values = {
        "train": ("all", f"{MF} Sec. 3.5 (the whole DiT^DH trains)"),
        "lr": (1e-4, f"{MF} Sec. 4 'Hyperparameter Simplicity' (lr 1e-4, fixed)"),
        "betas": ((0.9, 0.95), f"{MF} train configs (AdamW betas)"),
        "weight_decay": (0.0, f"{MF} train configs"),
        "warmup": (0, f"{MF} train configs (constant lr)"),
        "ema_warmup": (False, f"{MF} train code (a constant EMA decay)"),
        "mg_scale": (0.0, f"{MF} Sec. 1 / 4 (no guidance)"),
        "label_dropout": (0.1, f"{MF} train code (10% labels -> null, hard-coded)"),
        "time_shift": (None, f"{MF} sample_mf: RAE's shift sqrt(C H W / 4096), from the model"),
        "sample_shift": (1.0, f"{MF} sample_ddp_mf (no shift, uniform steps)"),
        "qk_norm": (False, "RAE DiT^DH config (qknorm False)"),
    }
    cmt: Values = {
        "objective": ("cmt", f"{MF} Sec. 3.2 (Consistency Mid-Training)"),
        "loss": ("mse", f"{MF} Eq. 3 / training_losses_cmt_v2 (plain MSE)"),
        "cmt_states": (16, f"{MF} Sec. 3.2 (16-step Euler teacher trajectory)"),
        "cmt_pairs": (
            8 if at512 else 64,
            f"{MF} training_losses_cmt_{'512' if at512 else 'v2'} ({8 if at512 else 64} pairs drawn per trajectory)",
        ),
        "steps": (27_000, f"{MF} Sec. 4 (CMT mid-training for 27K iterations{'; 512 px not stated' if at512 else ''})"),
        "batch_size": (None, f"{MF} CMT config batch is global: split over processes"),
        "global_batch": (8, f"{MF} CMT config (global batch 8)"),
        "grad_accum": (2, f"{MF} CMT config (grad accum 2)"),
        "ema": (0.999, f"{MF} CMT config (EMA 0.999)"),
        "derivative": ("fd", f"{MF} (no derivative in CMT; fd for the later stages)"),
    }
    distill: Values = {
        "loss": ("mfrae", f"{MF} training_losses_mfd: w = sg(1 / (m^2 + 1e-3)), loss w m^2"),
        "adaptive_c": (1e-3, f"{MF} training_losses_mfd (c = 1e-3)"),
        "adaptive_p": (1.0, f"{MF} training_losses_mfd (p = 1.0)"),
        "derivative": ("fd", f"{MF} Sec. 3.5 (finite differences)"),
        "fd_delta": (5e-3, f"{MF} training_losses_mfd (delta_t 5e-3)"),
        "ratio_r_neq_t": (0.25, f"{MF} sample_mf (ratio 1/4)"),
        "batch_size": (None, f"{MF} Sec. 4 batch is global: split over processes"),
        "global_batch": (128 if at512 else 256, f"{MF} Sec. 4 (batch 256/128 for ImageNet 256/512)"),
        "grad_accum": (4, f"{MF} MF_XL train config (accum 4)"),
        "ema": (0.9995 if at512 else 0.9999, f"{MF} Sec. 4 (EMA 0.9999/0.9995 for ImageNet 256/512)"),
    }
    mfd_steps = (
        (20_000, f"{MF} Sec. 4.3 (MFD for 20K iterations at 512)")
        if at512
        else (
            180_000,
            f"{MF} Sec. 4 (MFD post-training, 180K iterations)",
        )
    )
    mft_steps = (10_000, f"{MF} Sec. 4.3 (MFT for 10K more iterations{'' if at512 else ', as at 512'})")
    stages = (
        Stage("cmt", cmt),
        Stage("mfd", {"objective": ("mfd", f"{MF} Sec. 3.3 (MeanFlow distillation)"), "steps": mfd_steps, **distill}),
        Stage(
            "mft",
            {"objective": ("mft", f"{MF} Sec. 3.4 (bootstrapping with MFT)"), "steps": mft_steps, **distill},
            optional=not at512,
        ),
    )
    default = ("cmt", "mfd", "mft") if at512 else ("cmt", "mfd")
    return Named(f"mf-rae-{res}", f"MF-RAE {res} px: CMT -> MFD (-> MFT) on an RAE DiT^DH", common, stages, default)


MF_RAE_256 = _mfrae(256)
MF_RAE_512 = _mfrae(512)

DIGITS = Named(
    "digits",
    "the builtin digits demo: a few minutes on 2 CPU cores",
    {
        "objective": ("dmf", "benchmarks/digits/FINETUNE.md (DMF fine-tune of builtin:digits-sit)"),
        "steps": (200, "benchmarks/digits/FINETUNE.md (0.65-0.88 s/step on 2 CPU cores)"),
        "batch_size": (32, "benchmarks/digits/FINETUNE.md"),
        "mg_scale": (0.0, "benchmarks/digits/FINETUNE.md (model guidance makes the converged digits model worse)"),
        "ema": (-1.0, "benchmarks/digits/FINETUNE.md (1 - 10/steps for a short run)"),
        "ema_warmup": (True, "benchmarks/digits/FINETUNE.md"),
    },
)

RECIPES: dict[str, Named] = {r.name: r for r in (DMF_B2, DMF_L2, DMF_XL2, DMF_XL2_512, MF_RAE_256, MF_RAE_512, DIGITS)}


# ---------------------------------------------------------------------------------------------------- choice
ARCH_NAMES = {"dit": "DiT", "lightningdit": "LightningDiT", "mcg-ddt": "DDT"}


def model_values(config) -> dict[str, tuple[Any, str]]:
    """Fields the model itself fixes over any recipe (below the options typed): DDT's split is its own boundary."""
    if config.arch == "mcg-ddt":
        return {"depth": (default_depth(config), "the model: DDT's encoder / decoder boundary")}
    return {}


def default_recipe(config, source=None) -> tuple[str | None, str]:
    """(recipe name or None, why): the recipe a model gets when none is named, from family, size and resolution."""
    src = str(source) if isinstance(source, str) else str((config.provenance or {}).get("source", ""))
    if src.startswith("builtin:") or str((config.provenance or {}).get("source", "")).startswith("builtin:"):
        return "digits", "a builtin model"
    res = config.latent.image_size
    blocks, hidden = config.num_blocks, config.hidden_size
    if config.arch == "ddt" and res in (256, 512):
        return f"mf-rae-{res}", f"an RAE DiT^DH at {res} px"
    # DiT / SiT / REPA / REPA-E, LightningDiT and DDT: the same rule, DMF's recipe for the transformer's size
    # (a LightningDiT-XL/1 or DDT-XL/2 is an XL transformer; DDT keeps its own split, model_values)
    if config.arch in ("dit", "lightningdit", "mcg-ddt") and config.num_classes == 1000:
        size = {(12, 768): "b2", (24, 1024): "l2", (28, 1152): "xl2"}.get((blocks, hidden))
        name = f"dmf-{size}-{res}" if size else None
        if name in RECIPES:
            return name, f"a {blocks}-block, {hidden}-wide {ARCH_NAMES[config.arch]} at {res} px"
    return None, "no named recipe fits this model (family, blocks, width, resolution)"


def get(name: str) -> Named:
    """A named recipe; a one-line error listing the names otherwise."""
    if name not in RECIPES:
        raise FlowmapError(f"unknown `recipe` {name!r}; choose one of {', '.join(RECIPES)} (see `list_recipes`).")
    return RECIPES[name]


@dataclass
class Resolved:
    """One stage's Recipe and the origin of each of its fields."""

    stage: str
    recipe: Recipe
    origins: dict[str, str] = field(default_factory=dict)


def resolve(
    named: Named | None,
    given: dict[str, Any],
    stages: tuple[str, ...] | None = None,
    model: dict[str, tuple[Any, str]] | None = None,
) -> list[Resolved]:
    """The Recipe of every stage: Recipe defaults < the recipe's values < the stage's values < what the model fixes
    (`model`, e.g. model_values) < the options given.

    `given` holds only the options the user typed; `batch_size` typed alone drops a recipe's `global_batch`.
    """
    given = dict(given)
    if "batch_size" in given and "global_batch" not in given:
        given["global_batch"] = None
    if named is None:
        if stages is not None:
            staged = ", ".join(r.name for r in RECIPES.values() if r.stages)
            raise FlowmapError(f"`stages` needs a staged recipe ({staged}); name one with `recipe` or drop `stages`.")
        stage_list: tuple[Stage | None, ...] = (None,)
    elif named.stages:
        want = stages if stages is not None else named.default_stages
        unknown = [s for s in want if s not in named.stage_names()]
        if unknown or not want:
            raise FlowmapError(
                f"`stages` {','.join(want) or '(none)'} does not fit recipe {named.name}; choose from "
                f"{','.join(named.stage_names())}."
            )
        stage_list = tuple(s for s in named.stages if s.name in want)
    else:
        if stages is not None:
            raise FlowmapError(f"recipe {named.name} has no stages; drop `stages`.")
        stage_list = (None,)
    if "objective" in given and len(stage_list) > 1:
        raise FlowmapError(f"recipe {named.name} runs its stages' objectives; use `stages` instead of `objective`.")
    out = []
    for st in stage_list:
        values, origins = {}, {}
        layers = [(named.values if named else {}, f"recipe {named.name}" if named else "")]
        if st is not None:
            layers.append((st.values, f"recipe {named.name}, stage {st.name}"))
        layers.append((model or {}, "model"))
        for vals, label in layers:
            for k, (v, src) in vals.items():
                values[k], origins[k] = v, f"{label}: {src}"
        for k, v in given.items():
            values[k], origins[k] = v, "option"
        out.append(Resolved(st.name if st else (values.get("objective") or "dmf"), Recipe(**values), origins))
    return out


def table() -> str:
    """The recipes as a text table (flowmap finetune --list-recipes): the values every stage trains with."""
    keys = ("objective", "depth", "steps", "batch", "lr", "ema", "mg_scale", "guidance_interval", "loss", "derivative")
    rows = [("recipe", "stage", *keys)]
    for r in RECIPES.values():
        for st, res in zip(r.stages or (None,), resolve(r, {}, r.stage_names() or None)):
            vals = res.recipe.to_dict()
            g = vals["global_batch"]
            vals["batch"] = f"{g} global" if g else f"{vals['batch_size']}/process"
            if vals["objective"] not in ("dmf", "mft", "fm"):
                vals["mg_scale"] = None  # no guidance target in cmt / mfd
            if not vals["mg_scale"]:
                vals["guidance_interval"] = None
            if vals["ema"] < 0:
                vals["ema"] = "1-10/steps"
            if vals["objective"] in ("dmf", "fm", "cmt"):
                vals["derivative"] = None if vals["objective"] != "dmf" else vals["derivative"]
            stage = "-" if st is None else st.name + (" (optional)" if st.optional else "")
            rows.append((r.name, stage, *(_cell(vals.get(k)) for k in keys)))
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, width)).rstrip() for row in rows]
    lines += [
        "",
        "Sources of every value: docs/objectives.md; `flowmap finetune MODEL --recipe NAME --dry-run` prints them.",
    ]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, list):
        v = tuple(v)
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return ",".join(f"{x:g}" for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
