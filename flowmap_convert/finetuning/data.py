"""Training data for the fine-tuner: pre-encoded latents (REPA / DMF `vae-sd` moments, our shards), image folders, builtins.

Every source becomes a `LatentDataset` with `get(indices, gen) -> (x0, y)`; `check_dataset` turns wrong shapes,
out-of-range labels, non-finite latents and empty datasets into FlowmapErrors before training starts.
`EpochSampler` walks seeded per-epoch permutations so that the data position is a pure function of the step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..budget import check
from ..config import SD_VAE_SCALE  # REPA / DMF: z = (mean + std * eps) * SD_VAE_SCALE
from ..decoders import get_decoder
from ..digits import builtin_dataset
from ..errors import FlowmapError
from ..images import read_image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SHARD_EXTS = (".safetensors", ".npz")
MOMENT_CHECK_LIMIT = 512  # moments files read up front for validation (the rest are checked when drawn)


class LatentDataset:
    """Latents (or moments to sample a posterior from) and integer labels."""

    def __init__(
        self,
        latents=None,
        labels=None,
        files=None,
        root=None,
        posterior=False,
        scale=1.0,
        name="",
        bias=0.0,
        mapped=None,
    ):
        self.latents = latents  # (N, C, H, W) float32 in memory, or None for a lazy moments folder / mapped shards
        # safetensors shards mapped from disk (one np.memmap of rows each): the page cache, not each process, holds them
        self.mapped = mapped
        self.starts = np.cumsum([0] + [len(m) for m in mapped]) if mapped is not None else None
        self.labels = torch.as_tensor(labels).long().reshape(-1) if labels is not None else None
        # moments .npy paths relative to root (lazy REPA layout), as one bytes array: DataLoader workers share it
        # without touching a million Python strings (whose reference counts would copy the pages into each worker)
        self.files = _bytes_array(files) if files is not None else None
        self.root = root
        self.posterior = posterior  # rows hold cat(mean, std) along channels: sample mean + std * eps
        self.scale = scale
        self.bias = bias  # z = (mean + std * eps) * scale + bias (REPA: scale 0.18215, bias 0)
        self.name = name

    def file(self, i: int) -> Path:
        """Path of the i-th moments file (lazy REPA layout)."""
        return self.root / self.files[int(i)].decode()

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0]) if self.labels is not None else 0

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Stored rows (latents or moments) for the given indices."""
        if self.latents is not None:
            return self.latents[idx]
        if self.mapped is not None:
            i = np.asarray(idx, dtype=np.int64).reshape(-1)
            part = np.searchsorted(self.starts, i, side="right") - 1
            rows = [self.mapped[a][b] for a, b in zip(part.tolist(), (i - self.starts[part]).tolist())]
            return torch.from_numpy(np.stack(rows)).float()
        return torch.stack([torch.from_numpy(np.load(self.file(i))).float() for i in idx])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one training latent (after posterior sampling)."""
        shape = tuple(self._rows(torch.tensor([0])).shape[1:])
        return (shape[0] // 2, *shape[1:]) if self.posterior else shape

    def get(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch: x0 (B, C, H, W) float32 and labels (B,)."""
        rows = self._rows(idx)
        if self.posterior:
            mean, std = rows.chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=gen)
            rows = (mean + std * eps) * self.scale + self.bias  # REPA's sample_posterior
        if not torch.isfinite(rows).all():
            raise FlowmapError(
                f"{self.name} has non-finite latents among rows {idx.tolist()[:8]}; re-encode the dataset."
            )
        return rows.float(), self.labels[idx]


def _bytes_array(files) -> np.ndarray:
    """Paths as one numpy bytes array (UTF-8)."""
    try:
        return np.array(files, dtype=np.bytes_)  # ASCII names (REPA's): converted in C
    except UnicodeEncodeError:
        return np.array([str(f).encode() for f in files], dtype=np.bytes_)


