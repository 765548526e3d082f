"""`make demo`'s comparison: the builtin base model against its flow maps, one labelled grid, one column per class.

    python -m flowmap_convert.demo --out demo-out/compare.png

Rows: the base SiT sampled with 1 Euler step (blurry class averages: a velocity model cannot jump), the same
weights converted at the searched depth with no training (DMF's zero-shot flow map), the fine-tuned 1-step
builtin `builtin:digits-dmf`, and the base with 32 Euler steps as the quality reference. Every row uses the same
noise (sample i's noise depends only on (seed, i)), so a column compares like with like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .api import convert, load
from .config import default_depth
from .errors import FlowmapError
from .outputs import atomic_file
from .sampling import sample


def labelled_grid(rows: list[tuple[str, np.ndarray]], columns: int, cell: int = 48, pad: int = 4) -> Image.Image:
    """Stack uint8 NHWC image sets into one picture: one band per (label, images), `columns` images a line."""
    label_w = 230
    bands = []
    for label, images in rows:
        n = len(images)
        lines = (n + columns - 1) // columns
        h = lines * (cell + pad) + pad
        band = Image.new("L", (label_w + columns * (cell + pad) + pad, h), 255)
        draw = ImageDraw.Draw(band)
        draw.text((6, h // 2 - 6), label, fill=0)
        for i, img in enumerate(images):
            r, c = divmod(i, columns)
            tile = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("L")
            band.paste(
                tile.resize((cell, cell), Image.NEAREST), (label_w + pad + c * (cell + pad), pad + r * (cell + pad))
            )
        bands.append(band)
    header = Image.new("L", (bands[0].width, 18), 255)
    hd = ImageDraw.Draw(header)
    for c in range(columns):
        hd.text((label_w + pad + c * (cell + pad) + cell // 2 - 3, 3), str(c), fill=0)
    out = Image.new("L", (bands[0].width, header.height + sum(b.height for b in bands)), 255)
    out.paste(header, (0, 0))
    y = header.height
    for b in bands:
        out.paste(b, (0, y))
        y += b.height
    return out


def compare(out: Path, per_class: int = 2, seed: int = 0) -> Path:
    """Sample the four rows and write the labelled grid to `out`."""
    classes = list(range(10))
    n = 10 * per_class
    base = load("builtin:digits-sit")
    depth = default_depth(base.config)
    rows = [("base SiT, 1 step", sample(base, nfe=1, classes=classes, num_samples=n, seed=seed))]
    rows.append(
        (
            f"converted, depth {depth}, 1 step",
            sample(convert("builtin:digits-sit", depth=depth), nfe=1, classes=classes, num_samples=n, seed=seed),
        )
    )
    try:
        dmf = load("builtin:digits-dmf")
        rows.append(("digits-dmf (fine-tuned), 1 step", sample(dmf, nfe=1, classes=classes, num_samples=n, seed=seed)))
    except FlowmapError:
        pass  # an installation without the fine-tuned builtin still draws the other rows
    rows.append(("base SiT, 32 steps", sample(base, nfe=32, classes=classes, num_samples=n, seed=seed)))
    grid = labelled_grid(rows, columns=10)
    with atomic_file(out, suffix=".png") as tmp:
        grid.save(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: write the comparison grid."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-out/compare.png"), help="PNG to write")
    ap.add_argument("--per-class", type=int, default=2, help="samples per class and row")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (the same noise for every row)")
    a = ap.parse_args(argv)
    if not 1 <= a.per_class <= 20:
        raise SystemExit("error: --per-class must be in [1, 20].")
    print(f"comparison grid: {compare(a.out, a.per_class, a.seed)}")


if __name__ == "__main__":
    main()
