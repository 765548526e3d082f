"""`flowmap finetune` and `flowmap encode`: thin typer layers over flowmap_convert.finetuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import DeviceOpt, ThreadsOpt, describe_model, model_argument, shared_option
from .errors import FlowmapError
from .vocabulary import default_out


def parse_floats(text: str, n: int, what: str) -> tuple[float, ...]:
    """'0.4,-1.2' -> (0.4, -1.2); a clear error otherwise."""
    try:
        vals = tuple(float(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise FlowmapError(f"{what} takes {n} comma-separated numbers, got {text!r}.")
    return vals


def parse_seed(text: str) -> int:
    """--seed text -> an int in [0, 2^63 - 1] ('1e3' is read as 1000; fractions, NaN and 1e20 are refused)."""
    from .validate import seed

    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise FlowmapError(f"--seed must be an integer, got {text!r}.") from None
    return seed("--seed", value)


def finetune_cmd(
    model: Annotated[
        str,
        typer.Argument(
            help="Converted flowmap directory or any source `flowmap convert` reads (base models are split at --depth)."
        ),
    ] = "builtin:digits-sit",
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="builtin:digits, a `flowmap encode` output (.safetensors/.npz shards), a REPA/DMF folder with vae-sd/*.npy + dataset.json, or an image folder with class sub-folders.",
        ),
    ] = "builtin:digits",
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="dmf (FM + MeanFlow, DMF), mfd (MeanFlow distillation from the frozen source), mft (MeanFlow training), cmt (consistency mid-training), fm (flow matching only).",
        ),
    ] = "dmf",
    mg_scale: Annotated[
        float,
        typer.Option(
            "--mg-scale", help="Model guidance omega in [0, 1) (DMF uses 0.6; effective CFG 1/(1 - omega)); 0 disables."
        ),
    ] = 0.0,
    train: Annotated[
        str,
        typer.Option(
            "--train",
            help="all; decoder (the blocks from --depth on + head; encoder and embedders frozen, run once without gradient, fastest); or decoder+time (DMF Sec. 3.1: the decoder and the timestep embedder, whose gradient flows back through the frozen encoder).",
        ),
    ] = "all",
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Optimizer steps (default: 200 for builtin:digits-sit, else 1000)."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", help="Samples per process per micro-step (default: 32 for builtin:digits-sit, else 64)."
        ),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (betas 0.9, 0.95).")] = 1e-4,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Run directory: the exported EMA model (config.json, model.safetensors, README.md, grid.png), raw/, checkpoints/, metrics.jsonl.",
        ),
    ] = Path("flowmap-finetune"),
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth",
            "-d",
            help="Encoder/decoder split when MODEL is a base flow model (default: the depth search-depth chose, else 2/3 of the blocks).",
        ),
    ] = None,
    loss: Annotated[
        str,
        typer.Option(
            "--loss",
            help="adaptive (DMF log-variance loss), adaptive-weight (MeanFlow: |e|^2 / (|e|^2 + c)^p, weight detached), mfrae (MF-RAE's released code: |e|^4 / (|e|^4 + c)^p) or mse (diverged on digits).",
        ),
    ] = "adaptive",
    derivative: Annotated[
        str,
        typer.Option("--derivative", help="jvp (torch.func.jvp) or fd (central finite difference, one batched call)."),
    ] = "jvp",
    fd_delta: Annotated[float, typer.Option("--fd-delta", help="Finite-difference step.")] = 5e-3,
    time_proposal: Annotated[
        str, typer.Option("--time-proposal", help="Logit-normal means of the two MeanFlow times (t = max, r = min).")
    ] = "0.4,-1.2",
    time_std: Annotated[float, typer.Option("--time-std", help="Logit-normal std of the MeanFlow times.")] = 1.0,
    fm_mean: Annotated[float, typer.Option("--fm-mean", help="Logit-normal mean of the flow-matching time.")] = 0.0,
    time_shift: Annotated[float, typer.Option("--time-shift", help="MF-RAE time shift for mfd/mft/cmt times.")] = 1.0,
    guidance_interval: Annotated[
        str, typer.Option("--guidance-interval", help="g_min,g_max: model guidance only for t in this interval.")
    ] = "0.0,0.7",
    label_dropout: Annotated[
        float, typer.Option("--label-dropout", help="Share of labels replaced by the null class.")
    ] = 0.1,
    ema: Annotated[
        float, typer.Option("--ema", help="EMA decay (negative: 1 - 10/steps clipped to [0.9, 0.9999]).")
    ] = -1.0,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear learning-rate warm-up steps.")] = 0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Max gradient norm (0: off).")] = 1.0,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    precision: Annotated[
        str, typer.Option("--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16 (fp16 is refused).")
    ] = "auto",
    attention: Annotated[
        str, typer.Option("--attention", help="Attention backend: auto, triton, sdpa or math.")
    ] = "auto",
    seed: Annotated[str, typer.Option("--seed", help="Seed of data order, noise and times (0 to 2^63 - 1).")] = "0",
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps between checkpoints (0: at the end only).")
    ] = 500,
    sample_every: Annotated[
        int, typer.Option("--sample-every", help="Steps between sample grids in OUT/samples (0: at the end only).")
    ] = 0,
    log_every: Annotated[
        int, typer.Option("--log-every", help="Steps between console lines when no progress bar is shown.")
    ] = 10,
    max_bad_steps: Annotated[
        int,
        typer.Option("--max-bad-steps", help="Non-finite steps in a row before rolling back to the last checkpoint."),
    ] = 5,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in OUT from checkpoints/latest.pt.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Run a few steps, report parameters, peak memory and seconds per step; write nothing."
        ),
    ] = False,
    log_with: Annotated[
        str | None, typer.Option("--log-with", help="Accelerate tracker(s), e.g. tensorboard or wandb.")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu, cuda or cuda:N (default: cuda when available; under accelerate launch, the process's device).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", help="CPU threads (default: OMP_NUM_THREADS, else 1 on up to 4 cores, else half, at most 8)."
        ),
    ] = None,
):
    """Fine-tune a flow map with Decoupled MeanFlow (FM + MeanFlow) or MF-RAE's MFD / MFT / CMT, and export its EMA weights.

    Runs on one process or under `accelerate launch` / `torchrun` unchanged.

    Examples:

      flowmap finetune --out digits-ft    # builtin:digits-sit: minutes on a CPU

      flowmap finetune digits-d4 --data builtin:digits --objective dmf --train decoder --steps 500

      flowmap finetune sihyun-yu/REPA --depth 20 --data ./imagenet-latents --mg-scale 0.6 --batch-size 32

      flowmap finetune digits-d4 --objective mfd --derivative fd --loss adaptive-weight --dry-run

      torchrun --nproc_per_node 2 -m flowmap_convert.cli finetune digits-d4 --steps 100 --out ft-ddp
    """
    from rich.console import Console

    from .finetuning import Recipe, finetune

    g_lo, g_hi = parse_floats(guidance_interval, 2, "--guidance-interval")
    recipe = Recipe(
        loss=loss,
        derivative=derivative,
        fd_delta=fd_delta,
        time_proposal=parse_floats(time_proposal, 2, "--time-proposal"),
        time_std=time_std,
        fm_mean=fm_mean,
        time_shift=time_shift,
        guidance_interval=(g_lo, g_hi),
        label_dropout=label_dropout,
        ema=ema,
        warmup=warmup,
        grad_clip=grad_clip,
        grad_accum=grad_accum,
        precision=precision,
        attention=attention,
        seed=parse_seed(seed),
        checkpoint_every=checkpoint_every,
        sample_every=sample_every,
        log_every=log_every,
        max_bad_steps=max_bad_steps,
        depth=depth,
    )
    console = Console(stderr=True)
    result = finetune(
        model,
        data=data,
        objective=objective,
        mg_scale=mg_scale,
        train=train,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        out=out,
        resume=resume,
        dry_run=dry_run,
        log_with=log_with,
        device=device,
        threads=threads,
        console=console,
        recipe=recipe,
    )
    if dry_run:
        p = result["parameters"]
        lines = [
            f"parameters      {p['total']:,} ({p['trainable']:,} trainable, {p['frozen']:,} frozen)",
            f"peak memory     {result['peak_memory_bytes'] / 2**20:,.0f} MiB ({'CUDA allocated' if result['device'].startswith('cuda') else 'process RSS'})",
            f"seconds/step    {result['seconds_per_step']:.3f} (mean of {max(1, result['steps_timed'] - 1)} steps after the first, batch {result['batch_size']} x {result['processes']} process(es))",
            f"device          {result['device']}",
            "nothing written (dry run)",
        ]
        typer.echo("\n".join(lines))
    else:
        typer.echo(
            f"written {out} (EMA weights; raw weights in {out / 'raw'}); sample with: flowmap sample {out} --nfe 1"
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
        Path, shared_option("out", "Holds safetensors shards with `latents` and `labels`, plus meta.json.")
    ] = DEFAULT_OUT,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard file.")] = 10000,
    batch_size: Annotated[int, shared_option("batch_size")] = 32,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    legacy_model: Annotated[
        str | None, typer.Option("--model", hidden=True, help="Deprecated: the model is the first argument.")
    ] = None,
):
    """Encode an image folder into the latent space of a model, for `flowmap finetune --data`.

    Examples:

      flowmap encode repa-dmf20 ./my-images --out my-latents

      flowmap encode builtin:digits-sit ./digits-png --out digits-data
    """
    if legacy_model is not None:  # the old spelling `flowmap encode IMAGES --model MODEL` keeps working
        if images is not None:
            raise FlowmapError(
                f"pass the model once: `flowmap encode {legacy_model} {images}` (--model is the first argument now)."
            )
        model, images = legacy_model, Path(model)
    if images is None:
        raise FlowmapError(f"missing the image folder; run `flowmap encode {model} IMAGES` (MODEL first, then IMAGES).")
    images_dir = images
    from .runtime import choose_threads, resolve_device, set_threads

    device = str(resolve_device(device))
    choose_threads(threads)  # --threads checked before any work
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
    note = set_threads(threads, device)
    if note:
        typer.echo(note, err=True)
    net = load(model)
    latent = net.config.latent
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
    typer.echo(f"encoded {len(files)} images in {len(classes)} classes with {describe_model(model, net)} into {out}")
