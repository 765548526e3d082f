"""Depth search: convert in memory at each split depth, sample with common random numbers, probe, pick the best.

For every (depth, NFE) the probe is the Fréchet distance of the flow map's samples to a reference (dataset
statistics, a stats .npz, or the source model's own many-step Euler samples from the same noise and labels, the
"teacher"), with a bootstrap CI; against the teacher it also reports the paired per-sample mean squared error.
Results are cached per (depth, NFE, settings) in `<out>/cache/`, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import check_depth
from .errors import FlowmapError
from .io import atomic_file

DEFAULT_NUM_SAMPLES = 500  # chosen by benchmarks/search_depth_stability.py (see benchmarks/results/search_depth-cpu.md)
DEFAULT_TEACHER_NFE = 32


class FlowmapWarning(UserWarning):
    """A result that is computed but may mislead (e.g. fewer samples than feature dimensions)."""


@dataclass(frozen=True)
class ProbeSettings:
    """Everything a cached (depth, NFE) result depends on besides depth and NFE; hashed into the cache file name."""

    source_id: str
    num_samples: int
    seed: int
    sampler: str
    features: str
    reference: str  # 'teacher:<nfe>' or the reference statistics' digest
    metric: str
    bootstrap: int
    ci: float
    classes: tuple[int, ...] | None
    shift: float | None
    cfg_scale: float | None

    def key(self) -> str:
        """Short stable hash of the settings."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_depths(num_blocks: int) -> list[int]:
    """Every depth for small models; for deep ones a grid over 4/7..6/7 of the blocks (16..24 step 2 for 28 blocks)."""
    if num_blocks <= 12:
        return list(range(1, num_blocks + 1))
    step = max(1, num_blocks // 14)
    lo, hi = round(4 * num_blocks / 7), round(6 * num_blocks / 7)
    return list(range(lo, hi + 1, step))


def velocity_model(model):
    """The source as a plain velocity model u(x, t, t) sharing weights (the teacher for the reference samples)."""
    if model.config.conditioning == "velocity":
        return model
    return model.view(model.config.replace(conditioning="velocity", depth=None))


def _source_id(model, source) -> str:
    """Identity of the weights for cache keys: the provenance sha256, else a hash of the parameters."""
    prov = model.config.provenance or {}
    if prov.get("sha256"):
        return f"{prov.get('source', source)}@{prov['sha256']}"
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _warn(message: str) -> None:
    """Emit a FlowmapWarning (the CLI prints it as one `warning:` line on stderr)."""
    warnings.warn(message, FlowmapWarning, stacklevel=3)


def _write_json(path: Path, data) -> None:
    """Atomic JSON write (temp name + os.replace)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


class _Sampler:
    """Draws (images, latents) for a model with the search's common random numbers (sample i's noise: (seed, i))."""

    def __init__(self, seed, sampler, classes, batch_size, device, shift, cfg_scale, decoder):
        self.kw = dict(
            seed=seed,
            sampler=sampler,
            classes=classes,
            batch_size=batch_size,
            device=device,
            shift=shift,
            cfg_scale=cfg_scale,
            decoder=decoder,
        )

    def __call__(self, model, nfe: int, n: int):
        """Samples 0..n-1 of `model` at `nfe` evaluations: uint8 NHWC images and float latents."""
        from .sampling import sample

        images, latents, labels, _ = sample(model, nfe=nfe, num_samples=n, return_latents=True, **self.kw)
        return images, latents.numpy()


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
    device: str = "cpu",
    min_halving_samples: int = 100,
    **source_options,
) -> dict:
    """Probe each split depth at each NFE against a reference and return a report naming the best depth per NFE.

    `source`: anything `flowmap_convert.load` accepts, or a FlowMap. `reference`: 'auto' (the dataset when the
    extractor has one, else the teacher), 'dataset', 'teacher' (the source's own `teacher_nfe`-step Euler samples
    from the same noise and labels; no data needed), or a path to a stats .npz. `metric`: what ranks depths, 'fd'
    or 'mse' (paired per-sample error, teacher reference only). With `out`, writes search.json, search.png and a
    per-result cache (re-running with the same settings reuses it).
    """
    from .metrics import check_sample_count, dataset_reference, get_extractor, load_reference
    from .model import FlowMap

    t_start, cpu_start = time.perf_counter(), time.process_time()
    # ---------------------------------------------------------------- validate cheap inputs before loading anything
    nfes = [int(n) for n in (nfe if isinstance(nfe, (list, tuple)) else [nfe])]
    if not nfes:
        raise FlowmapError("--nfe needs at least one value, e.g. --nfe 1,4.")
    for n in nfes:
        if n < 1:
            raise FlowmapError(f"--nfe values must be positive integers, got {n}; use e.g. --nfe 1,4.")
    if len(set(nfes)) != len(nfes):
        raise FlowmapError(f"--nfe lists a value twice ({nfes}); list each NFE once.")
    num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
    if num_samples < 2:
        raise FlowmapError(
            f"a Fréchet distance needs at least 2 samples, got --num-samples {num_samples}; use e.g. --num-samples {DEFAULT_NUM_SAMPLES}."
        )
    if metric not in ("fd", "mse"):
        raise FlowmapError(f"unknown --metric {metric!r}; choose fd or mse.")
    if metric == "mse" and reference not in ("teacher", "auto"):
        raise FlowmapError(
            "--metric mse is the paired error to the teacher's samples; use it with --reference teacher."
        )
    if not 0 < ci < 1:
        raise FlowmapError(f"--ci must be in (0, 1), got {ci}.")
    if teacher_nfe < 1:
        raise FlowmapError(f"--teacher-nfe must be a positive integer, got {teacher_nfe}.")
    if best_for_nfe is not None and best_for_nfe not in nfes:
        raise FlowmapError(f"--best-for-nfe {best_for_nfe} is not among the searched NFEs {nfes}; add it to --nfe.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlowmapError(f"--device {device} was asked for but CUDA is not available; use --device cpu.")

    # ---------------------------------------------------------------- model and depths
    if isinstance(source, FlowMap):
        model, source_name = source.eval(), source.config.provenance.get("source", "<in-memory model>")
    else:
        from .api import load

        model, source_name = (
            load(str(source), **{k: v for k, v in source_options.items() if v is not None}),
            str(source),
        )
    if model.config.conditioning == "meanflow":
        raise FlowmapError(
            "this checkpoint is a MeanFlow model with its own (t - r) embedder and no split depth; there is nothing to search."
        )
    n_blocks = model.config.num_blocks
    depths = default_depths(n_blocks) if depths is None else [int(d) for d in depths]
    if not depths:
        raise FlowmapError("no depths to search; pass e.g. --depths 2,4,6 or --depth-range 2:6.")
    for d in depths:
        check_depth(d, n_blocks)
    depths = sorted(set(depths))

    # ---------------------------------------------------------------- features and reference
    extractor = get_extractor(features, model.config, device=device)
    lat = model.config.latent
    dim = extractor.output_dim(lat.image_channels, lat.image_size) if hasattr(extractor, "output_dim") else None
    if dim is not None:
        check_sample_count(num_samples, dim, _warn)
    ref_kind = reference
    if reference == "auto":
        ref_kind = "dataset" if hasattr(extractor, "dataset_reference") and metric == "fd" else "teacher"
    ref_stats = None
    if ref_kind == "dataset":
        ref_stats = dataset_reference(extractor)
    elif ref_kind != "teacher":
        ref_stats = load_reference(reference, extractor)
        ref_kind = "file"
    if ref_stats is not None and dim is not None and ref_stats.dim != dim:
        raise FlowmapError(
            f"reference statistics {ref_stats.source} have dimension {ref_stats.dim} but {extractor.name} features have {dim}; recompute the reference with --features {extractor.name}."
        )
    if metric == "mse" and ref_kind != "teacher":
        raise FlowmapError(
            "--metric mse is the paired error to the teacher's samples; use it with --reference teacher."
        )

    settings = ProbeSettings(
        source_id=_source_id(model, source_name),
        num_samples=num_samples,
        seed=int(seed),
        sampler=sampler,
        features=extractor.name,
        reference=f"teacher:{teacher_nfe}" if ref_kind == "teacher" else ref_stats.digest(),
        metric=metric,
        bootstrap=int(bootstrap),
        ci=float(ci),
        classes=tuple(int(c) for c in classes) if classes else None,
        shift=shift,
        cfg_scale=cfg_scale,
    )
    out = Path(out) if out is not None else None
    cache = out / "cache" if out is not None else None

    from .decoders import get_decoder

    draw = _Sampler(
        seed,
        sampler,
        list(classes) if classes else None,
        batch_size,
        device,
        shift,
        cfg_scale,
        get_decoder(lat, device),
    )

    # ---------------------------------------------------------------- the plan: (depth, nfe, n) evaluations
    rounds = _halving_rounds(len(depths), num_samples, min_halving_samples) if halving else [num_samples]
    first_round = [(d, n, rounds[0]) for d in depths for n in nfes]
    total = _planned_evaluations(len(depths), len(nfes), rounds)
    bar = _Progress(total + (1 if ref_kind == "teacher" else 0)) if progress else None
    results: list[dict] = []
    halving_log: list[dict] = []
    try:
        teacher = None
        if ref_kind == "teacher":
            teacher = _teacher(model, draw, extractor, teacher_nfe, num_samples, settings, cache, bar)
            if bar:
                bar.advance()

        def evaluate(d: int, n_fe: int, n: int) -> dict:
            key = ProbeSettings(**{**asdict(settings), "num_samples": n}).key()
            path = cache / f"depth{d}-nfe{n_fe}-{key}.json" if cache is not None else None
            if path is not None and path.is_file():
                try:
                    row = json.loads(path.read_text())
                    row["cached"] = True
                    return row
                except (OSError, ValueError):
                    pass  # a damaged cache entry is recomputed
            row = _probe(model.with_depth(d), d, n_fe, n, draw, extractor, ref_stats, teacher, settings)
            if path is not None:
                _write_json(path, row)
            row["cached"] = False
            return row

        plan = first_round
        for r, n in enumerate(rounds):
            round_rows = []
            for d, n_fe, _ in plan:
                if bar:
                    bar.set_description(f"depth {d}, {n_fe} NFE, {n} samples")
                row = evaluate(d, n_fe, n)
                round_rows.append(row)
                if bar:
                    bar.advance()
            results.extend(round_rows)
            alive = sorted({row["depth"] for row in round_rows})
            if r + 1 < len(rounds):
                keep = _survivors(round_rows, alive, nfes, metric)
                halving_log.append({"round": r, "num_samples": n, "depths": alive, "kept": keep})
                plan = [(d, n_fe, rounds[r + 1]) for d in keep for n_fe in nfes]
            elif halving:
                halving_log.append({"round": r, "num_samples": n, "depths": alive, "kept": alive})
    finally:
        if bar:
            bar.stop()

    # ---------------------------------------------------------------- the report
    final = _final_rows(results)
    best = {}
    for n_fe in nfes:
        rows = [row for row in final if row["nfe"] == n_fe]
        best[str(n_fe)] = min(rows, key=lambda row: (row[metric], row["depth"]))["depth"]
    chosen_nfe = best_for_nfe if best_for_nfe is not None else min(nfes)
    report = {
        "source": source_name,
        "num_blocks": n_blocks,
        "depths": depths,
        "nfe": nfes,
        "num_samples": num_samples,
        "seed": int(seed),
        "sampler": sampler,
        "features": extractor.name,
        "reference": {
            "kind": ref_kind,
            "teacher_nfe": teacher_nfe if ref_kind == "teacher" else None,
            "source": ref_stats.source
            if ref_stats is not None
            else f"teacher: {teacher_nfe}-step Euler samples of the source velocity model",
        },
        "metric": metric,
        "bootstrap": {"draws": int(bootstrap), "ci": float(ci)},
        "halving": halving_log or None,
        "results": final,
        "all_results": results if halving else None,
        "best": best,
        "best_depth": best[str(chosen_nfe)],
        "best_for_nfe": chosen_nfe,
        "settings_key": settings.key(),
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "cpu_seconds": round(time.process_time() - cpu_start, 2),
        "written": {},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        plot_search(report, out / "search.png")
        report["written"]["plot"] = str(out / "search.png")
        report["written"]["json"] = str(out / "search.json")
    if write_best is not None:
        from .io import export

        best_model = model.with_depth(report["best_depth"])
        prov = dict(model.config.provenance)
        prov["depth_search"] = {
            "metric": metric,
            "nfe": chosen_nfe,
            "features": extractor.name,
            "reference": ref_kind,
            "num_samples": num_samples,
        }
        best_model.config = best_model.config.replace(provenance=prov)
        export(best_model, write_best)
        report["written"]["best_model"] = str(write_best)
    if out is not None:
        _write_json(out / "search.json", report)
    return report


def _halving_rounds(n_depths: int, num_samples: int, min_samples: int) -> list[int]:
    """Sample counts per successive-halving round: the final round uses num_samples, each earlier one half as many."""
    n_rounds = max(1, math.ceil(math.log2(max(n_depths, 1))))  # halve until one or two depths remain
    counts = [max(min(min_samples, num_samples), num_samples >> (n_rounds - 1 - r)) for r in range(n_rounds)]
    out = []
    for c in counts:  # drop rounds that would not add samples
        if not out or c > out[-1]:
            out.append(c)
    return out


def _planned_evaluations(n_depths: int, n_nfe: int, rounds: list[int]) -> int:
    """How many (depth, NFE) evaluations the plan makes (for the progress bar)."""
    total, alive = 0, n_depths
    for _ in range(len(rounds)):
        total += alive * n_nfe
        alive = max(1, math.ceil(alive / 2))
    return total


def _survivors(rows: list[dict], depths: list[int], nfes: list[int], metric: str) -> list[int]:
    """Keep the better half of the depths by mean rank of the probe across NFEs."""
    ranks = {d: 0.0 for d in depths}
    for n_fe in nfes:
        ordered = sorted((row for row in rows if row["nfe"] == n_fe), key=lambda row: row[metric])
        for i, row in enumerate(ordered):
            ranks[row["depth"]] += i
    keep = max(1, math.ceil(len(depths) / 2))
    return sorted(sorted(depths, key=lambda d: (ranks[d], d))[:keep])


def _final_rows(results: list[dict]) -> list[dict]:
    """For each (depth, NFE), the result with the most samples (the last round it took part in)."""
    best: dict[tuple[int, int], dict] = {}
    for row in results:
        k = (row["depth"], row["nfe"])
        if k not in best or row["num_samples"] > best[k]["num_samples"]:
            best[k] = row
    return [best[k] for k in sorted(best)]


def _teacher(model, draw, extractor, teacher_nfe, num_samples, settings, cache, bar):
    """The teacher's latents and features for samples 0..num_samples-1 (cached as .npz in the out dir)."""
    key = hashlib.sha256(
        json.dumps(
            [
                settings.source_id,
                settings.seed,
                settings.features,
                teacher_nfe,
                num_samples,
                settings.classes,
                settings.shift,
                settings.cfg_scale,
            ]
        ).encode()
    ).hexdigest()[:12]
    path = cache / f"teacher-nfe{teacher_nfe}-{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        try:
            data = np.load(path)
            return {"latents": data["latents"], "features": data["features"]}
        except (OSError, ValueError, KeyError):
            pass
    if bar:
        bar.set_description(f"teacher: {teacher_nfe}-step Euler, {num_samples} samples")
    images, latents = draw(velocity_model(model), teacher_nfe, num_samples)
    feats = extractor.features(images)
    if path is not None:
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, latents=latents, features=feats)
    return {"latents": latents, "features": feats}


