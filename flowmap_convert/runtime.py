"""Where and how wide computation runs: one device default and one CPU thread rule for every command."""

from __future__ import annotations

import os

import torch

from .errors import FlowmapError


def default_device() -> str:
    """CUDA when a GPU is visible, else the CPU (the same default for every command)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> torch.device:
    """`--device` text -> a usable torch.device; one-line error for unknown, absent or unusable devices."""
    name = default_device() if device in (None, "", "auto") else str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise FlowmapError(f"unknown `device` {device!r}; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlowmapError(f"`device` {device} asked for CUDA but no GPU is visible; use `device` cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlowmapError(
                f"`device` {device}: only {torch.cuda.device_count()} GPU(s) are visible; use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise FlowmapError(f"`device` {device} is not available on this machine; use `device` cpu.")
    elif dev.type != "cpu":
        raise FlowmapError(f"`device` {device} is not supported; use cpu, cuda, cuda:N or auto.")
    return dev


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why) for CPU work.

    An explicit request wins, capped at the cores present (`available_cores`; `--threads 100000` or
    OMP_NUM_THREADS=100000 crashed torch). Otherwise: OMP_NUM_THREADS when set; else one thread per two cores on a small
    machine, capped at 8. torch's default (one thread per core) collapses when the cores are shared, as they are
    on CI runners and laptops running other jobs: on 2 shared cores a fine-tune step ran 7-10x slower with 2
    threads than with 1.
    """
    cores = available_cores()
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise FlowmapError(f"`threads` must be an integer >= 1, got {requested!r}.")
        if requested > cores:  # more threads than cores only slows down, and torch crashes on absurd counts
            return cores, f"--threads {requested}, capped at the {cores} cores present"
        return int(requested), "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
            if n >= 1:
                if n > cores:
                    return cores, f"OMP_NUM_THREADS={env}, capped at the {cores} cores present"
                return n, "OMP_NUM_THREADS"
        except ValueError:
            pass
    if cores <= 4:
        return 1, f"{cores} cores, shared-machine default"
    return min(8, cores // 2), f"{cores} cores, half of them"


def set_threads(requested: int | None = None, device: torch.device | str | None = None) -> str | None:
    """Apply the thread rule for CPU work and return a one-line note saying what was chosen (None on a GPU)."""
    if device is not None and torch.device(device).type != "cpu":
        return None
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return f"CPU threads: {n} ({why}; --threads N to change)"
