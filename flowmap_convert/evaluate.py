"""`flowmap eval`: the numbers a paper table holds (FID, IS, precision / recall, FD-DINOv2, digits FD) per NFE.

Inputs are samples (a folder of PNGs, or an .npz with uint8 NHWC images in arr_0) or a model, which is sampled at
each requested NFE into `<out>/samples-nfe<k>/` first (finished samples with the same settings are reused). The
metrics come from `flowmap_convert.metrics`, the same extractors and Fréchet distance that search-depth uses.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .api import load
from .budget import check, check_npz
from .digits import digits_features
from .errors import FlowmapError
from .export_samples import dist_context, run_sampling
from .extractors import auto_features, cache_dir, get_extractor
from .frechet import feature_stats, frechet_distance
from .images import read_image
from .io import sha256_file
from .metrics import dataset_reference, inception_score, load_reference, precision_recall
from .outputs import atomic_file, check_workdir, mark_output, output_lock, write_error
from .plots import Series, draw_panel, save_png
from .sampling import SampleSettings

METRICS = ("fid", "is", "pr", "fd_dinov2", "digits")
PR_K = 3
IS_SPLITS = 10


# ---------------------------------------------------------------------------------------------- images
def read_images(path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(uint8 NHWC images, labels or None, description) from a PNG folder or an .npz (arr_0; labels in arr_1)."""
    path = Path(path)
    if path.is_dir():
        if (path / "samples.npz").is_file():
            return read_images(path / "samples.npz")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.name != "grid.png")
        if not files:
            raise FlowmapError(f"{path} holds no .png images; pass a folder of PNGs or an .npz with arr_0.")
        first = None
        images = []
        for p in files:
            a = read_image(p)  # palette, 16-bit, alpha, CMYK mapped to 8-bit pixels; damaged files are one line
            if first is None:
                first = (p, a.shape)
                check(float(a.nbytes) * len(files), f"{len(files):,} images of {a.shape}", "evaluate fewer images")
            elif a.shape != first[1]:
                raise FlowmapError(
                    f"{p.name} is {a.shape[1]}x{a.shape[0]} with {a.shape[2]} channel(s) but {first[0].name} is "
                    f"{first[1][1]}x{first[1][0]} with {first[1][2]}; all images must share size and channels."
                )
            images.append(a)
        labels = _sidecar_labels(path, len(images))
        return np.stack(images), labels, f"{path} ({len(images)} PNGs)"
    if path.suffix in (".npz", ".npy") and path.is_file():
        check_npz(path)  # headers first: object arrays and sizes beyond the file or the memory are refused
        try:
            if path.suffix == ".npy":
                images, labels = np.load(path, allow_pickle=False), None
            else:
                with np.load(path, allow_pickle=False) as data:
                    images = data["arr_0"] if "arr_0" in data.files else None
                    labels = data["arr_1"] if "arr_1" in data.files else None
        except (OSError, ValueError, EOFError) as e:
            raise FlowmapError(f"cannot read {path} ({e}).") from None
        if images is None:
            raise FlowmapError(f"{path} has no arr_0 images; pass an .npz written by `flowmap sample --npz` or ADM.")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise FlowmapError(
                f"{path} arr_0 must be uint8 NHWC with 1 or 3 channels, got {images.dtype} {images.shape}."
            )
        if len(images) == 0:
            raise FlowmapError(f"{path} holds no images.")
        if labels is None:
            labels = _sidecar_labels(path.parent, len(images))
        elif labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
            raise FlowmapError(
                f"{path} arr_1 must hold one integer class label per image ({len(images)}), got {labels.dtype} "
                f"{labels.shape}; fix it or drop arr_1."
            )
        return images, labels, f"{path} ({len(images)} images)"
    raise FlowmapError(f"{path} is neither a folder of PNGs nor an .npz / .npy file; pass samples or a model.")


