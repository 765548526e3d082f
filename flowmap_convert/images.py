"""The one image reader: every image path flowmap reads (encode, data folders, eval folders) goes through here.

Modes are mapped to 8-bit pixels the way a viewer shows them: palette images through their palette (not as the
palette indices), 16-bit greyscale scaled by 255/65535, LA / RGBA with the alpha dropped, CMYK / YCbCr / 1-bit
converted. An empty, truncated or non-image file, or a decompression bomb, is one FlowmapError naming the file;
so is an image whose pixels alone exceed the memory (flowmap_convert.budget).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .budget import check
from .errors import FlowmapError

GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _fail(path, why: str) -> FlowmapError:
    return FlowmapError(f"cannot read image {path} ({why}); remove it or replace it with a valid image.")


def open_image(path):
    """Open and fully decode an image (PIL), or one FlowmapError naming the file and what is wrong."""
    from PIL import Image

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise _fail(path, "the file is empty")
    except OSError as e:
        raise _fail(path, e.strerror or str(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            check(float(w) * h * 4, f"image {path} ({w}x{h} pixels)", "remove it or pass smaller images")
            img.load()
    except FlowmapError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail(path, "too many pixels: a decompression bomb") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files (OSError, SyntaxError, ValueError...)
        reason = str(e) or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file PIL can read"
        raise _fail(path, reason) from None
    return img


def to_uint8(img, channels: int | None = None) -> np.ndarray:
    """A PIL image as uint8 HxWxC: C = `channels` (1 or 3), or by the image's own mode when None (grey -> 1, else 3;
    a palette image with a grey palette -> 1)."""
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        if channels == 3:
            return np.repeat(grey[..., None], 3, axis=-1)
        return grey[..., None]
    if mode == "P" or mode == "PA":
        rgb = np.asarray(img.convert("RGB"))
        if channels == 1:
            return np.asarray(img.convert("RGB").convert("L"))[..., None]
        if channels is None and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., :1].copy()
        return rgb
    if channels is None:
        channels = 1 if mode in GREY_MODES else 3
    return np.asarray(img.convert("L" if channels == 1 else "RGB")).reshape(img.size[1], img.size[0], channels)


def read_image(path, channels: int | None = None) -> np.ndarray:
    """uint8 HxWxC pixels of one image file (see the module docstring for modes and errors)."""
    return to_uint8(open_image(path), channels)
