"""The shared progress reporter (plain lines when piped) and the thread / device rules."""

import io

import pytest
import torch

from flowmap_convert.errors import FlowmapError
from flowmap_convert.progress import Progress, format_seconds
from flowmap_convert.runtime import choose_threads, resolve_device, set_threads


def test_piped_progress_prints_total_rate_and_eta_lines():
    buf = io.StringIO()  # not a terminal: plain lines
    with Progress(10, "sample", unit="images", stream=buf, every=0.0) as p:
        for _ in range(10):
            p.advance(1, loss=0.5)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 10  # nine interim lines (every=0) plus the final one
    assert lines[-1].startswith("sample: 10/10 images (100%)")
    assert "images/s" in lines[0] and "ETA" in lines[0] and "loss 0.5" in lines[0]


def test_progress_quiet_between_intervals_and_off_mode():
    buf = io.StringIO()
    with Progress(5, "x", stream=buf, every=3600) as p:
        p.advance(2)
    assert buf.getvalue().count("\n") == 1  # only the closing line
    off = io.StringIO()
    with Progress(5, "x", stream=off, mode="off") as p:
        p.advance(5)
    assert off.getvalue() == ""


def test_format_seconds():
    assert format_seconds(3725) == "1:02:05"
    assert format_seconds(float("inf")) == "-:--:--"


def test_thread_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("flowmap_convert.runtime.available_cores", lambda: 2)
    assert choose_threads()[0] == 1
    monkeypatch.setattr("flowmap_convert.runtime.available_cores", lambda: 32)
    assert choose_threads()[0] == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads() == (3, "OMP_NUM_THREADS")
    assert choose_threads(5) == (5, "--threads")
    with pytest.raises(FlowmapError, match="`threads`"):
        choose_threads(0)
    before = torch.get_num_threads()
    try:
        note = set_threads(2, "cpu")
        assert torch.get_num_threads() == 2 and "CPU threads: 2" in note
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", ["bogus", "meta", "cuda:99"])
def test_resolve_device_refuses_unusable(bad):
    with pytest.raises(FlowmapError, match="`device`"):
        resolve_device(bad)


def test_resolve_device_auto():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
