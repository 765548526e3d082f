"""`flowmap encode`: an image folder -> latent shards for `flowmap finetune --data`; streamed, resumable, multi-process.

The sorted file list (one sub-folder per class, `finetuning.data.list_image_folder`) is cut into shards of
`shard_size` files: shard k holds files [k S, (k + 1) S). Each shard is read and encoded batch by batch (ADM's centre
crop in `finetuning.data.load_images`) and written atomically to `.<out>.partial/shard-<k>.safetensors` as soon as
it is complete, so memory holds one shard at most and a killed run resumes at the first missing shard (the partial
directory's run.json must match the new run's settings). Under torchrun / accelerate launch, on one node or many,
process r of W encodes the shards k with k % W == r; after a barrier, global rank 0 alone moves the shards into
`out` with meta.json and the output marker. A shard's bytes depend only on its files and the settings (its batches
always start at the shard's first file), so any number of processes writes the same bytes as one.

Latent spaces whose encoder is a distribution (SD-VAE) store the posterior as REPA's `vae-sd` files do: `moments`
(N, 2C, H, W) = cat(mean, std), unscaled, with `scale` and `bias`; the fine-tuner draws z = (mean + std * eps) *
scale + bias afresh at every step (finetuning.data.LatentDataset.get). Deterministic encoders (identity, RAE) store `latents`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

from .api import load
from .decoders import get_decoder
from .errors import FlowmapError
from .export_samples import dist_context, partial_dir
from .finetuning.data import list_image_folder, load_images
from .outputs import atomic_dir, atomic_file, check_output, write_error
from .progress import Progress
from .runtime import resolve_device
from .validate import int_in_range
from .vocabulary import register_flags

register_flags({"shard_size": "--shard-size"})  # `batch_size` and `device` are shared concepts already

FORMAT = "flowmap-latents/2"  # /2: SD-VAE shards hold the posterior moments (mean, std), not one sample
RUN_FILE = "run.json"


def shard_name(k: int) -> str:
    """File name of shard k."""
    return f"shard-{k:05d}.safetensors"


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _listing_digest(files: list[Path], root: Path, labels: list[int]) -> str:
    """sha256 of the (relative path, label) list: a resumed run must encode the very same files in the same order."""
    h = hashlib.sha256()
    for f, y in zip(files, labels):
        h.update(f"{f.relative_to(root).as_posix()}\t{y}\n".encode())
    return h.hexdigest()


def _open_partial(part: Path, run: dict, rank: int, world: int) -> None:
    """Rank 0 creates the partial directory or checks that the one there holds this very run; then all wait."""
    err = None
    if rank == 0:
        marker = part / RUN_FILE
        try:
            if part.is_dir() and not any(part.iterdir()):  # killed between creating it and writing run.json
                part.rmdir()
            if part.exists():
                try:
                    old = json.loads(marker.read_text())
                except (OSError, ValueError):
                    old = None
                if old is None:
                    err = FlowmapError(
                        f"{part} exists but is not a flowmap encode run; remove it or choose another `out`."
                    )
                elif old != run:
                    err = FlowmapError(
                        f"{part} holds an unfinished encode run with other settings or files; rerun with the same "
                        "settings to resume, or remove that directory (flowmap wrote it) to start over."
                    )
            else:
                part.mkdir(parents=True)
                with atomic_file(marker) as tmp:
                    tmp.write_text(json.dumps(run, indent=2) + "\n")
        except OSError as e:
            err = write_error(part, e)
    if world > 1:  # every rank learns whether rank 0 succeeded, so none waits at a barrier for a failed one
        import torch.distributed as dist

        flag = [err is not None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] and err is None:
            raise FlowmapError(f"rank 0 could not prepare {part}; see its message above.")
    if err is not None:
        raise err


def _encoder(latent, device):
    """(encode(images) -> rows, rows name): posterior moments for SD-VAE, the latents themselves otherwise."""
    enc = get_decoder(latent, device)
    if latent.kind == "sd-vae":
        return enc.moments, "moments"
    return enc.encode, "latents"


def encode_folder(
    images_dir,
    model: str,
    out,
    *,
    shard_size: int = 10_000,
    batch_size: int = 32,
    device: str | None = "cpu",
    progress: bool = True,
    latent=None,
    on_shard=None,
) -> Path | None:
    """Encode `images_dir` (class sub-folders) into `out` for the latent space of `model`; see the module docstring.

    Returns `out` on global rank 0 and None on the other ranks. `latent` (a LatentSpace) skips loading `model`;
    `on_shard(k)` is called after shard k is on disk (tests use it to stop a run half-way).
    """
    images_dir, out = Path(images_dir), Path(out)
    int_in_range("`shard_size`", shard_size, 1, 10**9)
    int_in_range("`batch_size`", batch_size, 1, 10**6)
    if not images_dir.is_dir():
        raise FlowmapError(f"{images_dir} is not a directory; pass a folder with one sub-folder of images per class.")
    check_output(out, "encode", sources=(images_dir, model))  # only our own encode output is ever replaced
    rank, world = dist_context()
    dev = resolve_device(device)
    model_sha256 = None
    if latent is None:
        net = load(model)
        latent, model_sha256 = net.config.latent, (net.config.provenance or {}).get("sha256")
        del net
    files, labels, classes = list_image_folder(images_dir)
    if not files:
        raise FlowmapError(f"{images_dir} has no images in class sub-folders (e.g. {images_dir}/cat/001.png).")
    n, n_shards = len(files), math.ceil(len(files) / shard_size)
    run = {
        "format": FORMAT,
        # the files by relative path and label, not the folder's absolute path (mounted elsewhere on another node)
        "model": str(model),
        "latent": dataclasses.asdict(latent),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "num_samples": n,
        "listing_sha256": _listing_digest(files, images_dir, labels),
    }
    run = json.loads(json.dumps(run, default=str))  # as run.json reads back (tuples become lists)
    part = partial_dir(out)
    _open_partial(part, run, rank, world)
    encode, rows_name = _encoder(latent, dev)
    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if not (part / shard_name(k)).is_file()]
    size = lambda k: min(shard_size, n - k * shard_size)  # noqa: E731
    share, done = sum(size(k) for k in mine), sum(size(k) for k in mine if k not in todo)
    desc = "encode" if world == 1 else f"encode (rank {rank}/{world})"
    try:
        with Progress(share, desc, "images", mode="auto" if progress else "off", start=done) as bar:
            for k in todo:
                lo, hi = k * shard_size, k * shard_size + size(k)
                parts = []
                for b in range(lo, hi, batch_size):
                    batch = files[b : min(b + batch_size, hi)]
                    images = load_images(batch, latent.image_size, latent.image_channels)
                    with torch.no_grad():
                        parts.append(encode(images.to(dev)).float().cpu())
                    bar.advance(len(batch))
                tensors = {rows_name: torch.cat(parts).contiguous(), "labels": torch.tensor(labels[lo:hi])}
                if rows_name == "moments":
                    tensors["scale"] = torch.tensor([float(latent.scale)], dtype=torch.float64)
                    tensors["bias"] = torch.tensor([float(latent.bias)], dtype=torch.float64)
                _save_shard(tensors, part / shard_name(k))
                if on_shard is not None:
                    on_shard(k)
        _barrier(world)
        if rank != 0:
            return None
        meta = {"format": FORMAT, "model": str(model), "latent": latent.kind, "rows": rows_name, "classes": classes}
        meta["num_samples"] = n
        meta["model_sha256"] = model_sha256  # the weights the latent space came from (result lines name them)
        with atomic_dir(out, "encode", sources=(images_dir, model)) as tmp:
            for k in range(n_shards):
                _link_or_copy(part / shard_name(k), tmp / shard_name(k))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise write_error(out, e) from None
    for k in range(n_shards):  # the shards are in `out` now; the partial directory held only what this run wrote
        (part / shard_name(k)).unlink(missing_ok=True)
    (part / RUN_FILE).unlink(missing_ok=True)
    try:
        part.rmdir()
    except OSError:
        pass  # something else was put there: leave it
    return out


def _save_shard(tensors: dict, path: Path) -> None:
    """Write one shard atomically (a killed run never leaves a half shard under the final name)."""
    from safetensors.torch import save_file

    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp))


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of ImageNet's latents) where the filesystem allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
