"""`flowmap eval`: score samples or a model the way the papers do (registered from cli.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_common import FamilyOpt, RevisionOpt, parse_int_list
from .errors import FlowmapError

# cli.py imports this module to register the command, so nothing here imports cli.py.
console, err_console = Console(), Console(stderr=True)


def eval_cmd(
    target: Annotated[
        str,
        typer.Argument(
            help="Samples (a folder of PNGs or an .npz with arr_0) or a model (directory, Hub id, builtin:NAME)."
        ),
    ],
    nfe: Annotated[str, typer.Option("--nfe", help="Models only: comma-separated NFEs to sample and score.")] = "1",
    num_samples: Annotated[
        int | None,
        typer.Option("--num-samples", "-n", help="Models only: samples per NFE (default: 50000; 1000 for digits)."),
    ] = None,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            help="ADM reference batch .npz (arr_0 images, or mu/sigma), a stats .npz, a PNG folder, or auto (the builtin digits data).",
        ),
    ] = "auto",
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics", help="fid,is,pr,fd_dinov2,digits or auto (digits for digits models, else fid,is,pr)."
        ),
    ] = "auto",
    sampler: Annotated[str, typer.Option("--sampler", help="euler, heun, restart or ctm.")] = "euler",
    shift: Annotated[float | None, typer.Option("--shift", help="Time-grid shift (default: the model's).")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg-scale", help="CFG scale (default: the model's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sample i's noise depends only on (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 64,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: CUDA when present).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: the shared rule).")] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory for eval.json, eval.png and (models) samples-nfe<k>/.")
    ] = Path("eval-out"),
    family: FamilyOpt = None,
    revision: RevisionOpt = None,
):
    """Measure FID, Inception Score, precision / recall (k = 3), FD-DINOv2 or the digits FD, per NFE.

    Examples:

      flowmap eval samples/                                   # a folder written by flowmap sample

      flowmap eval samples.npz --reference VIRTUAL_imagenet256_labeled.npz

      flowmap eval repa-dmf20 --nfe 1,2,4 --num-samples 50000 --reference VIRTUAL_imagenet256_labeled.npz --device cuda

      flowmap eval builtin:digits-sit --nfe 1,4 -n 1000
    """
    from .evaluate import evaluate, table
    from .runtime import choose_threads, resolve_device, set_threads
    from .sampling import MAX_SAMPLES, SampleSettings
    from .validate import int_in_range

    nfes = parse_int_list(nfe, "--nfe")
    if not nfes:
        raise FlowmapError("--nfe needs at least one value, e.g. --nfe 1,2,4.")
    dev = str(resolve_device(device))
    settings = SampleSettings(
        nfe=nfes[0], sampler=sampler, shift=shift, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, device=dev
    )
    for k in nfes:
        SampleSettings(nfe=k)
    if num_samples is not None:
        int_in_range("--num-samples", num_samples, 2, MAX_SAMPLES)
    choose_threads(threads)  # --threads checked before any work
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    note = set_threads(threads, dev)

    def start():
        if note and main_rank:
            err_console.print(note, highlight=False)

    report = evaluate(
        target,
        nfe=nfes,
        num_samples=num_samples,
        reference=reference,
        metrics=metrics,
        settings=settings,
        out=out,
        on_start=start,
        family=family,
        revision=revision,
    )
    if main_rank:
        console.print(table(report), highlight=False)
        console.print(
            f"written {out / 'eval.json'}" + (f", {report['plot']}" if report.get("plot") else ""), highlight=False
        )
