"""`flowmap eval`: score samples or a model the way the papers do (registered from cli.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_common import (
    CfgScaleOpt,
    DeviceOpt,
    FamilyOpt,
    RevisionOpt,
    SamplerOpt,
    SeedOpt,
    ShiftOpt,
    ThreadsOpt,
    describe_model,
    parse_guidance_interval,
    parse_int_list,
    shared_option,
)
from .errors import FlowmapError
from .validate import int_in_range
from .vocabulary import default_out

# cli.py imports this module to register the command, so nothing here imports cli.py.
console, err_console = Console(), Console(stderr=True)


DEFAULT_OUT = Path(default_out("eval"))  # the one naming rule: flowmap-<command>


def eval_cmd(
    target: Annotated[
        str,
        typer.Argument(
            help="Samples (a folder of PNGs or an .npz with arr_0) or a model (directory, Hub id, builtin:NAME)."
        ),
    ],
    nfe: Annotated[str, shared_option("nfe", "Models only; comma-separated: sample and score each, e.g. 1,2,4.")] = "1",
    num_samples: Annotated[
        int | None,
        shared_option("num_samples", "Models only: per NFE (default: 50000; 1000 for digits)."),
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
    sampler: SamplerOpt = "euler",
    shift: ShiftOpt = None,
    cfg_scale: CfgScaleOpt = None,
    guidance_interval: Annotated[str | None, shared_option("guidance_interval", "Default: 0,1 (everywhere).")] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, shared_option("batch_size")] = 64,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[Path, shared_option("out", "Holds eval.json, eval.png and (models) samples-nfe<k>/.")] = DEFAULT_OUT,
    family: FamilyOpt = None,
    revision: RevisionOpt = None,
):
    """Measure FID, Inception Score, precision / recall (k = 3), FD-DINOv2 or the digits FD, per NFE.

    Examples:

      flowmap eval flowmap-sample    # a folder written by flowmap sample

      flowmap eval samples.npz --reference VIRTUAL_imagenet256_labeled.npz

      flowmap eval repa-dmf20 --nfe 1,2,4 --num-samples 50000 --reference VIRTUAL_imagenet256_labeled.npz --device cuda

      flowmap eval builtin:digits-sit --nfe 1,4 -n 1000

      flowmap eval repa-dmf20 --nfe 1 --cfg-scale 1.5 --guidance-interval 0,0.7
    """
    # lazy: these pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .evaluate import evaluate, table
    from .runtime import choose_threads, resolve_device, set_threads
    from .sampling import MAX_SAMPLES, SampleSettings

    nfes = parse_int_list(nfe, "--nfe")
    if not nfes:
        raise FlowmapError("--nfe needs at least one value, e.g. --nfe 1,2,4.")
    dev = str(resolve_device(device))
    interval = parse_guidance_interval(guidance_interval)
    settings = SampleSettings(
        nfe=nfes[0],
        sampler=sampler,
        shift=shift,
        cfg_scale=cfg_scale,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        **({"guidance_interval": interval} if interval is not None else {}),
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
            f"scored {describe_model(target, sha256=report.get('model_sha256'))}{_samples_of(target)}; "
            f"written {out / 'eval.json'}" + (f", {report['plot']}" if report.get("plot") else ""),
            highlight=False,
            soft_wrap=True,
        )


def _samples_of(target: str) -> str:
    """` (samples of MODEL)` for a folder written by `flowmap sample` (its samples.json names the model), else ''."""
    import json

    try:
        model = json.loads((Path(target) / "samples.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (samples of {model})" if isinstance(model, str) and model else ""