def strict_json(value):
    """`value` with every non-finite float as null, so eval.json is strict JSON (no bare NaN / Infinity)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        return strict_json(value.item())
    return value


def _sidecar_labels(directory: Path, n: int) -> np.ndarray | None:
    """Conditioning labels from a `flowmap sample` samples.json next to the images, when it lists one per image."""
    meta = directory / "samples.json"
    try:
        cls = json.loads(meta.read_text()).get("classes") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return np.asarray(cls) if isinstance(cls, list) and len(cls) == n else None


def _content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's PNG names and bytes (keys the reference-statistics cache)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.suffix.lower() == ".png":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- references
class Reference:
    """Reference images or statistics; per-extractor features and statistics cached by content hash."""

    def __init__(self, spec: str | None):
        self.spec = spec
        self.kind = "dataset" if spec in (None, "auto", "dataset") else None
        self.path = None if self.kind else Path(spec)
        self.stats_only = False
        self.shape = None
        if self.path is not None:
            if not self.path.exists():
                raise FlowmapError(
                    f"reference {self.path} does not exist; pass an ADM .npz, a stats .npz or a PNG folder."
                )
            if self.path.is_file():
                keys = set(check_npz(self.path, f"reference {self.path}"))  # headers only: nothing allocated yet
                self.stats_only = {"mu", "sigma"} <= keys and "arr_0" not in keys
                if not self.stats_only and "arr_0" not in keys:
                    raise FlowmapError(
                        f"reference {self.path} has neither arr_0 images nor mu/sigma (keys: {', '.join(sorted(keys)) or 'none'})."
                    )
            self.kind = "stats" if self.stats_only else "images"
            self._hash = _content_hash(self.path)
        self._images = None

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = read_images(self.path)[0]
            self.shape = self._images.shape[1:]
        return self._images

    def check_shape(self, sample_shape) -> None:
        """A reference of another resolution or channel count is refused (the numbers would not be comparable)."""
        if self.kind != "images":
            return
        shape = self._cached_shape()
        if tuple(shape[:2]) != tuple(sample_shape[:2]) or shape[2] != sample_shape[2]:
            raise FlowmapError(
                f"reference {self.path} holds {shape[1]}x{shape[0]} images with {shape[2]} channel(s) but the samples are "
                f"{sample_shape[1]}x{sample_shape[0]} with {sample_shape[2]}; use a reference at the samples' resolution."
            )

    def _cached_shape(self):
        meta = cache_dir() / "reference" / f"{self._hash[:16]}.shape.json"
        if meta.is_file():
            return json.loads(meta.read_text())
        shape = list(self.images().shape[1:])
        with atomic_file(meta) as tmp:
            tmp.write_text(json.dumps(shape))
        return shape

    def features(self, extractor) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(features or None for stats-only references, mu, sigma) under `extractor`; cached by content hash."""
        if self.kind == "dataset":
            ref = dataset_reference(extractor)
            return None, ref.mu, ref.sigma
        if self.kind == "stats":
            ref = load_reference(self.path)
            return None, ref.mu, ref.sigma
        cached = cache_dir() / "reference" / f"{self._hash[:16]}-{extractor.name}.npz"
        if cached.is_file():
            d = np.load(cached)
            return d["features"].astype(np.float64), d["mu"], d["sigma"]
        feats = extractor.features(self.images())
        mu, sigma = feature_stats(feats)
        with atomic_file(cached, suffix=".npz") as tmp:
            np.savez(tmp, features=feats.astype(np.float32), mu=mu, sigma=sigma)
        return feats.astype(np.float32).astype(np.float64), mu, sigma

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "sha256": getattr(self, "_hash", None),
        }


