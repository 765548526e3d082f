"""Where a fine-tuning run's memory goes: weights, gradients, optimizer state, EMA, teacher and activations.

fp32 training with AdamW and an EMA needs 20 bytes per trainable parameter (weights 4, gradient 4, two moments 8,
EMA 4) and 4 per frozen one (weights only: no gradient, optimizer state or EMA). The dry run prints these from the
tensors the run holds, and the activations as the measured peak minus them and the process's runtime
(docs/memory.md).
"""

from __future__ import annotations

import copy
import os
import threading

import torch

BF16_ACTIVATION_FACTOR = 0.5  # bf16 autocast stores most activations in 2 bytes instead of 4 (an estimate)
GPU_BATCH = 64  # the recipe's per-process micro-batch (Recipe.batch_size) for the GPU estimate


def frozen_teacher(model):
    """A frozen copy of the model before any update, sharing every tensor that does not train (no copy of the
    frozen encoder with --train decoder; a full copy only of what the run will change)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad}
    teacher = copy.deepcopy(model, memo=shared)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (a tensor shared twice counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def current_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA bytes allocated, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: no baseline, activations include the runtime
        return 0


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """One memory line of /proc/PID/status in bytes (RssAnon, RssFile, VmHWM, ...); None where there is none."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def anon_bytes(pid: int | str = "self") -> int | None:
    """Anonymous resident bytes of a process (RssAnon): what it allocated, without the file-backed pages of its
    libraries and mapped files that a peak RSS also counts; None where there is no /proc."""
    return status_bytes("RssAnon", pid)


class AnonPeak:
    """The highest anonymous resident memory of a process (and of its children, when `children` is true) while the
    block runs, sampled every `interval` seconds by a thread: a peak that libraries paged in from disk or a mapped
    checkpoint do not inflate (docs/memory.md). `peak` is None where /proc is missing."""

    def __init__(self, pid: int | str = "self", interval: float = 0.005, children: bool = False):
        self.pid, self.interval, self.children = pid, interval, children
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int | None:
        pids = [self.pid]
        if self.children:
            pids += _descendants(self.pid)
        values = [v for v in (anon_bytes(p) for p in pids) if v is not None]
        return sum(values) if values else None

    def _run(self) -> None:
        while True:
            v = self._sample()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _descendants(pid: int | str) -> list[int]:
    """Child processes of `pid`, recursively (from /proc/PID/task/*/children)."""
    pid = os.getpid() if pid == "self" else int(pid)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def optimizer_tensors(opt) -> list:
    """Every tensor of an optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def teacher_bytes(trainer) -> int:
    """Bytes of the teacher's own tensors (those it does not share with the model)."""
    if trainer.teacher is None:
        return 0
    model = trainer.model
    own = {(t.device, t.untyped_storage().data_ptr()) for t in (*model.parameters(), *model.buffers())}
    net = trainer.teacher.__self__  # the teacher is a bound FlowMap.velocity
    return tensor_bytes(
        t for t in (*net.parameters(), *net.buffers()) if (t.device, t.untyped_storage().data_ptr()) not in own
    )


def runtime_bytes(trainer) -> int:
    """Memory in use once the run is built (libraries imported, optimizer created) minus the run's own tensors:
    the interpreter, torch and anything loading left behind; the dry run's "runtime" line."""
    model = trainer.model
    held = tensor_bytes([*model.parameters(), *model.buffers()]) + trainer.ema.nbytes() + teacher_bytes(trainer)
    return max(0, current_bytes(trainer.device) - held)


def breakdown(trainer, peak: int) -> dict:
    """Bytes per part of the run (weights, gradients, optimizer, EMA, teacher, baseline, activations)."""
    model = trainer.model
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in trainer.trainable)  # one fp32 gradient per trainable tensor
    optim = tensor_bytes(optimizer_tensors(trainer.opt))
    ema = trainer.ema.nbytes()
    teacher = teacher_bytes(trainer)
    base = trainer.baseline_bytes
    states = weights + grads + optim + ema + teacher
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "ema": ema,
        "teacher": teacher,
        "baseline": base,
        "activations": max(0, peak - states - base),
        "peak": peak,
    }


def gpu_estimate(parts: dict, batch: int, on_cuda: bool, gpu_batch: int = GPU_BATCH) -> dict:
    """CUDA bytes for `gpu_batch` per process in bf16 autocast from a CPU dry run at `batch`: the fp32 states as
    measured, activations scaled by gpu_batch / batch and BF16_ACTIVATION_FACTOR (master weights stay fp32)."""
    states = sum(parts[k] for k in ("weights", "gradients", "optimizer", "ema", "teacher"))
    per_sample = parts["activations"] / max(1, batch)
    if not on_cuda:
        per_sample *= BF16_ACTIVATION_FACTOR
    return {
        "batch": gpu_batch,
        "bytes": int(states + per_sample * gpu_batch),
        "activation_bytes_per_sample": per_sample,
    }


def format_breakdown(parts: dict, params: dict, batch: int, device: str) -> list[str]:
    """The dry run's memory lines: one per part with bytes per trainable parameter, and on the CPU a GPU estimate."""
    mib = 2**20
    trainable = max(1, params["trainable"])
    lines = []
    for key, label in (
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer", "optimizer"),
        ("ema", "EMA"),
        ("teacher", "teacher"),
        ("baseline", "runtime"),
        ("activations", "activations"),
    ):
        note = "" if key in ("baseline", "activations") else f" ({parts[key] / trainable:.1f} B/trainable param)"
        if key == "baseline":
            note = " (interpreter, libraries, data; measured before the first step)"
        if key == "activations":
            note = f" (peak minus the rest, batch {batch})"
        lines.append(f"  {label:<14}{parts[key] / mib:>10,.0f} MiB{note}")
    cuda = device.startswith("cuda")
    est = gpu_estimate(parts, batch, cuda)
    # the CPU runs math attention, which keeps N x N attention maps that the fused CUDA kernels never store
    where = "measured on CUDA" if cuda else "from this CPU run, bf16; an upper bound: math attention on the CPU"
    lines.append(
        f"  GPU estimate  {est['bytes'] / mib:>10,.0f} MiB at batch {est['batch']} per GPU ({where}; "
        f"{est['activation_bytes_per_sample'] / mib:,.1f} MiB per sample)"
    )
    return lines
