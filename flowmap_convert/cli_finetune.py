"""`flowmap finetune` and `flowmap encode`: thin typer layers over flowmap_convert.finetuning."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import DeviceOpt, ThreadsOpt, describe_model, model_argument, shared_option
from .errors import FlowmapError
from .finetuning import BUILTIN, finetune
from .finetuning.recipe import Recipe
from .finetuning.recipes import table
from .options import check, from_cli, option, register, with_options
from .vocabulary import default_out, for_cli


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
        "The run: the exported EMA model (config.json, model.safetensors, README.md, grid.png), raw/, "
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
    workers: int | None = option(
        None,
        "DataLoader processes reading batches ahead (default: on CUDA the process's share of the cores less one, "
        "1 to 8; on a CPU 0, or 1 for a REPA folder on more than 2 cores).",
        lo=0,
        hi=64,
    )

    def __post_init__(self):
        check(self)


register(FinetuneRun)


def _flag_console():
    """A rich Console for the fine-tuner's notes that shows backticked parameters as their flags (vocabulary.for_cli)."""
    from rich.console import Console

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

      flowmap finetune --out digits-ft    # builtin:digits-sit: minutes on a CPU

      flowmap finetune sihyun-yu/REPA --data ./imagenet-latents --recipe dmf-xl2-256 --grad-accum 8

      flowmap finetune bytetriper/RAE --data ./rae-latents --recipe mf-rae-256 --stages cmt,mfd,mft

      flowmap finetune digits-d4 --objective mfd --derivative fd --loss adaptive-weight --dry-run

      torchrun --nproc_per_node 2 -m flowmap_convert.cli finetune digits-d4 --steps 100 --out ft-ddp
    """
    # lazy: pulls torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .finetuning.memory import format_breakdown

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
        workers=run.workers,
        console=console,
        **given,
    )
    if os.environ.get("RANK", "0") not in ("", "0"):
        return  # under torchrun / accelerate launch the global rank 0 alone reports (not each node's local rank 0)
    if run.dry_run:
        p = result["parameters"]
        lines = [
            f"parameters      {p['total']:,} ({p['trainable']:,} trainable, {p['frozen']:,} frozen)",
            f"peak memory     {result['peak_memory_bytes'] / 2**20:,.0f} MiB ({'CUDA allocated' if result['device'].startswith('cuda') else 'process RSS'}), "
            f"{(result['peak_memory_bytes'] - result['memory']['baseline']) / max(1, p['trainable']):.1f} bytes per "
            "trainable parameter besides the runtime:",
            *format_breakdown(result["memory"], p, result["batch_size"], result["device"]),
            f"seconds/step    {result['seconds_per_step']:.3f} (mean of {max(1, result['steps_timed'] - 1)} steps after the first, batch {result['batch_size']} x {result['processes']} process(es), stage {result['stage']})",
            f"device          {result['device']}",
            "nothing written (dry run)",
        ]
        typer.echo("\n".join(lines))
    else:
        # what was fine-tuned (the builtin when no model was named), with its source's sha256
        source = describe_model(model or ("the run's model" if run.resume else BUILTIN), result)
        typer.echo(
            f"written {out} (EMA weights of {source}; raw weights in {out / 'raw'}); sample with: "
            f"flowmap sample {out} --nfe 1"
        )


DEFAULT_OUT = Path(default_out("encode"))  # the one naming rule: flowmap-<command>


def encode_cmd(
    model: Annotated[str, model_argument("Its config names the encoder (identity for pixel models).")],
    images: Annotated[
        Path | None,
        typer.Argument(
            help="Folder with one sub-folder of images per class (sorted folder names become labels 0..K-1).",
            metavar="IMAGES",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path,
        shared_option(
            "out",
            "Holds safetensors shards: `labels` and `latents`, or for SD-VAE the posterior `moments` = mean, std; "
            "plus meta.json.",
        ),
    ] = DEFAULT_OUT,
    shard_size: Annotated[
        int,
        typer.Option("--shard-size", help="Samples per shard file (a killed run resumes at the first missing shard)."),
    ] = 10000,
    batch_size: Annotated[int, shared_option("batch_size")] = 32,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    legacy_model: Annotated[
        str | None, typer.Option("--model", hidden=True, help="Deprecated: the model is the first argument.")
    ] = None,
):
    """Encode an image folder into the latent space of a model, for `flowmap finetune --data`.

    Streams the folder shard by shard (ADM's centre crop; SD-VAE shards hold the posterior mean and std, sampled
    afresh at every training step), resumes after a kill, and runs under torchrun with each process encoding its
    share (the same bytes as one process).

    Examples:

      flowmap encode repa-dmf20 ./my-images --out my-latents

      flowmap encode builtin:digits-sit ./digits-png --out digits-data

      torchrun --nproc_per_node 8 -m flowmap_convert.cli encode repa-dmf20 ./imagenet/train --device cuda --out in1k-latents
    """
    if legacy_model is not None:  # the old spelling `flowmap encode IMAGES --model MODEL` keeps working
        if images is not None:
            raise FlowmapError(
                f"pass the model once: `flowmap encode {legacy_model} {images}` (--model is the first argument now)."
            )
        model, images = legacy_model, Path(model)
    if images is None:
        raise FlowmapError(f"missing the image folder; run `flowmap encode {model} IMAGES` (MODEL first, then IMAGES).")
    # lazy: pulls torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .encode import encode_folder
    from .runtime import choose_threads, resolve_device, set_threads

    device = str(resolve_device(device))
    choose_threads(threads)  # --threads checked before any work
    if not Path(images).is_dir():  # before the thread note: a wrong folder is one line and nothing else
        raise FlowmapError(f"{images} is not a directory; pass a folder with one sub-folder of images per class.")
    note = set_threads(threads, device)
    if note and os.environ.get("RANK", "0") in ("", "0"):
        typer.echo(note, err=True)
    written = encode_folder(images, model, out, shard_size=shard_size, batch_size=batch_size, device=device)
    if written is not None:  # global rank 0 of a torchrun launch (the others return None)
        meta = json.loads((written / "meta.json").read_text())
        typer.echo(
            f"encoded {meta['num_samples']} images in {len(meta['classes'])} classes with {describe_model(model, sha256=meta.get('model_sha256'))} "
            f"into {written}"
        )
