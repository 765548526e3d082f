"""Small PIL line plots with readable axes (used by search.png and eval.png; no matplotlib dependency).

Log axes get ticks on the 1-2-5 sequence written plainly (0.5, 1, 2, 5, 10, 20, ...), never 729 / 171 / 40.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .outputs import atomic_file

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


def tick_label(v: float) -> str:
    """Plain text for a tick value: 0.05, 2, 40, 1000, 2e+05 only beyond a million."""
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.6g}"


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks inside [lo, hi] (lo > 0); at most ~8, thinning to 1-10 decades when the range is wide."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10**k for k in range(k0, k1 + 1) for m in mults if lo <= m * 10**k <= hi]
        if len(ticks) <= 8:
            break
    if len(ticks) > 8:
        step = math.ceil(len(ticks) / 8)
        ticks = ticks[::step]
    return ticks or [lo, hi]


def linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round ticks (steps of 1, 2 or 5 times a power of ten) inside [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


@dataclass
class Series:
    """One line: points (x, y) with optional (lo, hi) error bars and a ringed point."""

    label: str
    points: list[tuple[float, float]]
    errors: list[tuple[float, float] | None] = field(default_factory=list)
    ring_x: float | None = None


def draw_panel(g, font, box, series: list[Series], title: str, xlabel: str, xs: list[float], log: bool | None = None):
    """Draw one panel in box (left, top, right, bottom); log=None picks a log y axis when y spans > 10x."""
    left, top, right, bottom = box
    ys = [y for s in series for _, y in s.points] + [v for s in series for e in s.errors if e for v in e]
    ys = [y for y in ys if y is not None and math.isfinite(y)] or [0.0, 1.0]
    lo, hi = min(ys), max(ys)
    if log is None:
        log = lo > 0 and hi / lo > 10
    f = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    ylo, yhi = f(lo), f(hi)
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - (0.5 if log else max(abs(ylo) * 0.1, 1e-3)), yhi + (0.5 if log else max(abs(yhi) * 0.1, 1e-3))
    pad = 0.06 * (yhi - ylo)
    ylo, yhi = ylo - pad, yhi + pad
    xlo, xhi = min(xs), max(xs)
    xpad = 0.5 if xhi - xlo >= 1 else 0.5
    xlo, xhi = xlo - xpad, xhi + xpad

    def X(x):
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def Y(v):
        return top + (1 - (f(v) - ylo) / (yhi - ylo)) * (bottom - top)

    g.rectangle([left, top, right, bottom], outline="black")
    ticks = log_ticks(10**ylo, 10**yhi) if log else linear_ticks(ylo, yhi)
    for v in ticks:
        y = Y(v)
        g.line([left - 4, y, left, y], fill="black")
        g.line([left + 1, y, right - 1, y], fill=(230, 230, 230))
        text = tick_label(v)
        g.text((left - 8 - 6 * len(text), y - 6), text, fill="black", font=font)
    for x in xs:
        g.line([X(x), bottom, X(x), bottom + 4], fill="black")
        g.text((X(x) - 3 * len(tick_label(x)), bottom + 6), tick_label(x), fill="black", font=font)
    g.text(((left + right) // 2 - 3 * len(xlabel), bottom + 22), xlabel, fill="black", font=font)
    g.text((left, top - 16), title + (" (log scale)" if log else ""), fill="black", font=font)
    for k, s in enumerate(series):
        col = PALETTE[k % len(PALETTE)]
        pts = sorted((x, y, e) for (x, y), e in zip(s.points, s.errors or [None] * len(s.points)))
        xy = [(X(x), Y(y)) for x, y, _ in pts]
        if len(xy) > 1:
            g.line(xy, fill=col, width=2)
        for x, y, e in pts:
            if e:
                g.line([X(x), Y(e[0]), X(x), Y(e[1])], fill=col, width=1)
                g.line([X(x) - 3, Y(e[0]), X(x) + 3, Y(e[0])], fill=col)
                g.line([X(x) - 3, Y(e[1]), X(x) + 3, Y(e[1])], fill=col)
            g.ellipse([X(x) - 3, Y(y) - 3, X(x) + 3, Y(y) + 3], fill=col)
            if s.ring_x is not None and x == s.ring_x:
                g.ellipse([X(x) - 7, Y(y) - 7, X(x) + 7, Y(y) + 7], outline=col, width=2)
    return log


def save_png(img, path) -> Path:
    """Write a PIL image atomically."""
    path = Path(path)
    with atomic_file(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path