def _probe(fm, depth, n_fe, n, draw, extractor, ref_stats, teacher, settings: ProbeSettings) -> dict:
    """Sample the flow map split at `depth` with `n_fe` evaluations and measure it against the reference."""
    from .metrics import bootstrap_fd, bootstrap_mean, paired_mse

    t0 = time.perf_counter()
    images, latents = draw(fm, n_fe, n)
    feats = extractor.features(images)
    seed = settings.seed * 7919 + depth * 131 + n_fe  # bootstrap draws are reproducible per cell
    row = {"depth": depth, "nfe": n_fe, "num_samples": n}
    if teacher is not None:
        row["fd"], row["fd_ci"] = bootstrap_fd(
            feats, ref_features=teacher["features"][:n], draws=settings.bootstrap, ci=settings.ci, seed=seed
        )
        row["mse"], row["mse_ci"] = bootstrap_mean(
            paired_mse(latents, teacher["latents"][:n]), draws=settings.bootstrap, ci=settings.ci, seed=seed
        )
    else:
        row["fd"], row["fd_ci"] = bootstrap_fd(
            feats, ref_stats.mu, ref_stats.sigma, draws=settings.bootstrap, ci=settings.ci, seed=seed
        )
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


class _Progress:
    """A rich progress bar over (depth, NFE) evaluations, on stderr."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.p.add_task("search", total=total)
        self.p.start()

    def set_description(self, text: str) -> None:
        """Show what is being evaluated now."""
        self.p.update(self.task, description=text)

    def advance(self) -> None:
        """One (depth, NFE) evaluation done."""
        self.p.advance(self.task)

    def stop(self) -> None:
        """Remove the bar."""
        self.p.stop()


# ---------------------------------------------------------------------------------------------- plot (PIL)
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def plot_search(report: dict, path) -> Path:
    """Probe vs depth, one line per NFE with bootstrap CI bars and the best depth ringed; drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    metric = report["metric"]
    rows = report["results"]
    W, H, L, R, T, B = 720, 440, 70, 130, 40, 50
    img = Image.new("RGB", (W, H), "white")
    g = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    vals = [v for row in rows for v in (row[metric], *row.get(f"{metric}_ci", [row[metric]] * 2))]
    lo, hi = min(vals), max(vals)
    log = lo > 0 and hi / lo > 10  # FD spans decades across NFEs: log axis
    f = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    ylo, yhi = f(lo), f(hi)
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - 1, yhi + 1
    pad = 0.05 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad
    depths = report["depths"]
    dlo, dhi = min(depths) - 0.5, max(depths) + 0.5  # half a step of margin so end points clear the frame

    def X(d):
        return L + (d - dlo) / (dhi - dlo) * (W - L - R)

    def Y(v):
        return T + (1 - (f(v) - ylo) / (yhi - ylo)) * (H - T - B)

    g.rectangle([L, T, W - R, H - B], outline="black")
    for d in depths:  # x ticks
        g.line([X(d), H - B, X(d), H - B + 4], fill="black")
        g.text((X(d) - 4, H - B + 6), str(d), fill="black", font=font)
    for i in range(6):  # y ticks
        yv = ylo + i * (yhi - ylo) / 5
        v = 10**yv if log else yv
        y = T + (1 - i / 5) * (H - T - B)
        g.line([L - 4, y, L, y], fill="black")
        g.line([L + 1, y, W - R - 1, y], fill=(230, 230, 230))
        g.text((4, y - 6), f"{v:.3g}", fill="black", font=font)
    g.text((L + (W - L - R) // 2 - 30, H - 20), "split depth", fill="black", font=font)
    label = "Frechet distance" if metric == "fd" else "paired MSE"
    g.text(
        (L, 10),
        f"{label} vs depth ({report['features']} features, {report['reference']['kind']} reference, {report['num_samples']} samples{', log scale' if log else ''})",
        fill="black",
        font=font,
    )
    for k, n_fe in enumerate(report["nfe"]):
        col = PALETTE[k % len(PALETTE)]
        pts = sorted((row["depth"], row[metric], row.get(f"{metric}_ci")) for row in rows if row["nfe"] == n_fe)
        xy = [(X(d), Y(v)) for d, v, _ in pts]
        if len(xy) > 1:
            g.line(xy, fill=col, width=2)
        for d, v, c in pts:
            if c:
                g.line([X(d), Y(c[0]), X(d), Y(c[1])], fill=col, width=1)
                g.line([X(d) - 3, Y(c[0]), X(d) + 3, Y(c[0])], fill=col)
                g.line([X(d) - 3, Y(c[1]), X(d) + 3, Y(c[1])], fill=col)
            g.ellipse([X(d) - 3, Y(v) - 3, X(d) + 3, Y(v) + 3], fill=col)
        bd = report["best"][str(n_fe)]
        bv = next(v for d, v, _ in pts if d == bd)
        g.ellipse([X(bd) - 7, Y(bv) - 7, X(bd) + 7, Y(bv) + 7], outline=col, width=2)
        g.line([W - R + 12, T + 10 + 18 * k, W - R + 32, T + 10 + 18 * k], fill=col, width=3)
        g.text((W - R + 38, T + 4 + 18 * k), f"NFE {n_fe} (best {bd})", fill="black", font=font)
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path
