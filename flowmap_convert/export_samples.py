"""Writing samples to disk: PNG files, grid.png, ADM-style samples.npz and a JSON sidecar, atomically.

`run_sampling` is the long-run driver behind `flowmap sample` and `flowmap eval`: it draws sample indices in fixed
chunks (chunk k holds indices [k C, (k + 1) C)), writes each finished chunk to `.<out>.partial/`, and skips finished
chunks when re-run with the same run, so an interrupted 50k run resumes where it stopped. A run is its model's content
(`model_identity`: the weights file's sha256, or the loaded weights' when there is no local file) and its resolved
settings (batch size included: it can move a pixel by one grey level); a resume with anything else is refused in
one line naming the setting and both values, and a damaged chunk is drawn again. Rank 0 holds the output's lock
(flowmap_convert.outputs.output_lock) for the whole run: a second writer is refused at once. Under torchrun /
accelerate launch (WORLD_SIZE > 1) rank r draws the chunks k with k % WORLD_SIZE == r; after a barrier rank 0
assembles them in index order, so the output is byte-identical to a one-process run. The ranks share the output
filesystem (one node, or a disk shared by all nodes); rank means the global rank, so with several nodes one
process of the whole launch writes, and LOCAL_RANK only picks each process's GPU on its node.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import FlowmapError
from .outputs import atomic_dir, atomic_file, content_hash, output_lock, write_error
from .progress import Progress
from .sampling import UINT8_FORMULA, Sampler, SampleSettings

DEFAULT_CHUNK = 1000
GRID_MAX_IMAGES = 1024
PARTIAL_RUN = "run.json"


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image with a small white border."""
    n, h, w, c = images.shape
    ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def to_pil(img: np.ndarray) -> Image.Image:
    """HWC uint8 -> PIL image (grayscale for one channel)."""
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def grid_columns(labels, n: int) -> int:
    """One column per class when the labels cycle through a short class list (sample i has class i % K), else sqrt."""
    labels = [int(v) for v in labels] if labels is not None else []
    k = len(dict.fromkeys(labels))
    if 1 < k <= 64 and len(labels) >= k and all(labels[i] == labels[i % k] for i in range(len(labels))):
        return k
    return max(1, int(math.ceil(math.sqrt(n))))