# ---------------------------------------------------------------------------------------------------- readers
SAFETENSORS_NUMPY = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _map_safetensors(path: Path) -> dict:
    """The arrays of a safetensors file mapped from disk (np.memmap; nothing read yet), from its documented layout:
    an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ValueError("bad header length")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_NUMPY.get(info["dtype"])
        if dtype is None:
            raise TypeError(f"dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * np.dtype(dtype).itemsize or 8 + n + end > size or begin < 0:
            raise ValueError(f"{name}: offsets do not fit the file")
        if count == 0 or not shape:  # empty or 0-d: read it (np.memmap cannot map 0 bytes)
            with open(path, "rb") as f:
                f.seek(8 + n + begin)
                out[name] = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    return out


def _read_shard(path: Path) -> dict:
    """One shard of our own format, safetensors or npz: `labels` (N,) and either `latents` (N, C, H, W) or, for a
    VAE posterior (`flowmap encode` with SD-VAE), `moments` (N, 2C, H, W) = cat(mean, std) with `scale` and `bias`.
    float32 safetensors rows stay on disk (mapped); everything else is read into memory."""
    try:
        if path.suffix == ".safetensors":
            try:
                d = _map_safetensors(path)
            except TypeError:  # a dtype numpy cannot map (bf16): read it whole
                from safetensors.torch import load_file

                d = load_file(str(path))
        else:
            with np.load(path, allow_pickle=False) as z:
                d = {k: torch.from_numpy(np.asarray(z[k])) for k in z.files}
    except Exception as e:  # corrupt archives raise many types
        raise FlowmapError(
            f"{path} is not a readable dataset shard ({type(e).__name__}: {e}); re-run `flowmap encode`."
        ) from None
    rows = "moments" if "moments" in d else "latents"
    if rows not in d or "labels" not in d:
        raise FlowmapError(
            f"{path} lacks `latents` (or `moments`) and `labels` arrays (has {sorted(d)}); write shards with `flowmap encode`."
        )
    x = d[rows]
    if isinstance(x, np.ndarray) and (x.dtype != np.float32 or not isinstance(x, np.memmap)):
        x = torch.from_numpy(np.array(x))
    x = x.float() if isinstance(x, torch.Tensor) else x  # a float32 memmap stays mapped
    y = torch.as_tensor(np.array(d["labels"])).long().reshape(-1)
    if x.ndim != 4 or len(x) != len(y) or (rows == "moments" and x.shape[1] % 2):
        raise FlowmapError(
            f"{path}: {rows} must be (N, C, H, W) with one label per row, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    scale = float(np.asarray(d["scale"]).reshape(-1)[0]) if "scale" in d else 1.0
    bias = float(np.asarray(d["bias"]).reshape(-1)[0]) if "bias" in d else 0.0
    return {"rows": x, "labels": y, "posterior": rows == "moments", "scale": scale, "bias": bias}


def read_shards(path: Path) -> LatentDataset:
    """A shard file or a directory of shards (sorted by name): float32 safetensors shards mapped from disk, others
    concatenated in memory."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in SHARD_EXTS)
    parts = [_read_shard(f) for f in files]
    if not parts:
        raise FlowmapError(
            f"{path} holds no .safetensors or .npz shards; point `data` at a dataset written by `flowmap encode`."
        )
    kind = {(p["posterior"], p["scale"], p["bias"], tuple(p["rows"].shape[1:])) for p in parts}
    if len(kind) > 1:
        raise FlowmapError(
            f"the shards in {path} disagree on their layout (latents or moments, scale, bias, shape); re-run `flowmap encode` into a fresh `out`."
        )
    first = parts[0]
    labels = torch.cat([p["labels"] for p in parts])
    kw = {"posterior": first["posterior"], "scale": first["scale"], "bias": first["bias"], "name": str(path)}
    if all(isinstance(p["rows"], np.memmap) for p in parts):  # ImageNet's 42 GB of moments stay on disk
        return LatentDataset(labels=labels, mapped=[p["rows"] for p in parts], **kw)
    rows = [torch.from_numpy(np.array(p["rows"])) if isinstance(p["rows"], np.ndarray) else p["rows"] for p in parts]
    return LatentDataset(torch.cat(rows), labels, **kw)


