"""Checks for numbers a user passes: finite, in range, before any work starts (one FlowmapError each).

Every command validates its numeric options with these helpers before it loads a model, downloads a file or
creates an output directory, so a bad value costs nothing and leaves nothing behind.
"""

from __future__ import annotations

import math

from .errors import FlowmapError

INT64_MAX = 2**63 - 1


def _bound_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    """Human text for the allowed range, e.g. 'in (0, 1]' or '>= 0'."""
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def finite_float(
    name: str,
    value,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """`value` as a float, finite and inside [lo, hi] (ends open when asked); a one-line error naming `name`."""
    if isinstance(value, bool):
        raise FlowmapError(f"{name} must be a number, got {value!r}.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FlowmapError(f"{name} must be a number, got {value!r}.") from None
    rng = _bound_text(lo, hi, lo_open, hi_open)
    if not math.isfinite(x):
        raise FlowmapError(f"{name} must be a finite number {rng}, got {value!r}.")
    too_low = lo is not None and (x <= lo if lo_open else x < lo)
    too_high = hi is not None and (x >= hi if hi_open else x > hi)
    if too_low or too_high:
        raise FlowmapError(f"{name} must be {rng}, got {value!r}.")
    return x


def int_in_range(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int inside [lo, hi]; a one-line error naming `name` (bools and floats with a fraction refused)."""
    if isinstance(value, bool):
        raise FlowmapError(f"{name} must be an integer, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise FlowmapError(f"{name} must be an integer, got {value!r}.")
        value = int(value)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise FlowmapError(f"{name} must be an integer, got {value!r}.") from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        if lo is not None and hi is not None:
            rng = f"in [{lo}, {hi}]"
        else:
            rng = f">= {lo}" if lo is not None else f"<= {hi}"
        raise FlowmapError(f"{name} must be an integer {rng}, got {value!r}.")
    return n


def seed(name: str, value) -> int:
    """A random seed: an integer in [0, 2^63 - 1] (what torch.Generator.manual_seed accepts without wrapping)."""
    return int_in_range(name, value, 0, INT64_MAX)


def interval(name: str, lo, hi, lo_bound: float = 0.0, hi_bound: float = 1.0) -> tuple[float, float]:
    """A closed interval [lo, hi] inside [lo_bound, hi_bound] with lo <= hi."""
    a = finite_float(f"{name} start", lo, lo_bound, hi_bound)
    b = finite_float(f"{name} end", hi, lo_bound, hi_bound)
    if a > b:
        raise FlowmapError(f"{name} must have start <= end, got [{lo}, {hi}].")
    return a, b
