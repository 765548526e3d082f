"""The shared option checks: finite, in range, one FlowmapError naming the option."""

import math

import pytest

from flowmap_convert.errors import FlowmapError
from flowmap_convert.validate import finite_float, int_in_range, interval, seed


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "abc", None, True])
def test_finite_float_refuses_non_finite_and_non_numbers(bad):
    with pytest.raises(FlowmapError, match="--cfg-scale"):
        finite_float("--cfg-scale", bad, 0.0)


def test_finite_float_bounds_and_open_ends():
    assert finite_float("--x", "0.5", 0, 1) == 0.5
    assert finite_float("--x", 0, 0, 1) == 0.0
    with pytest.raises(FlowmapError, match=r"in \(0, 1\]"):
        finite_float("--x", 0, 0, 1, lo_open=True)
    with pytest.raises(FlowmapError, match=">= 0"):
        finite_float("--x", -1e-300, 0)


def test_int_and_seed_ranges():
    assert int_in_range("--n", 3.0, 1) == 3
    for bad in (0, 2.5, math.nan, "x", False):
        with pytest.raises(FlowmapError, match="--n"):
            int_in_range("--n", bad, 1)
    assert seed("--seed", 2**63 - 1) == 2**63 - 1
    for bad in (2**63, -1, 1e20):
        with pytest.raises(FlowmapError, match="--seed"):
            seed("--seed", bad)


def test_interval_order_and_bounds():
    assert interval("--guidance-interval", 0.1, 0.9) == (0.1, 0.9)
    with pytest.raises(FlowmapError, match="start <= end"):
        interval("--guidance-interval", 0.9, 0.1)
    with pytest.raises(FlowmapError, match="finite"):
        interval("--guidance-interval", math.nan, 0.5)