# ---------------------------------------------------------------------------------------------- metrics
def parse_metrics(text: str | None, digits_model: bool) -> list[str]:
    """'auto' -> digits for the builtin digits models, else fid,is,pr; otherwise a checked comma list."""
    if text in (None, "", "auto"):
        return ["digits"] if digits_model else ["fid", "is", "pr"]
    names = [m.strip().lower().replace("-", "_") for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise FlowmapError(
            "unknown `metrics` " + (", ".join(bad) or repr(text)) + f"; choose from {', '.join(METRICS)} or auto."
        )
    return list(dict.fromkeys(names))


def _need(n: int, dim: int, what: str, more: str | None = None) -> None:
    """Refuse fewer samples than feature dimensions; `more` is the command that makes enough (samples folders)."""
    if n < dim:
        fix = f"write at least {dim} with `{more.format(n=dim)}`" if more else f"use `num_samples` >= {dim}"
        raise FlowmapError(
            f"{n} samples are fewer than the {dim} feature dimensions of {what}: the Fréchet distance would be "
            f"meaningless; {fix}."
        )


def score(images, labels, metrics: list[str], reference: Reference, device="cpu", extractors=None) -> dict:
    """Every requested metric for one set of images (the extractors are built once and shared via `extractors`)."""
    extractors = {} if extractors is None else extractors

    def ext(name):
        if name not in extractors:
            extractors[name] = get_extractor(name, device=device)
        return extractors[name]

    out: dict = {}
    n = len(images)
    if any(m in metrics for m in ("fid", "pr", "fd_dinov2")):
        reference.check_shape(images.shape[1:])
    if any(m in metrics for m in ("fid", "is", "pr")):
        inc = ext("inception")
        if "fid" in metrics:
            _need(n, inc.dim, "Inception")
        feats, logits = inc.features_and_logits(images)
        if "fid" in metrics or "pr" in metrics:
            rf, mu, sigma = reference.features(inc)
            if "fid" in metrics:
                out["fid"] = frechet_distance(*feature_stats(feats), mu, sigma)
            if "pr" in metrics:
                if rf is None:
                    out["precision"] = out["recall"] = None  # a statistics file has no images to build a manifold
                else:
                    out["precision"], out["recall"] = precision_recall(rf, feats, k=PR_K)
        if "is" in metrics:
            out["is"], out["is_std"] = inception_score(logits, IS_SPLITS)
    if "fd_dinov2" in metrics:
        dino = ext("dinov2")
        _need(n, dino.dim, "DINOv2")
        _, mu, sigma = reference.features(dino)
        out["fd_dinov2"] = frechet_distance(*feature_stats(dino.features(images)), mu, sigma)
    if "digits" in metrics:
        dg = ext("digits")
        _need(n, dg.dim, "the digits classifier")
        _, mu, sigma = reference.features(dg)
        feats = dg.features(images)
        out["digits_fd"] = frechet_distance(*feature_stats(feats), mu, sigma)
        if labels is not None and reference.kind == "dataset":
            _, lg = digits_features(images, return_logits=True)
            out["digits_acc"] = float((lg.argmax(-1).numpy() == np.asarray(labels)).mean())
    return out


def prepare_extractors(metrics: list[str], extractors: dict, device) -> None:
    """Build the extractors the metrics need (weights missing offline fail here, before any sampling)."""
    need = {"fid": "inception", "is": "inception", "pr": "inception", "fd_dinov2": "dinov2", "digits": "digits"}
    for m in metrics:
        if need[m] not in extractors:
            extractors[need[m]] = get_extractor(need[m], device=device)


def check_counts(metrics: list[str], extractors: dict, n: int, more: str | None = None) -> None:
    """Every Fréchet metric needs at least as many samples as feature dimensions (else it is an error, not a number).

    `more`: for samples read from disk, the command that writes enough of them ({n} is the count needed).
    """
    for m, name, what in (
        ("fid", "inception", "Inception"),
        ("fd_dinov2", "dinov2", "DINOv2"),
        ("digits", "digits", "the digits classifier"),
    ):
        if m in metrics:
            _need(n, extractors[name].dim, what, more)


def _sample_command(path: Path) -> str:
    """`flowmap sample MODEL -n {n} --out PATH` for a samples folder, with the model its samples.json names."""
    model = "MODEL"
    try:
        meta = json.loads((path / "samples.json").read_text()) if path.is_dir() else {}
        model = str(meta.get("model") or model).split(" (")[0]
    except (OSError, ValueError, AttributeError):
        pass
    return f"flowmap sample {model} -n {{n}} --out {path}"


def model_sha256(model) -> str:
    """sha256 over the model's weights as loaded (names and bytes, in state-dict order)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _reusable(samples_dir: Path, settings: SampleSettings, n: int, sha: str) -> bool:
    meta = samples_dir / "samples.json"
    if not (meta.is_file() and (samples_dir / "samples.npz").is_file()):
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return m.get("settings_key") == settings.key() and m.get("num_samples") == n and m.get("model_sha256") == sha


def evaluate(
    target,
    *,
    nfe=(1,),
    num_samples: int | None = None,
    reference: str | None = "auto",
    metrics: str | None = "auto",
    settings: SampleSettings | None = None,
    out=None,
    progress: bool = True,
    chunk_size: int = 1000,
    on_start=None,
    **load_options,
) -> dict:
    """Score samples (PNG folder / .npz) or a model at each NFE; writes eval.json and eval.png when `out` is set.

    `out` is locked for the whole evaluation (flowmap_convert.outputs.output_lock) and marked as ours once every
    input is checked, so an evaluation stopped by Ctrl-C or a full disk can be rerun into it.
    """
    t_all = time.perf_counter()
    settings = settings or SampleSettings()
    ref = Reference(reference)
    out = check_workdir(out, "eval", "flowmap eval output", sources=(target,)) if out is not None else None
    if out is None:
        return _evaluate(
            target, nfe, num_samples, ref, metrics, settings, out, progress, chunk_size, on_start, t_all, load_options
        )

    def started():  # every input checked: marked before any work, so an evaluation stopped half-way is ours to rerun
        if dist_context()[0] == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_error(out, e) from None
            mark_output(out, "eval", files=[], update=True)
        if user_start is not None:
            user_start()

    user_start, on_start = on_start, started
    with output_lock(out) if dist_context()[0] == 0 else nullcontext():
        return _evaluate(
            target, nfe, num_samples, ref, metrics, settings, out, progress, chunk_size, on_start, t_all, load_options
        )


def _evaluate(
    target, nfe, num_samples, ref, metrics, settings, out, progress, chunk_size, on_start, t_all, load_options
):
    results = []
    extractors: dict = {}
    path = Path(str(target))
    is_samples = path.suffix == ".npz" or (path.is_dir() and not (path / "config.json").is_file())
    report = {"target": str(target), "reference": ref.describe()}
    if is_samples:
        images, labels, desc = read_images(path)
        digits_model = images.shape[1:] == (16, 16, 1)
        names = parse_metrics(metrics, digits_model)
        prepare_extractors(names, extractors, settings.device or "cpu")
        if any(m in names for m in ("fid", "pr", "fd_dinov2")):
            ref.check_shape(images.shape[1:])
        check_counts(names, extractors, len(images), _sample_command(path))
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        row = {"nfe": None, "num_samples": len(images), "samples": desc}
        row.update(score(images, labels, names, ref, settings.device or "cpu", extractors))
        row["eval_seconds"] = round(time.perf_counter() - t0, 3)
        results.append(row)
        report.update(model_sha256=None, settings=None)
    else:
        if out is None:
            raise FlowmapError("evaluating a model needs `out` (where its samples are written and reused).")
        model = load(str(target), **load_options)
        digits_model = auto_features(model.config) == "digits"
        names = parse_metrics(metrics, digits_model)
        prepare_extractors(names, extractors, str(settings.device or "cpu"))  # missing weights fail before sampling
        n = num_samples if num_samples is not None else (1000 if digits_model else 50_000)
        lat = model.config.latent
        if any(m in names for m in ("fid", "pr", "fd_dinov2")):  # a reference of another resolution: before sampling
            ref.check_shape((lat.image_size, lat.image_size, lat.image_channels))
        check_counts(names, extractors, n)
        if on_start is not None:
            on_start()
        sha = model_sha256(model)
        report.update(model_sha256=sha, settings=settings.to_dict())
        for k in nfe:
            s = SampleSettings(**{**settings.__dict__, "nfe": int(k)})
            sdir = out / f"samples-nfe{k}"
            reused = _reusable(sdir, s.resolve(model), n, sha)
            t0 = time.perf_counter()
            if not reused:
                meta = {"model": str(target), "model_sha256": sha, "settings_key": s.resolve(model).key()}
                if (
                    run_sampling(
                        model, s, n, sdir, meta=meta, png=False, npz=True, chunk_size=chunk_size, progress=progress
                    )
                    is None
                ):
                    continue  # not rank 0: rank 0 scores
            t_sample = time.perf_counter() - t0
            images, labels, _ = read_images(sdir / "samples.npz")
            labels = np.asarray(json.loads((sdir / "samples.json").read_text())["classes"])
            t1 = time.perf_counter()
            row = {"nfe": int(k), "num_samples": len(images), "samples": str(sdir), "reused": reused}
            row.update(score(images, labels, names, ref, str(s.device or "cpu"), extractors))
            row["sample_seconds"] = round(t_sample, 3)
            row["eval_seconds"] = round(time.perf_counter() - t1, 3)
            results.append(row)
    report.update(metrics=names, results=results, wall_seconds=round(time.perf_counter() - t_all, 2))
    if dist_context()[0] != 0:
        return report  # under torchrun the other ranks only sample; rank 0 scores and writes
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "eval", files=[], update=True)
        if not is_samples:
            plot_eval(report, out / "eval.png")
            report["plot"] = str(out / "eval.png")
        with atomic_file(out / "eval.json") as tmp:
            tmp.write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    return report


COLUMNS = [
    ("fid", "FID"),
    ("is", "IS"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("fd_dinov2", "FD-DINOv2"),
    ("digits_fd", "digits FD"),
    ("digits_acc", "digits acc"),
]


def table(report: dict) -> str:
    """The console table: one row per NFE, one column per metric."""
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in report["results"])]
    head = f"{'NFE':>4} {'samples':>8} " + " ".join(f"{h:>10}" for _, h in cols)
    lines = [head]
    for r in report["results"]:
        cells = " ".join(f"{r[k]:>10.4g}" if r.get(k) is not None else f"{'-':>10}" for k, _ in cols)
        lines.append(f"{r['nfe'] if r['nfe'] is not None else '-':>4} {r['num_samples']:>8} {cells}")
    return "\n".join(lines)


def plot_eval(report: dict, path) -> Path:
    """One panel per metric against NFE (log y axis when a metric spans more than 10x)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [r for r in report["results"] if r["nfe"] is not None]
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    pw, ph = 340, 260
    img = Image.new("RGB", (max(1, len(cols)) * pw, ph), "white")
    g = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = sorted({r["nfe"] for r in rows})
    for i, (k, h) in enumerate(cols):
        pts = [(r["nfe"], r[k]) for r in rows if r.get(k) is not None]
        draw_panel(g, font, (i * pw + 70, 30, i * pw + pw - 15, ph - 45), [Series(h, pts)], f"{h} vs NFE", "NFE", xs)
    return save_png(img, path)
