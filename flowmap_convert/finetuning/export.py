"""The end of a run: the EMA model, sample grids, and the exported model directories (EMA at --out, raw at --out/raw).

No second copy of the weights is made: the EMA model shares the EMA shadow's tensors (ema.EMA.model_view) and each
directory is written from the tensors themselves (safetensors writes them from memory, without a serialised copy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..card import model_card
from ..export_samples import make_grid, to_pil
from ..io import write_model_dir
from ..sampling import sample


def write_sample_grid(model, path: Path, device, nfe: int = 1) -> Path:
    """One sample per class (up to 10 classes x 2 rows), nfe and 2 nfe steps, as a PNG grid."""
    from PIL import Image

    k = min(10, model.config.num_classes)
    rows = [sample(model, nfe=n, classes=list(range(k)), num_samples=k, seed=0, device=device) for n in (nfe, 2 * nfe)]
    path.parent.mkdir(parents=True, exist_ok=True)
    im = to_pil(make_grid(np.concatenate(rows), ncols=k))  # one row per NFE, one column per class
    up = max(1, 64 // model.config.latent.image_size)
    im.resize((im.width * up, im.height * up), Image.NEAREST).save(path)
    return path


def training_record(recipe, step: int, skipped: int, ema_decay: float, world: int, data_name: str) -> dict:
    """config.training of an exported fine-tune."""
    return {
        "recipe": recipe.to_dict(),
        "objective": recipe.objective,
        "steps": step,
        "skipped_steps": skipped,
        "ema_decay": ema_decay,
        "processes": world,
        "guidance": {
            "type": "mg" if recipe.mg_scale > 0 else "none",
            "mg_scale": recipe.mg_scale,
            "guidance_interval": list(recipe.guidance_interval),
            "effective_cfg": 1.0 / (1.0 - recipe.mg_scale),  # MG fixed point: CFG scale 1 / (1 - omega)
        },
        "data": data_name,
        "weights": "ema",
    }


def export_run(model, ema, training: dict, out: Path, device, grid: bool, write: bool):
    """EMA weights -> a flowmap model dir at `out`, raw weights at `out`/raw (written when `write`); the EMA model.

    The EMA model is ema.EMA.model_view: the shadow's tensors and the model's frozen ones, no second copy.
    """
    ema_m = ema.model_view(model)
    shift = float(training.get("recipe", {}).get("sample_shift", 1.0))  # the recipe's (DMF App. C: 1.5 at 512 px)
    sampling = {"sampler": "euler", "nfe": 1, "shift": shift, "cfg_scale": 1.0}  # guidance is trained in
    ema_m.config = ema_m.config.replace(training={**training, "weights": "ema"}, sampling=sampling)
    if write:
        export_into(ema_m, Path(out), device, grid)
        base, training_mode = model.config, model.training
        model.config = base.replace(training={**training, "weights": "raw"}, sampling=sampling)
        model.eval()
        try:
            export_into(model, Path(out) / "raw", device, grid)
        finally:
            model.config = base
            model.train(training_mode)
    return ema_m


def export_into(model, directory: Path, device, grid: bool) -> None:
    """Write a model dir to a temp sibling, then move its files into `directory` one by one (checkpoints stay)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=directory))
    try:
        if grid:
            with torch.no_grad():
                write_sample_grid(model, tmp / "grid.png", device)
        write_model_dir(model, tmp, card=model_card(model.config, has_grid=grid))
        names = (["grid.png"] if grid else []) + ["model.safetensors", "README.md", "config.json"]
        for name in names:  # config last: is_model_dir flips at the end
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
