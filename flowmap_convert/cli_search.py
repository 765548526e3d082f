"""`flowmap search-depth`: probe every split depth at a few NFEs and name the best one (thin layer over flowmap_convert.search)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .cli_common import (
    CfgScaleOpt,
    ClassesOpt,
    DeviceOpt,
    FamilyOpt,
    FilenameOpt,
    RevisionOpt,
    SamplerOpt,
    ShiftOpt,
    SourceArg,
    ThreadsOpt,
    TrustOpt,
    WeightsOpt,
    describe_model,
    parse_guidance_interval,
    parse_int_list,
    shared_option,
    user_message,
)
from .errors import FlowmapError
from .progress import say
from .vocabulary import default_out

# cli.py imports this module to register the command, so nothing here imports cli.py (`python -m
# flowmap_convert.cli` runs it as __main__, and a second import would be circular); the source options mirror cli's.
console, err_console = Console(), Console(stderr=True)


def parse_depth_range(text: str) -> list[int]:
    """'2:6' -> [2, 3, 4, 5, 6] (both ends included); 'A:B:S' adds a step."""
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or (len(nums) == 3 and nums[2] < 1) or nums[0] > nums[1]:
        raise FlowmapError(
            f"--depth-range must be two or three integers with the first <= the second, got {text!r}; e.g. --depth-range 2:6 (depths 2..6) or 2:12:2 (a step of 2)."
        )
    return list(range(nums[0], nums[1] + 1, nums[2] if len(nums) == 3 else 1))


def _print_table(report: dict) -> None:
    """Rich table: one row per depth, one column per NFE (probe [CI]); the best depth per NFE in bold green."""
    from rich.table import Table

    teacher = report["reference"]["kind"] == "teacher"
    metric = report["metric"]
    title = f"{'Frechet distance' if metric == 'fd' else 'paired MSE'} by split depth ({report['features']} features, {report['reference']['kind']} reference, {report['num_samples']} samples, {int(report['bootstrap']['ci'] * 100)}% bootstrap CI)"
    table = Table(title=title, title_justify="left")
    table.add_column("depth", justify="right")
    for n in report["nfe"]:
        table.add_column(f"FD @ {n} NFE", justify="right")
        if teacher:
            table.add_column(f"MSE @ {n} NFE", justify="right")
    cells = {(r["depth"], r["nfe"]): r for r in report["results"]}
    for d in report["depths"]:
        row = [str(d)]
        for n in report["nfe"]:
            r = cells.get((d, n))
            best = report["best"][str(n)] == d
            for key in ("fd", "mse") if teacher else ("fd",):
                if r is None:
                    row.append("pruned")
                    continue
                lo, hi = r[f"{key}_ci"]
                text = f"{r[key]:.4g} [{lo:.3g}, {hi:.3g}]"
                row.append(f"[bold green]{text}[/]" if best and key == metric else text)
        table.add_row(*row)
    console.print(table)


DEFAULT_OUT = Path(default_out("search-depth"))  # the one naming rule: flowmap-<command>


def search_depth_cmd(
    source: SourceArg = "builtin:digits-sit",
    depths: Annotated[
        str | None,
        typer.Option(
            "--depths",
            help="Comma-separated split depths, e.g. 16,18,20,22,24 (default: every depth for models up to 12 blocks, else a grid over 4/7..6/7 of the blocks).",
        ),
    ] = None,
    depth_range: Annotated[
        str | None, typer.Option("--depth-range", help="START:END[:STEP], both ends included, e.g. 2:6.")
    ] = None,
    nfe: Annotated[str, shared_option("nfe", "Comma-separated: probe each, e.g. 1,2,4,16.")] = "1,4",
    num_samples: Annotated[
        int | None,
        shared_option(
            "num_samples",
            "Per (depth, NFE) (default 500: on the digits model it ranks depths like 4x as many, see benchmarks/results/search_depth-cpu.md).",
        ),
    ] = None,
    reference: Annotated[
        str,
        typer.Option(
            "--reference",
            help="auto, dataset (builtin statistics of the extractor's dataset), teacher (the source's own many-step samples from the same noise: needs no data), or a stats .npz with mu/sigma (or arr_0 images).",
        ),
    ] = "auto",
    features: Annotated[
        str,
        typer.Option(
            "--features",
            help="auto (digits classifier for 1x16x16 pixel models, else Inception), digits, inception, dinov2, dinov2-large, pixels.",
        ),
    ] = "auto",
    metric: Annotated[
        str, typer.Option("--metric", help="What ranks depths: fd, or mse (paired per-sample error to the teacher).")
    ] = "fd",
    teacher_nfe: Annotated[
        int, typer.Option("--teacher-nfe", help="Euler steps of the source velocity model for the teacher reference.")
    ] = 32,
    halving: Annotated[
        bool,
        typer.Option(
            "--halving",
            help="Successive halving: all depths on few samples, the better half on twice as many, ... up to --num-samples.",
        ),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap draws for the confidence intervals (0 = none).")
    ] = 200,
    ci: Annotated[float, typer.Option("--ci", help="Confidence level of the intervals.")] = 0.9,
    seed: Annotated[int, shared_option("seed", "Every depth sees the same noise.")] = 0,
    sampler: SamplerOpt = "euler",
    shift: ShiftOpt = None,
    cfg_scale: CfgScaleOpt = None,
    guidance_interval: Annotated[str | None, shared_option("guidance_interval", "Default: 0,1 (everywhere).")] = None,
    classes: ClassesOpt = None,
    batch_size: Annotated[int, shared_option("batch_size")] = 250,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    out: Annotated[Path, shared_option("out", "Holds search.json, search.png and the resumable cache/.")] = DEFAULT_OUT,
    write_best: Annotated[
        Path | None,
        typer.Option("--write-best", help="Export the converted model at the best depth to this directory."),
    ] = None,
    best_for_nfe: Annotated[
        int | None,
        typer.Option("--best-for-nfe", help="Which NFE's best depth --write-best uses (default: the smallest)."),
    ] = None,
    revision: RevisionOpt = None,
    filename: FilenameOpt = None,
    family: FamilyOpt = None,
    weights: WeightsOpt = "auto",
    trust_pickle: TrustOpt = False,
):
    """Find the split depth that makes the best flow map: convert in memory at each depth, sample, probe, rank.

    Every depth reuses the same weights and the same noise and labels, so differences are the depth's alone. The probe is a Fréchet distance (with a bootstrap CI) to dataset statistics, a stats file, or the source's own 32-step samples (--reference teacher, which also reports the paired per-sample MSE). Results are cached in OUT/cache: an interrupted search resumes on re-run.

    Examples:

      flowmap search-depth

      flowmap search-depth builtin:digits-sit --depth-range 2:6 --nfe 1,2,4 --write-best digits-best

      flowmap search-depth sihyun-yu/REPA --depths 16,18,20,22,24 --nfe 1,4 --features inception --reference VIRTUAL_imagenet256_labeled.npz --device cuda

      flowmap search-depth my-model --reference teacher --metric mse --halving
    """
    # lazy: pulls torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .search import search_depth

    if depths is not None and depth_range is not None:
        raise FlowmapError("pass either --depths or --depth-range, not both.")
    depth_list = (
        parse_int_list(depths, "--depths")
        if depths is not None
        else (parse_depth_range(depth_range) if depth_range else None)
    )
    nfe_list = parse_int_list(nfe, "--nfe")
    if not nfe_list:
        raise FlowmapError("--nfe needs at least one value, e.g. --nfe 1,4.")
    # lazy: pulls torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .runtime import choose_threads, resolve_device, set_threads
    from .sampling import SampleSettings, parse_classes

    interval = parse_guidance_interval(guidance_interval)
    settings = SampleSettings(
        sampler=sampler,
        shift=shift,
        cfg_scale=cfg_scale,
        **({"guidance_interval": interval} if interval is not None else {}),
        seed=seed,
        batch_size=batch_size,
        device=str(resolve_device(device)),
        classes=parse_classes(classes),
    )
    choose_threads(threads)  # --threads checked before any work
    note = set_threads(threads, settings.device)

    def start():
        if note:
            err_console.print(note, highlight=False)

    def show(message, category, filename_, lineno, file=None, line=None):
        say(f"[yellow]warning:[/] {user_message(message)}", markup=True)  # above a live progress bar, if any

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        report = search_depth(
            source,
            depths=depth_list,
            nfe=nfe_list,
            num_samples=num_samples,
            reference=reference,
            features=features,
            metric=metric,
            teacher_nfe=teacher_nfe,
            halving=halving,
            bootstrap=bootstrap,
            ci=ci,
            settings=settings,
            on_start=start,
            out=out,
            write_best=write_best,
            best_for_nfe=best_for_nfe,
            progress=True,  # a bar on a terminal, plain lines with rate and ETA in a log
            revision=revision,
            filename=filename,
            family=family,
            weights=weights,
            trust_pickle=trust_pickle,
        )
    _print_table(report)
    cached = sum(1 for r in (report["all_results"] or report["results"]) if r.get("cached"))
    searched = describe_model(source, sha256=report.get("source_sha256"))
    lines = [f"searched {searched}"] + [f"best depth at {n} NFE: {report['best'][str(n)]}" for n in report["nfe"]]
    lines.append(
        f"wall {report['wall_seconds']:.1f} s, cpu {report['cpu_seconds']:.1f} s"
        + (f" ({cached} results reused from {out / 'cache'})" if cached else "")
    )
    lines.append(f"written {report['written'].get('json')}, {report['written'].get('plot')}")
    if write_best is not None:
        lines.append(f"exported depth {report['best_depth']} (best at {report['best_for_nfe']} NFE) to {write_best}")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
