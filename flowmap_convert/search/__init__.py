"""Depth search: convert in memory at each split depth, sample with common random numbers, probe, pick the best.

plan (plan.py: check inputs, depths x NFEs, halving rounds) -> probe (probe.py: sample each cell with one
SampleSettings, measure it with flowmap_convert.metrics, cache it) -> report (report.py: best depth per NFE,
search.json, --write-best) with the figure in plot.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..api import load
from ..decoders import get_decoder
from ..errors import FlowmapError
from ..extractors import get_extractor
from ..metrics import check_sample_count, dataset_reference, load_reference
from ..model import FlowMap
from ..outputs import check_output, check_workdir, mark_output
from ..runtime import resolve_device
from ..sampling import SampleSettings
from .plan import DEFAULT_NUM_SAMPLES, DEFAULT_TEACHER_NFE, SearchPlan, default_depths, make_plan
from .plot import plot_search
from .probe import (
    Draw,
    FlowmapWarning,
    Probe,
    ProbeSettings,
    check_reference_dim,
    run_probes,
    source_id,
    velocity_model,
    warn,
    write_json,
)
from .report import build_report
from .report import write_best as export_best

__all__ = [
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_TEACHER_NFE",
    "FlowmapWarning",
    "ProbeSettings",
    "SearchPlan",
    "default_depths",
    "make_plan",
    "plot_search",
    "search_depth",
    "velocity_model",
]


def search_depth(
    source="builtin:digits-sit",
    depths: Sequence[int] | None = None,
    nfe: Sequence[int] = (1, 4),
    num_samples: int | None = None,
    reference: str = "auto",
    features: str = "auto",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    halving: bool = False,
    write_best: str | os.PathLike | None = None,
    best_for_nfe: int | None = None,
    progress: bool = False,
    teacher_nfe: int = DEFAULT_TEACHER_NFE,
    metric: str = "fd",
    bootstrap: int = 200,
    ci: float = 0.9,
    sampler: str = "euler",
    classes: Sequence[int] | None = None,
    shift: float | None = None,
    cfg_scale: float | None = None,
    batch_size: int = 250,
    device: str | None = None,
    min_halving_samples: int = 100,
    settings: SampleSettings | None = None,
    on_start=None,
    **source_options,
) -> dict:
    """Probe each split depth at each NFE against a reference and return a report naming the best depth per NFE.

    `source`: anything `flowmap_convert.load` accepts, or a FlowMap. `reference`: 'auto' (the dataset when the
    extractor has one, else the teacher), 'dataset', 'teacher' (the source's own `teacher_nfe`-step Euler samples
    from the same noise and labels; no data needed), or a path to a stats .npz. `metric`: what ranks depths, 'fd'
    or 'mse' (paired per-sample error, teacher reference only). Sampling knobs come as one `settings`
    (SampleSettings; its nfe is ignored) or as the loose keywords. With `out`, writes search.json, search.png and
    a per-result cache (re-running with the same settings reuses it). `on_start()` is called once every input has
    been checked, just before the first probe (the CLI prints its notes there).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    plan = make_plan(
        nfe, num_samples, metric, reference, features, teacher_nfe, bootstrap, ci, halving, min_halving_samples,
        best_for_nfe,
    )  # fmt: skip
    if settings is None:
        settings = SampleSettings(
            sampler=sampler,
            shift=shift,
            cfg_scale=cfg_scale,
            seed=seed,
            batch_size=batch_size,
            device=device,
            classes=tuple(classes) if classes else None,
        )
    settings = SampleSettings(**{**settings.__dict__, "device": str(resolve_device(settings.device))})
    check_outputs(out, write_best, source)
    model, source_name = _load(source, source_options)
    plan = plan.with_depths(depths, model.config.num_blocks)
    probe, ref_kind = _probe_for(model, source_name, plan, settings, out)
    if on_start is not None:
        on_start()
    results, halving_log = run_probes(probe, progress)
    timing = (time.perf_counter() - t_start, time.process_time() - cpu_start)
    report = build_report(plan, probe, results, halving_log, source_name, ref_kind, timing)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "search", files=[])
        report["written"]["plot"] = str(plot_search(report, out / "search.png"))
        report["written"]["json"] = str(out / "search.json")
    if write_best is not None:
        report["written"]["best_model"] = str(export_best(model, report, write_best))
    if out is not None:
        write_json(out / "search.json", report)
    return report


def check_outputs(out, write_best, source) -> None:
    """Before any work: --out is new, empty or an earlier search (its cache is reused); --write-best may be replaced."""
    sources = (source,) if isinstance(source, (str, os.PathLike)) else ()
    if write_best is not None:
        check_output(write_best, "model", sources=sources, flag="`write_best`")
    if out is None:
        return
    check_workdir(out, "search", "depth search")


def _load(source, source_options):
    """(model, name) for a FlowMap or anything `load` accepts; MeanFlow models have no depth to search."""
    if isinstance(source, FlowMap):
        model, name = source.eval(), source.config.provenance.get("source", "<in-memory model>")
    else:
        model = load(str(source), **{k: v for k, v in source_options.items() if v is not None})
        name = str(source)
    if model.config.conditioning == "meanflow":
        raise FlowmapError(
            "this checkpoint is a MeanFlow model with its own (t - r) embedder and no split depth; there is nothing to search."
        )
    return model, name


def _probe_for(model, source_name, plan: SearchPlan, settings: SampleSettings, out) -> tuple[Probe, str]:
    """Extractor, reference and cache for this model: the Probe that measures every cell."""
    settings.resolve(model)  # sampler / guidance / classes against this model, before any work
    extractor = get_extractor(plan.features, model.config, device=settings.device)
    lat = model.config.latent
    dim = extractor.output_dim(lat.image_channels, lat.image_size) if hasattr(extractor, "output_dim") else None
    if dim is not None:
        check_sample_count(plan.num_samples, dim, warn)
    ref_kind = plan.reference
    if ref_kind == "auto":
        ref_kind = "dataset" if hasattr(extractor, "dataset_reference") and plan.metric == "fd" else "teacher"
    ref_stats = None
    if ref_kind == "dataset":
        ref_stats = dataset_reference(extractor)
    elif ref_kind != "teacher":
        ref_stats = load_reference(plan.reference, extractor)
        ref_kind = "file"
    check_reference_dim(ref_stats, extractor, dim)
    if plan.metric == "mse" and ref_kind != "teacher":
        raise FlowmapError(
            "`metric` mse is the paired error to the teacher's samples; use it with `reference` teacher."
        )
    probe_settings = ProbeSettings(
        source_id=source_id(model, source_name),
        num_samples=plan.num_samples,
        seed=settings.seed,
        sampler=settings.sampler,
        features=extractor.name,
        reference=f"teacher:{plan.teacher_nfe}" if ref_kind == "teacher" else ref_stats.digest(),
        metric=plan.metric,
        bootstrap=plan.bootstrap,
        ci=plan.ci,
        classes=settings.classes,
        shift=settings.shift,
        cfg_scale=settings.cfg_scale,
    )
    cache = Path(out) / "cache" if out is not None else None
    draw = Draw(settings, get_decoder(lat, settings.device))
    return Probe(model, plan, draw, extractor, ref_stats, probe_settings, cache), ref_kind
