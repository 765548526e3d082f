"""The resolved recipe of a run, recorded in its directory (OUT/recipe.json), the plan printed before training, and
the rule that `--resume` continues exactly that run (a changed setting is refused in one line)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FlowmapError
from .recipe import Recipe
from .recipes import Resolved

RECORD = "recipe.json"
FORMAT = "flowmap-recipe/1"
# settings a resume may change: how long and how often, not what is computed
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "sample_every", "max_bad_steps")


def source_name(x) -> str | None:
    """A model or data source as recorded: its text, or None for an object passed in memory."""
    return str(x) if isinstance(x, (str, Path)) else None


def make_record(model, data, recipe_name, stages: list[Resolved], teacher: str | None) -> dict:
    """What OUT/recipe.json holds: sources, the recipe's name and every stage's resolved fields with their origins."""
    return {
        "format": FORMAT,
        "model": source_name(model),
        "data": source_name(data),
        "recipe": recipe_name,
        "teacher": teacher,
        "stages": [{"stage": r.stage, "fields": r.recipe.to_dict(), "origins": r.origins} for r in stages],
    }


def write_record(out: Path, record: dict) -> None:
    """Write OUT/recipe.json (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out / RECORD)


def read_record(out: Path) -> dict | None:
    """OUT/recipe.json, or None when the run has none (a run from an earlier version)."""
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        raise FlowmapError(
            f"{path} is not valid JSON; it records the run's recipe, so `resume` cannot continue."
        ) from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise FlowmapError(f"{path} is not a flowmap recipe record; `resume` cannot continue this run.")
    return rec


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def check_same_sources(record: dict, now: dict) -> None:
    """Refuse a resume from another model, data, recipe or teacher (checked before anything is loaded)."""
    for key in ("model", "data", "recipe", "teacher"):
        old, new = record.get(key), now.get(key)
        strict = key in ("recipe", "teacher")  # None is a value here (no recipe, the source as teacher)
        if old != new and (strict or (new is not None and old is not None)):
            flag = {"model": "MODEL", "recipe": "`recipe`", "data": "`data`", "teacher": "`teacher`"}[key]
            raise FlowmapError(
                f"`resume` continues the run as it was started: {flag} was {old}, now {new}; drop it or start a new "
                "run with another `out`."
            )


def check_same_run(record: dict, now: dict) -> None:
    """Refuse a resume that changes anything but the run's length and cadence, naming the setting and both values."""
    check_same_sources(record, now)
    old_stages = [s["stage"] for s in record["stages"]]
    new_stages = [s["stage"] for s in now["stages"]]
    if old_stages != new_stages and max(len(old_stages), len(new_stages)) > 1:  # one stage: its objective below
        raise FlowmapError(
            f"`resume` continues the run as it was started: `stages` were {','.join(old_stages)}, now "
            f"{','.join(new_stages)}; drop it or start a new run with another `out`."
        )
    for old_s, new_s in zip(record["stages"], now["stages"]):
        old_f, new_f = old_s["fields"], new_s["fields"]
        for k in new_f:
            if k in RESUMABLE_CHANGES or k not in old_f:
                continue
            if _norm(old_f[k]) != _norm(new_f[k]):
                raise FlowmapError(
                    f"`resume` continues the run as it was started: `{k}` was {_show(old_f[k])}, now {_show(new_f[k])}; "
                    "drop it or start a new run with another `out`."
                )


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def resumed_given(record: dict, given: dict) -> dict:
    """The options of a resume: those the run was started with, then what the user typed now (checked after)."""
    first = record["stages"][0]
    out = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in first["fields"].items()
        if first["origins"].get(k) == "option"
    }
    out.update(given)
    return out


def plan_table(stages: list[Resolved], recipe_name: str | None, why: str, recipes: list[Recipe]) -> str:
    """Every field of every stage with its value and where it came from (recipe NAME: source / option / model / default)."""
    head = f"recipe: {recipe_name} ({why})" if recipe_name else f"recipe: none ({why}); Recipe defaults"
    lines = [head]
    for k, (res, rec) in enumerate(zip(stages, recipes)):
        if len(stages) > 1:
            lines.append(f"stage {k + 1}/{len(stages)}: {res.stage}")
        for name, value in rec.to_dict().items():
            origin = res.origins.get(name, "default")
            if name == "time_shift" and res.recipe.time_shift is None:
                origin = "model: sqrt(C H W / 4096) of its latent"
            elif name == "batch_size" and res.recipe.batch_size is None:
                origin = f"global_batch {res.recipe.global_batch} / (processes x grad_accum): see the line below"
            elif name == "depth" and value is None:
                origin = "model (the split in the line below)"
            lines.append(f"  {name:<18} {_show(value):<12} {origin}")
    return "\n".join(lines)


def guidance_warning(config, stages: list[Resolved]) -> str | None:
    """A warning when a class-conditional ImageNet-size model trains DMF without model guidance (DMF App. B)."""
    if config.num_classes < 1000 or config.latent.image_size < 256:
        return None
    for r in stages:
        if r.recipe.objective in ("dmf", "mft", "fm") and r.recipe.mg_scale == 0 and r.stage != "mft":
            return (
                "warning: this class-conditional ImageNet-size model trains without guidance (`mg_scale` 0); DMF App. B "
                "reports 1-NFE FID 8.89 without model guidance vs 2.16 with it (`mg_scale` 0.6)."
            )
    return None
