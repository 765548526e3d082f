"""`flowmap finetune` as a function: DMF / MeanFlow fine-tuning of a flow map (see trainer.py for the loop)."""

from __future__ import annotations

from .recipe import Recipe

__all__ = ["finetune", "Recipe"]


def finetune(
    model_or_source="builtin:digits-sit",
    data="builtin:digits",
    objective: str = "dmf",
    mg_scale: float = 0.0,
    train: str = "all",
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-4,
    out="flowmap-finetune",
    *,
    resume: bool = False,
    dry_run: bool = False,
    dry_run_steps: int = 3,
    log_with=None,
    device=None,
    progress=None,
    console=None,
    recipe: Recipe | None = None,
    grid: bool = True,
    **options,
):
    """Fine-tune a flow map (a FlowMap or any source `flowmap convert` reads) and export its EMA weights to `out`.

    Every Recipe field can be passed as a keyword (e.g. `derivative="fd"`, `loss="adaptive-weight"`, `depth=4`).
    Returns the EMA FlowMap, or with dry_run=True a report dict (parameters, peak memory, seconds per step) and
    nothing written.
    """
    from .trainer import Trainer
    from .trainer import dry_run as run_dry

    base = recipe or Recipe()
    recipe = base.replace(
        objective=objective, mg_scale=mg_scale, train=train, steps=steps, batch_size=batch_size, lr=lr, **options
    )
    trainer = Trainer(
        model_or_source,
        data,
        recipe,
        out,
        log_with=None if dry_run else log_with,
        device=device,
        progress=progress,
        console=console,
        grid=grid,
    )
    if dry_run:
        return run_dry(trainer, dry_run_steps)
    return trainer.run(resume=resume)
