"""search.png: the probe against split depth, one line per NFE with bootstrap CI bars and the best depth ringed."""

from __future__ import annotations

from pathlib import Path

from ..plots import PALETTE, Series, draw_panel, save_png


def plot_search(report: dict, path) -> Path:
    """Draw the probe vs depth (log y axis with plain 1-2-5 ticks when it spans more than 10x) with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    metric = report["metric"]
    rows = report["results"]
    W, H = 760, 470
    img = Image.new("RGB", (W, H), "white")
    g = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    series = []
    for n_fe in report["nfe"]:
        pts = sorted((row["depth"], row[metric], row.get(f"{metric}_ci")) for row in rows if row["nfe"] == n_fe)
        series.append(
            Series(
                f"NFE {n_fe} (best {report['best'][str(n_fe)]})",
                [(d, v) for d, v, _ in pts],
                [tuple(c) if c else None for _, _, c in pts],
                ring_x=report["best"][str(n_fe)],
            )
        )
    label = "Frechet distance" if metric == "fd" else "paired MSE"
    g.text((12, 8), f"{label} vs split depth", fill="black", font=font)
    g.text(
        (12, 24),
        f"{report['features']} features, {report['reference']['kind']} reference, {report['num_samples']} samples, "
        f"{int(report['bootstrap']['ci'] * 100)}% bootstrap CI",
        fill=(90, 90, 90),
        font=font,
    )
    draw_panel(g, font, (80, 64, W - 170, H - 50), series, "", "split depth", list(report["depths"]))
    for k, s in enumerate(series):
        col = PALETTE[k % len(PALETTE)]
        g.line([W - 158, 74 + 18 * k, W - 138, 74 + 18 * k], fill=col, width=3)
        g.text((W - 132, 68 + 18 * k), s.label, fill="black", font=font)
    return save_png(img, path)
