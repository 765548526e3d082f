"""`flowmap finetune` as a function: DMF / MeanFlow fine-tuning of a flow map (see trainer.py for the loop)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FlowmapError
from ..outputs import check_workdir
from .recipe import Recipe

__all__ = ["finetune", "Recipe", "check_run_dir", "run_defaults"]

BUILTIN = "builtin:digits-sit"
BUILTIN_STEPS, BUILTIN_BATCH = 200, 32  # ~2-3 min on 2 idle CPU cores (benchmarks/digits/FINETUNE.md: 0.65-0.88 s/step)
DEFAULT_STEPS, DEFAULT_BATCH = 1000, 64  # DMF-style defaults for real models


def run_defaults(model_or_source, steps: int | None, batch_size: int | None) -> tuple[int, int, str | None]:
    """(steps, batch, note): the user's values, else quick ones for the builtin demo model, else 1000 x 64."""
    if steps is not None and batch_size is not None:
        return steps, batch_size, None
    if isinstance(model_or_source, str) and model_or_source == BUILTIN:
        s, b = steps or BUILTIN_STEPS, batch_size or BUILTIN_BATCH
        return (
            s,
            b,
            (
                f"{BUILTIN}: {s} steps at batch {b} by default for this small demo model (a few minutes on 2 CPU cores); "
                "pass --steps / --batch-size to change."
            ),
        )
    return steps or DEFAULT_STEPS, batch_size or DEFAULT_BATCH, None


def guidance_note(model_or_source, mg_scale: float) -> str | None:
    """A one-line note where model guidance is known not to suit the model."""
    if mg_scale > 0 and isinstance(model_or_source, str) and model_or_source == BUILTIN:
        return (
            f"note: model guidance makes the converged {BUILTIN} worse (digits FD 18/23/24 at 1/2/4 steps with "
            "--mg-scale 0.6 vs 3.9/2.7/2.8 without; benchmarks/digits/FINETUNE.md); --mg-scale 0 suits it."
        )
    return None


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
        raise FlowmapError(f"--out {out} lies under {probe}, which is a file; choose another --out.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FlowmapError(f"--out {out}: {probe} is not writable; choose another --out.")
    if resume and not out.is_dir():
        raise FlowmapError(f"--resume: {out} does not exist; drop --resume to start a new run.")
    from .trainer import check_exported_files

    check_exported_files(out)  # a card the user edited here is refused now, not after the whole run
    from .checkpoint import any_checkpoint

    if not resume and any_checkpoint(out / "checkpoints"):
        raise FlowmapError(
            f"{out} already holds a run (checkpoints/); pass --resume to continue it or choose another --out."
        )
    return out


def finetune(
    model_or_source=BUILTIN,
    data="builtin:digits",
    objective: str = "dmf",
    mg_scale: float = 0.0,
    train: str = "all",
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-4,
    out="flowmap-finetune",
    *,
    resume: bool = False,
    dry_run: bool = False,
    dry_run_steps: int = 3,
    log_with=None,
    device=None,
    threads: int | None = None,
    progress=None,
    console=None,
    recipe: Recipe | None = None,
    grid: bool = True,
    **options,
):
    """Fine-tune a flow map (a FlowMap or any source `flowmap convert` reads) and export its EMA weights to `out`.

    Every Recipe field can be passed as a keyword (e.g. `derivative="fd"`, `loss="adaptive-weight"`, `depth=4`).
    steps / batch_size default to 200 x 32 for builtin:digits-sit and 1000 x 64 otherwise. Returns the EMA
    FlowMap, or with dry_run=True a report dict (parameters, peak memory, seconds per step) and nothing written.
    Every option is checked before anything is loaded or written.
    """
    from ..runtime import resolve_device, set_threads
    from ..validate import int_in_range

    steps, batch_size, defaults = run_defaults(model_or_source, steps, batch_size)
    base = recipe or Recipe()
    recipe = base.replace(
        objective=objective, mg_scale=mg_scale, train=train, steps=steps, batch_size=batch_size, lr=lr, **options
    )
    dev = resolve_device(device)
    if threads is not None:
        int_in_range("--threads", threads, 1, 4096)
    int_in_range("dry_run_steps", dry_run_steps, 1, 10_000)
    if not dry_run:
        check_run_dir(out, resume)
        if resume:  # a missing or corrupted checkpoint is refused before any model is loaded
            from .checkpoint import load_verified

            load_verified(Path(out) / "checkpoints")

    def say(msg):
        if console is not None:
            console.print(msg, highlight=False, soft_wrap=True)
        else:
            import sys

            print(msg, file=sys.stderr)

    from .trainer import Trainer
    from .trainer import dry_run as run_dry

    thread_note = set_threads(threads, dev)
    trainer = Trainer(
        model_or_source,
        data,
        recipe,
        out,
        log_with=None if dry_run else log_with,
        device=str(dev),
        progress=progress,
        console=console,
        grid=grid,
    )
    if trainer.main:
        for note in (defaults, guidance_note(model_or_source, recipe.mg_scale), thread_note, trainer.plan()):
            if note:
                say(note)
    if dry_run:
        return run_dry(trainer, dry_run_steps)
    return trainer.run(resume=resume)
