"""Writing samples to disk: PNG files, grid.png, ADM-style samples.npz and a JSON sidecar, atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_dir
from .sampling import UINT8_FORMULA


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


def write_grid(images: np.ndarray, path: str | Path, upscale: int = 1) -> None:
    """Save a grid PNG, optionally upscaled with nearest-neighbour for tiny images."""
    im = to_pil(make_grid(images))
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)


def write_samples(
    images: np.ndarray, out: str | Path, meta: dict, png: bool = True, npz: bool = False, sources=()
) -> Path:
    """Write an output directory of samples; nothing is left behind if writing fails."""
    with atomic_dir(out, "samples", sources=sources) as tmp:
        if png:
            for i, img in enumerate(images):
                to_pil(img).save(tmp / f"{i:06d}.png")
        side = images.shape[1]
        write_grid(images[:64], tmp / "grid.png", upscale=max(1, 128 // side))
        if npz:
            np.savez(tmp / "samples.npz", arr_0=images)
        meta = {**meta, "uint8_formula": UINT8_FORMULA, "shape": list(images.shape)}
        (tmp / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)
