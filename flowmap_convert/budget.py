"""Memory budgets: sizes read from files and options are multiplied out against the machine before allocating.

A config.json, an .npz header or a command-line option can ask for more memory than the machine has while every
single number stays within its plausible range (input_size 4096 with patch_size 1 is a 16.7M-token position
table; a 1 KB .npz may declare a 175 PiB array). `check` compares such a product with the memory this process
may use (`machine_memory`: physical memory, or the cgroup limit when lower; FLOWMAP_MEMORY_GB overrides it) and
refuses in one line before anything is allocated.
"""

from __future__ import annotations

import math
import os

from .errors import FlowmapError

GIB = 2**30


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def machine_memory() -> int:
    """Bytes of memory this process may use: FLOWMAP_MEMORY_GB when set, else min(physical, cgroup limit)."""
    env = os.environ.get("FLOWMAP_MEMORY_GB", "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = float("nan")
        if not (math.isfinite(gb) and 0 < gb <= 2**40):
            raise FlowmapError(f"FLOWMAP_MEMORY_GB={env!r} is not a number of gigabytes in (0, 2^40]; fix or unset it.")
        return int(gb * 1e9)
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 2**62
    limit = _cgroup_limit()
    return min(phys, limit) if limit else phys


def fmt(n: float) -> str:
    """Bytes as a short human figure (GiB / TiB / PiB)."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def check(nbytes: float, what: str, fix: str) -> None:
    """One FlowmapError when `nbytes` (what: e.g. "the position table of 16,777,216 tokens") exceeds the memory."""
    have = machine_memory()
    if not math.isfinite(nbytes) or nbytes > have:
        raise FlowmapError(f"{what} needs {fmt(nbytes)}, more than the {fmt(have)} of memory here; {fix}.")


def model_bytes(config) -> float:
    """A lower bound of the memory a ModelConfig's model takes to build (fp32 weights + the float64 sincos table)."""
    tokens = (config.input_size // config.patch_size) ** 2
    h = config.hidden_size
    blocks = config.num_blocks * (4 + 2 * config.mlp_ratio + 6) * h * h  # attention, MLP, adaLN modulation
    embed = config.class_embed_rows * h + config.in_channels * config.patch_size**2 * h * 2
    return 4.0 * (blocks + embed) + 8.0 * tokens * h


def check_model(config, where: str = "config.json") -> None:
    """Refuse a config whose model alone would not fit in memory (before numpy builds its position table)."""
    tokens = (config.input_size // config.patch_size) ** 2
    check(
        model_bytes(config),
        f"{where}: the model it describes ({tokens:,} tokens of width {config.hidden_size}, {config.num_blocks} blocks)",
        "the file is damaged or the model is too large for this machine",
    )


def check_batch(config, batch: int, what: str = "a batch", factor: float = 16.0) -> None:
    """Refuse a batch whose activations alone (batch x tokens x width x blocks x `factor` floats) cannot fit."""
    tokens = (config.input_size // config.patch_size) ** 2
    need = 4.0 * batch * tokens * config.hidden_size * max(1, config.num_blocks) * factor
    check(need, f"{what} of {batch:,} samples ({tokens:,} tokens of width {config.hidden_size})", "lower `batch_size`")


def check_array(shape, itemsize: int, what: str, fix: str) -> None:
    """Refuse an array (from a file header) whose size exceeds the memory."""
    n = 1
    for d in shape:
        n *= int(d)
    check(float(n) * itemsize, what, fix)


def check_npz(path, what: str = "") -> dict:
    """Read every array header of an .npz (or .npy) without loading the data: {name: (shape, dtype)}.

    One FlowmapError, before any allocation, for a file that is not an .npz / .npy, an object (pickled) array, or
    a header declaring more bytes than the file holds or than the memory here (a 1 KB file declaring 175 PiB).
    """
    import zipfile
    from pathlib import Path

    import numpy as np

    path = Path(path)
    label = what or str(path)

    def header(f, name, stored):
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError, EOFError) as e:
            raise FlowmapError(f"cannot read {label}: array {name} has a damaged header ({e}).") from None
        if dtype.hasobject:
            raise FlowmapError(
                f"{label}: array {name} holds Python objects ({dtype}); flowmap reads only numeric arrays "
                "(re-save it with numeric dtypes)."
            )
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = float(n) * dtype.itemsize
        if nbytes > stored:
            raise FlowmapError(
                f"{label}: array {name} declares {fmt(nbytes)} ({shape} {dtype}) but the file holds {fmt(stored)}; "
                "the file is damaged."
            )
        check(nbytes, f"{label}: array {name} {shape}", "use a smaller file")
        return tuple(int(d) for d in shape), dtype

    out = {}
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                out["arr_0"] = header(f, "arr_0", path.stat().st_size)
            return out
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                with zf.open(info) as f:
                    out[name] = header(f, name, info.file_size)
    except FlowmapError:
        raise
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise FlowmapError(f"cannot read {label} as {'.npy' if path.suffix == '.npy' else '.npz'} ({e}).") from None
    return out
