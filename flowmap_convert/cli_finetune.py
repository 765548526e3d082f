"""`flowmap finetune` and `flowmap encode`: thin typer layers over flowmap_convert.finetuning."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .errors import FlowmapError
from .finetuning.recipe import Recipe
from .options import check, from_cli, option, register, with_options
from .vocabulary import default_out


@dataclass(frozen=True)
class FinetuneRun:
    """The options of `flowmap finetune` that are not training settings (those are finetuning.Recipe's fields)."""

    data: str | None = option(
        None,
        "builtin:digits, a `flowmap encode` output (.safetensors/.npz shards), a REPA/DMF folder with vae-sd/*.npy + "
        "dataset.json, or an image folder with class sub-folders (default: builtin:digits, or the run's own with "
        "--resume).",
    )
    recipe: str | None = option(
        None, "A named recipe (see --list-recipes; default: the one that fits the model, digits for a builtin)."
    )
    stages: str | None = option(None, "Stages of a staged recipe to run, e.g. cmt,mfd,mft (default: the recipe's).")
    list_recipes: bool = option(False, "Print the named recipes as a table and exit.")
    out: Path = option(
        Path(default_out("finetune")),
        "Run directory: the exported EMA model (config.json, model.safetensors, README.md, grid.png), raw/, "
        "checkpoints/, metrics.jsonl, recipe.json.",
        concept="out",
    )
    resume: bool = option(False, "Continue the run in OUT (its recorded recipe) from its latest checkpoint.")
    dry_run: bool = option(
        False, "Print the plan, run a few steps, report parameters, peak memory and seconds per step; write nothing."
    )
    log_with: str | None = option(None, "Accelerate tracker(s), e.g. tensorboard or wandb.")
    device: str | None = option(None, concept="device")
    threads: int | None = option(None, concept="threads", lo=1, hi=4096)

    def __post_init__(self):
        check(self)


register(FinetuneRun)


def _flag_console():
    """A rich Console for the fine-tuner's notes that shows backticked parameters as their flags (vocabulary.for_cli)."""
    from rich.console import Console

    from .vocabulary import for_cli

    class Flagged(Console):
        def print(self, *objects, **kw):
            super().print(*(for_cli(o) if isinstance(o, str) else o for o in objects), **kw)

    return Flagged


@with_options((FinetuneRun, {}), (Recipe, {"given_only": True, "default_note": ", unless the recipe sets it"}))
def finetune_cmd(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Converted flowmap directory or any source `flowmap convert` reads (base models are split at "
            "--depth; default: builtin:digits-sit, or the run's own model with --resume)."
        ),
    ] = None,
    **options,
):
    """Fine-tune a flow map with the papers' recipes (Decoupled MeanFlow; MF-RAE's CMT -> MFD -> MFT) and export its EMA weights.

    The recipe follows from the model (--list-recipes shows them); each option overrides one of its fields, and
    the plan printed before training says where every value comes from. Runs on one process or under
    `accelerate launch` / `torchrun` unchanged.

    Examples:

      flowmap finetune --out digits-ft            (builtin:digits-sit, recipe digits: a few minutes on a CPU)

      flowmap finetune sihyun-yu/REPA --data ./imagenet-latents --recipe dmf-xl2-256 --grad-accum 8

      flowmap finetune bytetriper/RAE --data ./rae-latents --recipe mf-rae-256 --stages cmt,mfd,mft

      flowmap finetune digits-d4 --objective mfd --derivative fd --loss adaptive-weight --dry-run

      torchrun --nproc_per_node 2 -m flowmap_convert.cli finetune digits-d4 --steps 100 --out ft-ddp
    """
    from .finetuning import finetune
    from .finetuning.recipes import table

    FlagConsole = _flag_console()

    run = FinetuneRun(**from_cli(FinetuneRun, options))
    if run.list_recipes:
        typer.echo(table())
        return
    given = from_cli(Recipe, options, given_only=True)
    Recipe(**{**given, **({"global_batch": 1} if given.get("batch_size") is None else {})})  # checks, nothing loaded
    console = FlagConsole(stderr=True)
    out = run.out
    result = finetune(
        model,
        data=run.data,
        recipe=run.recipe,
        stages=run.stages,
        out=out,
        resume=run.resume,
        dry_run=run.dry_run,
        log_with=run.log_with,
        device=run.device,
        threads=run.threads,
        console=console,
        **given,
    )
    if run.dry_run:
        p = result["parameters"]
        lines = [
            f"parameters      {p['total']:,} ({p['trainable']:,} trainable, {p['frozen']:,} frozen)",
            f"peak memory     {result['peak_memory_bytes'] / 2**20:,.0f} MiB ({'CUDA allocated' if result['device'].startswith('cuda') else 'process RSS'})",
            f"seconds/step    {result['seconds_per_step']:.3f} (mean of {max(1, result['steps_timed'] - 1)} steps after the first, batch {result['batch_size']} x {result['processes']} process(es), stage {result['stage']})",
            f"device          {result['device']}",
            "nothing written (dry run)",
        ]
        typer.echo("\n".join(lines))
    else:
        typer.echo(
            f"written {out} (EMA weights; raw weights in {out / 'raw'}); sample with: flowmap sample {out} --nfe 1"
        )


def encode_cmd(
    images_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder with one sub-folder of images per class (sorted folder names become labels 0..K-1)."
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Model whose latent space to encode into (its config names the encoder; identity for pixel models).",
        ),
    ] = "builtin:digits-sit",
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Dataset directory to write (safetensors shards with `latents` and `labels`, plus meta.json).",
        ),
    ] = Path("flowmap-dataset"),
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard file.")] = 10000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder call.")] = 32,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
):
    """Encode an image folder into the latent space of a model, for `flowmap finetune --data`.

    Examples:

      flowmap encode ./my-images --model repa-dmf20 --out my-latents

      flowmap encode ./digits-png --model builtin:digits-sit --out digits-data
    """
    import torch
    from safetensors.torch import save_file

    from .api import load
    from .finetuning.data import encode_images, list_image_folder, load_images
    from .outputs import atomic_dir, check_output

    if not images_dir.is_dir():
        raise FlowmapError(f"{images_dir} is not a directory; pass a folder with one sub-folder of images per class.")
    check_output(out, "encode", sources=(images_dir, model))  # safety: only our own encode output is replaced
    if shard_size < 1 or batch_size < 1:
        raise FlowmapError("--shard-size and --batch-size must be positive.")
    latent = load(model).config.latent
    files, labels, classes = list_image_folder(images_dir)
    if not files:
        raise FlowmapError(f"{images_dir} has no images in class sub-folders (e.g. {images_dir}/cat/001.png).")
    with atomic_dir(out, "encode", sources=(images_dir, model)) as tmp:
        for s, i0 in enumerate(range(0, len(files), shard_size)):
            chunk = files[i0 : i0 + shard_size]
            z = encode_images(load_images(chunk, latent.image_size, latent.image_channels), latent, device, batch_size)
            save_file(
                {"latents": z.contiguous(), "labels": torch.tensor(labels[i0 : i0 + shard_size], dtype=torch.int64)},
                str(tmp / f"shard-{s:05d}.safetensors"),
            )
        meta = {
            "format": "flowmap-latents/1",
            "model": model,
            "latent": latent.kind,
            "classes": classes,
            "num_samples": len(files),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    typer.echo(f"encoded {len(files)} images in {len(classes)} classes into {out}")