def write_grid(images: np.ndarray, path: str | Path, upscale: int = 1, ncols: int | None = None) -> None:
    """Save a grid PNG, optionally upscaled with nearest-neighbour for tiny images."""
    im = to_pil(make_grid(images, ncols=ncols))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez layout with fixed zip timestamps: the same arrays always give the same bytes (np.load reads it)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def write_samples(
    images: np.ndarray, out: str | Path, meta: dict, png: bool = True, npz: bool = False, labels=None, sources=()
) -> Path:
    """Write an output directory of samples; nothing is left behind if writing fails."""
    try:
        with atomic_dir(out, "samples", sources=sources) as tmp:
            if png:
                for i, img in enumerate(images):
                    to_pil(img).save(tmp / f"{i:06d}.png")
            side = images.shape[1]
            ncols = grid_columns(labels, len(images))
            shown = images[: max(ncols, GRID_MAX_IMAGES // ncols * ncols)]
            write_grid(shown, tmp / "grid.png", upscale=max(1, 128 // side), ncols=ncols)
            if npz:
                save_npz(tmp / "samples.npz", arr_0=images)
            meta = {**meta, "uint8_formula": UINT8_FORMULA, "shape": list(images.shape)}
            (tmp / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise write_error(out, e) from None
    return Path(out)


# ---------------------------------------------------------------------------------------------- processes
def dist_context() -> tuple[int, int]:
    """(rank, world size): torch.distributed when launched by torchrun / accelerate (WORLD_SIZE > 1), else (0, 1).

    Starts the process group (gloo on CPU, nccl with CUDA) when the launcher set the environment but no one has.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FLOWMAP_DIST_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":  # `cuda` means this process's GPU on its node (LOCAL_RANK), not GPU 0 for every rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def partial_dir(out: str | Path) -> Path:
    """Where finished chunks of an unfinished run live: `.<out>.partial` next to `out`."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _chunk_path(part: Path, k: int) -> Path:
    return part / f"chunk-{k:06d}.npz"


def model_identity(model, source=None) -> str:
    """The content hash a sampling run is keyed by: the sha256 of the local weights file `source` names (read once
    per process, cached by path, size and mtime), else of the loaded weights; combined with the loaded config
    (a re-conversion at another depth keeps the weights file but changes the model)."""
    import hashlib

    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
    if source is not None and ":" not in str(source).split("/")[0]:
        p = Path(str(source))
        weights = p / "model.safetensors" if p.is_dir() else p
        if weights.is_file():
            return hashlib.sha256(content_hash(weights).encode() + config).hexdigest()
    h = hashlib.sha256(config)
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_difference(old: dict, new: dict) -> tuple[str, object, object] | None:
    """The first setting (dotted name) in which two run records differ, with both values; None when they agree."""
    a, b = _flat(old), _flat(new)
    for d in (a, b):
        d.pop("model", None)  # where the model was read from: the content (model_sha256) is what counts
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("model"), k)):
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            return key, a.get(key, "(unset)"), b.get(key, "(unset)")
    return None


def _show(key: str, v) -> str:
    return f"{v[:12]}..." if key.endswith("sha256") and isinstance(v, str) else repr(v)


def _open_partial(part: Path, run: dict, rank: int, world: int) -> None:
    """Create the partial directory (rank 0) or check that the one there belongs to this very run."""
    marker = part / PARTIAL_RUN
    if rank == 0:
        if part.is_symlink():
            raise FlowmapError(f"{part} is a symbolic link; flowmap never writes through one: remove it.")
        if part.exists():
            try:
                old = json.loads(marker.read_text())
                if not isinstance(old, dict):
                    raise ValueError
            except (OSError, ValueError):
                raise FlowmapError(
                    f"{part} exists but is not a flowmap partial run; remove it or choose another `out`."
                ) from None
            diff = run_difference(old, run)
            if diff is not None:
                key, was, now = diff
                head = (
                    f"of another model (model sha256 {_show(key, was)}, this one {_show(key, now)})"
                    if key == "model_sha256"
                    else f"with {key} {_show(key, was)} (this one: {_show(key, now)})"
                )
                raise FlowmapError(
                    f"{part} holds an unfinished run {head}; rerun it unchanged to resume, or remove that directory "
                    "(flowmap wrote it) to start over."
                )
        else:
            part.mkdir(parents=True)
            with atomic_file(marker) as tmp:
                tmp.write_text(json.dumps(run, indent=2))
    _barrier(world)


def run_sampling(
    model,
    settings: SampleSettings,
    num_samples: int,
    out: str | Path,
    *,
    meta: dict | None = None,
    png: bool = True,
    npz: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    decoder=None,
    on_chunk=None,
) -> Path | None:
    """Sample `num_samples` images into `out` in resumable chunks, over every process of the launch.

    Returns `out` on rank 0 and None on the other ranks. `on_chunk(k)` is called after chunk k is on disk.
    """
    rank, world = dist_context()
    out = Path(out)
    with output_lock(out) if rank == 0 else _nothing():
        return _run_sampling(
            model, settings, num_samples, out, rank, world, meta, png, npz, chunk_size, progress, decoder, on_chunk
        )


@contextmanager
def _nothing():
    yield


def _chunk_ok(path: Path, expected: int) -> bool:
    """True when a finished chunk reads back whole (a damaged one is drawn again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
        return images.dtype == np.uint8 and images.ndim == 4 and len(images) == expected
    except Exception:  # noqa: BLE001 - any unreadable chunk (truncated zip, bad header, missing array) is redrawn
        return False


def _run_sampling(
    model, settings, num_samples, out, rank, world, meta, png, npz, chunk_size, progress, decoder, on_chunk
):
    sampler = Sampler(model, settings, decoder)
    labels = sampler.labels(num_samples)
    part = partial_dir(out)
    run = {
        "settings": sampler.settings.key(),
        "batch_size": sampler.settings.batch_size,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        **(meta or {}),
    }
    run.setdefault("model_sha256", model_identity(model))
    try:
        _open_partial(part, run, rank, world)
        n_chunks = math.ceil(num_samples / chunk_size)
        mine = [k for k in range(n_chunks) if k % world == rank]

        def size(k):
            return min(chunk_size, num_samples - k * chunk_size)

        todo = [k for k in mine if not (_chunk_path(part, k).is_file() and _chunk_ok(_chunk_path(part, k), size(k)))]
        share = sum(min(chunk_size, num_samples - k * chunk_size) for k in mine)
        done = share - sum(min(chunk_size, num_samples - k * chunk_size) for k in todo)
        desc = "sample" if world == 1 else f"sample (rank {rank}/{world})"
        with Progress(share, desc, "images", mode="auto" if progress else "off", start=done) as bar:
            for k in todo:
                idx = range(k * chunk_size, min((k + 1) * chunk_size, num_samples))
                images = sampler.draw(idx, labels, on_batch=bar.advance)
                with atomic_file(_chunk_path(part, k), suffix=".npz") as tmp:
                    save_npz(tmp, images=images)
                if on_chunk is not None:
                    on_chunk(k)
        _barrier(world)
        if rank != 0:
            return None
        images = np.concatenate([np.load(_chunk_path(part, k))["images"] for k in range(n_chunks)])
    except OSError as e:
        raise write_error(out, e) from None
    full_meta = {**(meta or {}), **sampler.settings.to_dict(), "num_samples": num_samples}
    full_meta["classes"] = labels.tolist()
    write_samples(images, out, full_meta, png=png, npz=npz, labels=labels.tolist())
    for k in range(n_chunks):  # every file here was written by this run (the marker checked it)
        _chunk_path(part, k).unlink(missing_ok=True)
    for tmp in part.glob("chunk-*.npz.tmp*.npz"):  # a chunk being written when an earlier run was killed
        tmp.unlink(missing_ok=True)
    (part / PARTIAL_RUN).unlink(missing_ok=True)
    try:
        part.rmdir()
    except OSError:
        pass  # something else was put there: leave it
    return out