def read_moments_folder(path: Path) -> LatentDataset:
    """REPA / DMF preprocessing output: `vae-sd/*.npy` moments [2C, L, L] = cat(mean, std) and REPA's dataset.json labels."""
    root = path / "vae-sd" if (path / "vae-sd").is_dir() else path
    meta = root / "dataset.json"
    try:
        labels = json.loads(meta.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FlowmapError(
            f'{meta} is missing or not REPA\'s dataset.json ({{"labels": [[file, label], ...]}}): {e}.'
        ) from None
    if labels is None:
        raise FlowmapError(
            f"{meta} has no labels; the fine-tuner needs class labels (regenerate it with REPA's dataset_tool)."
        )
    try:
        table = dict(labels)  # [[file, label], ...]; one pass in C for ImageNet's 1.28M entries
        if any("\\" in f for f in table):  # written on Windows
            table = {f.replace("\\", "/"): c for f, c in table.items()}
    except (TypeError, ValueError, AttributeError):
        raise FlowmapError(f'{meta} is not REPA\'s dataset.json ({{"labels": [[file, label], ...]}}).') from None
    files = list_npy(root)
    ys = list(map(table.get, files))
    if None in ys:
        missing = [f for f, y in zip(files, ys) if y is None]
        raise FlowmapError(
            f"{len(missing)} moments files have no label in {meta} (e.g. {missing[0]}); regenerate dataset.json."
        )
    try:
        ys = np.asarray(ys, dtype=np.int64)
    except (TypeError, ValueError):
        raise FlowmapError(
            f"{meta} has labels that are not integers; regenerate it with REPA's dataset_tool."
        ) from None
    return LatentDataset(files=files, root=root, labels=ys, posterior=True, scale=SD_VAE_SCALE, name=str(path))


def list_npy(root: Path) -> list[str]:
    """Every `*.npy` below `root` as sorted posix paths relative to it, listed once with os.scandir.

    One pass of directory reads (no stat per file, no Path objects): ImageNet's 1.28M moments files are listed in
    seconds (benchmarks/results/moments_listing.json), once per run, never per step.
    """
    out: list[str] = []
    stack = [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):  # as rglob: links to directories are not entered
                    stack.append((prefix + e.name + "/", e.path))
                elif e.name.endswith(".npy"):
                    out.append(prefix + e.name)
    out.sort()
    return out


def list_image_folder(path: Path) -> tuple[list[Path], list[int], list[str]]:
    """Images in class sub-folders (sorted folder names -> labels 0..K-1)."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((path / c).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTS:
                files.append(f)
                labels.append(k)
    return files, labels, classes


def adm_center_crop(img, size: int):
    """ADM's centre crop (the preprocessing of ADM's ImageNet loader, which REPA's and DMF's dataset tools use).

    While the short side is at least twice `size`, halve the image with a box filter; then resize it bicubically so
    that the short side is `size` (the long side rounded), and cut the centred size x size square.
    """
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_images(files: list[Path], size: int, channels: int) -> torch.Tensor:
    """Read, centre-crop (ADM's crop, `adm_center_crop`) and scale images to (N, C, size, size) in [-1, 1].

    Every file goes through flowmap_convert.images (palette, 16-bit, alpha, CMYK; damaged files and bombs are one
    line), and the result's size is checked against the memory first (flowmap_convert.budget)."""
    from PIL import Image

    check(  # the float32 result, plus one image being resized (PIL) and its float copy
        4.0 * len(files) * channels * size * size + 9.0 * channels * size * size,
        f"{len(files):,} images of {size}x{size}x{channels} (latent.image_size {size})",
        "use a model with a smaller image size, or fewer images at a time",
    )
    out = []
    for f in files:
        a = read_image(f, channels)
        img = adm_center_crop(Image.fromarray(a[..., 0] if channels == 1 else a), size)
        a = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
        out.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def encode_images(images: torch.Tensor, latent, device="cpu", batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] -> latents with the model's latent encoder (identity for pixel models)."""
    enc = get_decoder(latent, device)
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            outs.append(enc.encode(images[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(outs) if outs else images


def read_image_folder(path: Path, latent, device="cpu") -> LatentDataset:
    """Class sub-folders of images, encoded now (once, in memory) with the model's latent encoder."""
    files, labels, _ = list_image_folder(path)
    if not files:
        raise FlowmapError(f"{path} has no images in class sub-folders (e.g. {path}/cat/001.png); check the path.")
    images = load_images(files, latent.image_size, latent.image_channels)
    return LatentDataset(encode_images(images, latent, device), labels, name=str(path))


def builtin_data(name: str, latent, device="cpu") -> LatentDataset:
    """`builtin:digits` (pixels in [-1, 1]; encoded when the model lives in a latent space)."""
    images, labels = builtin_dataset(name)
    x = images if latent is None or latent.kind == "identity" else encode_images(images, latent, device)
    return LatentDataset(x.float(), labels, name=name)


def load_dataset(spec, latent=None, device="cpu") -> LatentDataset:
    """Resolve --data: builtin:NAME, a shard file/dir, a REPA moments folder or an image folder."""
    if isinstance(spec, LatentDataset):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:  # (latents, labels) tensors from Python
        return LatentDataset(torch.as_tensor(spec[0]).float(), spec[1], name="tensors")
    spec = str(spec)
    if spec.startswith("builtin:"):
        return builtin_data(spec, latent, device)
    path = Path(spec)
    if not path.exists():
        raise FlowmapError(
            f"dataset {spec!r} does not exist; pass builtin:digits, a `flowmap encode` output, a REPA vae-sd folder or an image folder."
        )
    if path.is_file():
        return read_shards(path)
    if (path / "vae-sd").is_dir() or (path / "dataset.json").is_file():
        return read_moments_folder(path)
    if any(p.suffix in SHARD_EXTS for p in path.iterdir()):
        return read_shards(path)
    if latent is None:
        raise FlowmapError(
            f"{path} looks like an image folder; encoding it needs the model's latent space (pass the model too)."
        )
    return read_image_folder(path, latent, device)


def check_dataset(ds: LatentDataset, cfg) -> None:
    """Reject data the model cannot train on, before any step runs."""
    if len(ds) == 0:
        raise FlowmapError(f"dataset {ds.name} is empty; check the path or the class sub-folders.")
    want = (cfg.in_channels, cfg.input_size, cfg.input_size)
    got = ds.sample_shape
    if tuple(got) != want:
        extra = " (REPA moments hold 2C channels: mean and std)" if ds.posterior else ""
        raise FlowmapError(
            f"dataset {ds.name} has samples of shape {tuple(got)}{extra} but the model takes {want}; encode the data for this model's latent space."
        )
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or hi >= cfg.num_classes:
        raise FlowmapError(
            f"dataset {ds.name} has labels {lo}..{hi} but the model knows classes 0..{cfg.num_classes - 1}; fix the labels or use a model with more classes."
        )
    if ds.latents is not None:
        bad = (~torch.isfinite(ds.latents.reshape(len(ds.latents), -1))).any(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).reshape(-1)[:5].tolist()
            raise FlowmapError(f"dataset {ds.name} has NaN or infinite latents (rows {rows}); re-encode those samples.")
    elif ds.mapped is not None:  # the rest are checked when drawn (LatentDataset.get)
        head = ds._rows(torch.arange(min(len(ds), MOMENT_CHECK_LIMIT)))
        if not torch.isfinite(head).all():
            raise FlowmapError(f"dataset {ds.name} has NaN or infinite latents; re-encode it with `flowmap encode`.")
    else:
        for i in range(min(len(ds.files), MOMENT_CHECK_LIMIT)):
            if not np.isfinite(np.load(ds.file(i))).all():
                raise FlowmapError(f"{ds.file(i)} holds NaN or infinite moments; re-run the VAE preprocessing for it.")


def global_shard(micro: int, world: int, rank: int, grad_accum: int) -> int:
    """Index of one process's micro-batch among all micro-batches of the run (optimizer step-major).

    Optimizer step s takes shards s * world * grad_accum ... (s + 1) * world * grad_accum - 1; rank k holds
    grad_accum consecutive ones. The data and the random numbers of a micro-batch depend on this index alone,
    so P processes x A accumulation steps train on exactly the numbers of 1 process x P*A steps (same global batch).
    """
    step, a = divmod(micro, grad_accum)
    return (step * world + rank) * grad_accum + a


class EpochSampler:
    """Micro-batches from seeded per-epoch permutations; shard i covers positions i * batch ... (i + 1) * batch - 1."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def perm(self, epoch: int) -> torch.Tensor:
        """The permutation of one epoch (a pure function of seed and epoch)."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return self._perm

    def indices(self, shard: int) -> torch.Tensor:
        """The sample indices of one global shard (see global_shard)."""
        start = shard * self.batch_size
        return torch.stack([self.perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)])

    def state(self, shards: int) -> dict:
        """What a checkpoint records about the data position after `shards` global shards."""
        pos = shards * self.batch_size
        return {"seed": self.seed, "position": pos, "epoch": pos // self.n, "n": self.n}
