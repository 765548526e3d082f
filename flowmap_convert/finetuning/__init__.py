"""`flowmap finetune` as a function: DMF / MeanFlow fine-tuning of a flow map with the papers' recipes.

recipes.py holds the named recipes, runrecord.py the record a resume continues, trainer.py the loop."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FlowmapError
from ..outputs import check_workdir
from ..validate import int_in_range
from . import recipes as rc
from . import runrecord as rr
from .recipe import Recipe
from .recipes import RECIPES
from .runrecord import RECORD

__all__ = ["finetune", "Recipe", "RECIPES", "check_run_dir"]

BUILTIN = "builtin:digits-sit"


def guidance_note(model_or_source, mg_scale: float) -> str | None:
    """A one-line note where model guidance is known not to suit the model."""
    if mg_scale > 0 and isinstance(model_or_source, str) and model_or_source == BUILTIN:
        return (
            f"note: model guidance makes the converged {BUILTIN} worse (digits FD 18/23/24 at 1/2/4 steps with "
            "--mg-scale 0.6 vs 3.9/2.7/2.8 without; benchmarks/digits/FINETUNE.md); --mg-scale 0 suits it."
        )
    return None


def stage_dir(out: Path, k: int, n: int, name: str) -> Path:
    """Where stage k of n trains: the last one in OUT itself (its export is the run's model), earlier ones beside it."""
    return out if k == n - 1 else out / "stages" / f"{k + 1}-{name}"


def finetune(
    model_or_source=None,
    data=None,
    *,
    recipe: str | Recipe | None = None,
    stages=None,
    out="flowmap-finetune",
    resume: bool = False,
    dry_run: bool = False,
    dry_run_steps: int = 3,
    log_with=None,
    device=None,
    threads: int | None = None,
    progress=None,
    console=None,
    grid: bool = True,
    workers: int | None = None,
    **options,
):
    """Fine-tune a flow map (a FlowMap or any source `flowmap convert` reads) and export its EMA weights to `out`.

    `data` defaults to builtin:digits (on a resume: the run's). `recipe` names one of RECIPES (default: the one that
    fits the model, `digits` for a builtin); every Recipe field can be passed as a keyword and overrides the recipe's value (e.g. `lr=5e-5`, `derivative="fd"`, `depth=4`). A
    staged recipe (mf-rae-*) runs its `stages` (default: the recipe's) one after another in `out`. The resolved
    recipe is recorded in `out`/recipe.json; `resume=True` continues exactly that run. Returns the EMA FlowMap, or
    with dry_run=True a report dict (parameters, peak memory, seconds per step) and nothing written. Every option is
    checked before anything is loaded or written. `workers`: DataLoader processes reading batches ahead
    (default: finetuning.loader.default_workers).
    """
    import copy

    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from ..runtime import resolve_device, set_threads

    if model_or_source is None and not resume:
        model_or_source = BUILTIN
    if data is None and not resume:
        data = "builtin:digits"
    names = {f for f in Recipe.__dataclass_fields__}
    unknown = sorted(set(options) - names)
    if unknown:
        raise FlowmapError(f"unknown fine-tuning option `{unknown[0]}`; see docs/objectives.md for the recipe fields.")
    given = dict(options)
    if isinstance(recipe, Recipe):  # an explicit Recipe: every field as if typed
        given = {**recipe.to_dict(), **given}
        given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        recipe = None
    for k, v in list(given.items()):  # each typed value checked now, named as its parameter
        Recipe(**{k: v, **({"global_batch": 1} if k == "batch_size" and v is None else {})})
    if isinstance(stages, str):
        stages = tuple(s for s in stages.replace(" ", "").split(",") if s)
    named = rc.get(recipe) if isinstance(recipe, str) else None
    dev = resolve_device(device)
    if threads is not None:
        int_in_range("`threads`", threads, 1, 4096)
    int_in_range("`dry_run_steps`", dry_run_steps, 1, 10_000)
    if workers is not None:
        # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
        from .loader import MAX_WORKERS

        int_in_range("`workers`", workers, 0, 8 * MAX_WORKERS)
    out = Path(out)
    record = None
    if not dry_run:
        check_run_dir(out, resume)
        if resume:
            record = rr.read_record(out)
            if record is None:
                raise FlowmapError(
                    f"`resume`: {out} has no {rr.RECORD} (a run of an earlier version); start a new run."
                )
    if record is not None:
        if model_or_source is None:
            model_or_source = record["model"]
            if model_or_source is None:
                raise FlowmapError("`resume` of a run started from an in-memory model needs that model again.")
        if data is None:
            data = record["data"]
            if data is None:
                raise FlowmapError("`resume` of a run trained on in-memory data needs that data again.")
        if named is None and recipe is None and record.get("recipe"):
            named = rc.get(record["recipe"])
        if stages is None and named is not None and named.stages:
            stages = tuple(s["stage"] for s in record["stages"])
        given = rr.resumed_given(record, given)
        typed = {"model": source_name(model_or_source), "data": source_name(data), "teacher": given.get("teacher")}
        rr.check_same_sources(record, {**typed, "recipe": named.name if named else None})

    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from ..model import FlowMap

    if isinstance(model_or_source, FlowMap):
        model = model_or_source
    else:
        # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
        from ..api import load

        model = load(str(model_or_source))
    why = "named"
    if named is None and recipe is None and record is None:
        name, why = rc.default_recipe(model.config, model_or_source)
        named = rc.get(name) if name else None
    elif record is not None:
        why = "recorded in the run"
    elif named is not None:
        why = "named by `recipe`"
    resolved = rc.resolve(named, given, stages, rc.model_values(model.config))
    teacher_src = resolved[0].recipe.teacher
    now = rr.make_record(model_or_source, data, named.name if named else None, resolved, teacher_src)
    if record is not None:
        rr.check_same_run(record, now)
        active = [
            stage_dir(out, k, len(resolved), r.stage)
            for k, r in enumerate(resolved)
            if checkpoint_in(stage_dir(out, k, len(resolved), r.stage))
        ]
        done = any(finished(stage_dir(out, k, len(resolved), r.stage)) for k, r in enumerate(resolved))
        if active or not done:  # a missing or corrupted checkpoint is refused before any training
            # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
            from .checkpoint import load_verified

            load_verified((active[-1] if active else out) / "checkpoints")

    def say(msg):
        if console is not None:
            console.print(msg, highlight=False, soft_wrap=True, markup=False)
        else:
            import sys

            print(msg, file=sys.stderr)

    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from .objectives import NEEDS_TEACHER
    from .trainer import Trainer
    from .trainer import dry_run as run_dry

    teacher = None
    if any(r.recipe.objective in NEEDS_TEACHER for r in resolved):
        if teacher_src:  # --teacher names another flow model
            # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
            from ..api import load

            teacher = load(str(teacher_src))
        elif len(resolved) > 1:  # the pretrained model the run started from: later stages start from another model
            teacher = copy.deepcopy(model)
        # else one stage: the Trainer keeps a frozen copy of its starting model sharing every untrained tensor
    thread_note = set_threads(threads, dev)
    if os.environ.get("RANK", "0") in ("", "0"):  # the plan, before anything is built or trained (rank 0 only)
        for note in (
            rr.plan_table(resolved, named.name if named else None, why, [r.recipe for r in resolved]),
            guidance_note(model_or_source, resolved[0].recipe.mg_scale),
            rr.guidance_warning(model.config, resolved),
            thread_note,
        ):
            if note:
                say(note)
    current = model
    result = None
    n = len(resolved)
    for k, res in enumerate(resolved):
        where = stage_dir(out, k, n, res.stage)
        if not dry_run and k < n - 1 and finished(where):
            # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
            from ..api import load

            current = load(str(where))
            continue
        trainer = Trainer(
            current,
            data,
            res.recipe,
            where,
            log_with=None if dry_run else log_with,
            device=str(dev),
            progress=progress,
            console=console,
            grid=grid,
            teacher=teacher,
            workers=workers,
        )
        if trainer.main:
            notes = []
            if trainer.teacher_model is not None:
                notes.append(f"teacher: {teacher_src or source_label(model_or_source)} (the pretrained flow model)")
            notes.append((f"stage {k + 1}/{n} ({res.stage}): " if n > 1 else "") + trainer.plan())
            for note in notes:
                if note:
                    say(note)
        if dry_run:
            report = run_dry(trainer, dry_run_steps)
            report["stage"] = res.stage
            return report
        if k == 0 and trainer.main:
            rr.write_record(out, now)
        if trainer.teacher_model is not None:
            trainer.set_teacher_provenance(teacher_src or source_label(model_or_source))
        result = trainer.run(resume=checkpoint_in(where))
        current = result
    return result


def source_name(x) -> str | None:
    """A source as recorded (text), or None for an object in memory."""
    return str(x) if isinstance(x, (str, Path)) else None


def source_label(x) -> str:
    """A model source as text for messages and provenance."""
    return str(x) if isinstance(x, (str, Path)) else "the model passed in (in memory)"


def checkpoint_in(run: Path) -> bool:
    """True when `run`/checkpoints holds a checkpoint."""
    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from .checkpoint import any_checkpoint

    return any_checkpoint(Path(run) / "checkpoints")


def finished(stage: Path) -> bool:
    """True when a stage directory holds its exported model (config.json is written last)."""
    return (Path(stage) / "config.json").is_file() and (Path(stage) / "model.safetensors").is_file()


def check_run_dir(out, resume: bool) -> Path:
    """The one place that decides whether --out may be used as a run directory (one line when not).

    A file, or a directory (or its nearest existing parent) this process cannot write, is refused. An existing
    non-empty directory is used only when it is a fine-tune run flowmap made (its output marker says "run",
    flowmap_convert.outputs): never a folder of the user's, a model or samples. A new run into a run that holds
    checkpoints is refused too (--resume continues it).
    """
    out = check_workdir(out, "run", "fine-tune run")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FlowmapError(f"`out` {out} lies under {probe}, which is a file; choose another `out`.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlowmapError(f"`out` {out}: {probe} is not writable; choose another `out`.")
    if resume and not out.is_dir():
        raise FlowmapError(f"`resume`: {out} does not exist; drop `resume` to start a new run.")
    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from .trainer import check_exported_files

    check_exported_files(out)  # a card the user edited here is refused now, not after the whole run
    # lazy: pulls torch; the CLI imports this package at start-up (docs/architecture.md)
    from .checkpoint import any_checkpoint

    if not resume and (any_checkpoint(out / "checkpoints") or (out / RECORD).exists()):
        raise FlowmapError(
            f"{out} already holds a run (checkpoints/); pass `resume` to continue it or choose another `out`."
        )
    return out
