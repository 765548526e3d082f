"""Checkpoints and random state: exact resume, checksums, the last two kept, nothing half-written.

A checkpoint is one torch.save file holding the run's state and a sha256 over all of it (every tensor's bytes and
every other value, walked in key order), so a flipped byte anywhere is caught at --resume instead of training on
garbage. Each save writes a claimed temporary sibling (flowmap_convert.outputs.temp_sibling: a save killed half-way
is removed by the next one), fsyncs it, links the current latest.pt as previous.pt, then moves
the new file over latest.pt: the two newest checkpoints stay on disk, and a crash or a full disk at any moment
leaves only complete files behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import FlowmapError
from ..outputs import clean_stale, temp_sibling, unclaim, write_error

CKPT_FORMAT = "flowmap-finetune/2"  # /2: a sha256 over the whole state (format /1 carried none)
LATEST, PREVIOUS = "latest.pt", "previous.pt"


# ---------------------------------------------------------------------------------------------------- random state
def step_generator(seed: int, shard: int, rollbacks: int) -> torch.Generator:
    """The generator of one micro-batch: a pure function of its global shard index (exact resume; the same numbers
    for the same global batch whatever the process count, see data.global_shard)."""
    key = (seed * 1_000_003 + shard * 104_729 + rollbacks * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def rng_state() -> dict:
    """Global RNG states (torch, numpy, python) in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------------- checksums
def state_digest(state, after=None) -> str:
    """sha256 over a nested state: keys in order, tensors by dtype, shape and bytes, other values by repr;
    `after(tensor)` is called once each tensor is hashed (read() drops its mapped pages there)."""
    h = hashlib.sha256()

    def walk(v) -> None:
        if isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                walk(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                walk(x)
            h.update(b"]")
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # hashed in place, not copied
            if after is not None:
                after(v)
        else:
            h.update(repr(v).encode())

    walk(state)
    return h.hexdigest()


def disk_error(e: OSError, path: Path) -> FlowmapError:
    """A one-line user error for a failed checkpoint write: io's sentence plus how to continue."""
    return write_error(path, e, then=", then rerun with `resume`")


# ---------------------------------------------------------------------------------------------------- mapped pages
# A resumed run reads its checkpoint through a private file mapping (torch.load(mmap=True)). Every page it reads
# stays resident in the process, as file-backed memory, until the mapping goes away, so a checkpoint of 16 bytes per
# parameter would add 16 bytes per parameter to the resident set on top of the run's own states. Once a tensor has
# been hashed or copied into the run, its pages are handed back with madvise(MADV_DONTNEED): the mapping is only ever
# read, so a later read of the same page simply faults it in from the file again (docs/memory.md).
_MADV_DONTNEED = 4  # Linux <sys/mman.h>


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (from /proc/self/maps); [] where there is no such file."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == target:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _drop_pages(t: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Hand back the mapped pages under a tensor read from the checkpoint; only pages inside `ranges` (the file's
    own mapping, never memory the process allocated) are touched, and nothing happens off Linux."""
    madvise = _madvise()
    if madvise is None or not ranges or t.device.type != "cpu":
        return
    st = t.untyped_storage()
    if st.nbytes() == 0:
        return
    page = mmap.PAGESIZE
    start, end = st.data_ptr(), st.data_ptr() + st.nbytes()
    for lo, hi in ranges:
        a, b = max(lo, start // page * page), min(hi, -(-end // page) * page)
        if a < b:
            madvise(a, b - a, _MADV_DONTNEED)


def release(tree, path: Path) -> None:
    """Drop the mapped pages of every tensor in `tree` (a part of a checkpoint read from `path`) once the run has
    copied it."""
    ranges = mapped_ranges(path)
    for t in _tensors(tree):
        _drop_pages(t, ranges)


def load_into(module: torch.nn.Module, saved: dict, path: Path) -> None:
    """`module.load_state_dict(saved)` that writes only the tensors whose values changed, then drops the mapped
    pages of `saved`. A frozen weight equal to the saved one is left alone: when it is still the source's memory-mapped
    file (an export loaded lazily), a write would turn it into an anonymous copy of itself (docs/memory.md)."""
    own = module.state_dict(keep_vars=True)
    if set(own) != set(saved) or any(own[k].shape != saved[k].shape for k in own):
        module.load_state_dict(saved)  # strict: its error names the missing, unexpected or misshapen keys
    else:
        with torch.no_grad():
            for k, t in own.items():
                v = saved[k]
                if t.dtype == v.dtype and t.device == v.device and torch.equal(t, v):
                    continue
                t.copy_(v)
    release(saved, path)


def to_memory(tree, path: Path):
    """`tree` with each tensor copied into the process's own memory and its mapped pages dropped, one tensor at a
    time (the optimizer adopts its state tensors as they are, so they must not point into the mapping)."""
    ranges = mapped_ranges(path)

    def copy(v):
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        if isinstance(v, torch.Tensor):
            out = v.clone()
            _drop_pages(v, ranges)
            return out
        return v

    return copy(tree)


def _tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


# ---------------------------------------------------------------------------------------------------- save / load
def save(state: dict, directory: Path) -> Path:
    """Write state (plus its sha256) as directory/latest.pt, keeping the one before as previous.pt."""
    directory = Path(directory)
    path = directory / LATEST
    tmp = keep = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in (LATEST, PREVIOUS):  # a save killed half-way left these (claimed, dead pid): removed now
            clean_stale(directory, name)
        for name in (LATEST, PREVIOUS):
            if (directory / name).is_symlink():
                raise FlowmapError(
                    f"{directory / name} is a symbolic link; flowmap never writes through one, remove it."
                )
        tmp, keep = temp_sibling(path), temp_sibling(directory / PREVIOUS)
        with open(tmp, "xb") as f:
            try:
                torch.save({**state, "sha256": state_digest(state)}, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write (disk full, size limit) this way
                if "inline_container" not in str(e) and "write" not in str(e).lower():
                    raise
                raise OSError(errno.ENOSPC, "the write stopped: disk full, or a file-size or quota limit") from None
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # previous.pt <- latest.pt by a second link: latest.pt exists at every moment
            try:
                os.link(path, keep)
            except OSError:
                shutil.copy2(path, keep)
            os.replace(keep, directory / PREVIOUS)
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(e, path) from None
    finally:
        for t in (tmp, keep):
            if t is not None:
                t.unlink(missing_ok=True)
                unclaim(t)
    return path


def read(path: Path) -> dict:
    """Load and verify one checkpoint file; FlowmapError (one line) when it is missing, unreadable or corrupted."""
    try:
        # mmap: the tensors stay on disk until copied into the run (resume holds no second full copy); each page
        # read is dropped from the process again once used (release), so the mapping never counts as a second copy
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise FlowmapError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(s, dict) or s.get("format") != CKPT_FORMAT:
        raise FlowmapError(f"{path} is not a flowmap {CKPT_FORMAT} fine-tuning checkpoint")
    digest = s.pop("sha256", None)
    ranges = mapped_ranges(path)
    if digest != state_digest(s, after=lambda t: _drop_pages(t, ranges)):
        raise FlowmapError(f"{path} is corrupted (its sha256 does not match its contents)")
    return s


def load_verified(directory: Path) -> dict:
    """The newest checkpoint in `directory`, verified; a corrupted one is refused naming the previous good one."""
    directory = Path(directory)
    path, prev = directory / LATEST, directory / PREVIOUS
    try:
        return read(path)
    except FileNotFoundError:
        if prev.exists():
            raise FlowmapError(
                f"no checkpoint at {path}, but {prev} is kept{_step_of(prev)}; move it to {path} to resume from it."
            ) from None
        raise FlowmapError(f"no checkpoint at {path} to resume from; drop `resume` to start a new run.") from None
    except FlowmapError as e:
        if prev.exists():
            try:
                ok = read(prev)
            except (FlowmapError, FileNotFoundError):
                ok = None
            if ok is not None:
                raise FlowmapError(
                    f"{e}; the previous checkpoint {prev} (step {ok['step']}) verifies: move it to {path} to resume from it."
                ) from None
        raise FlowmapError(f"{e}; no good checkpoint is kept, start a new `out`.") from None


def _step_of(path: Path) -> str:
    """' (step N, verified)' for a readable checkpoint, else ''."""
    try:
        return f" (step {read(path)['step']}, verified)"
    except (FlowmapError, FileNotFoundError):
        return ""


def any_checkpoint(directory: Path) -> Path | None:
    """The checkpoint file a run directory holds (latest, else previous), or None."""
    for name in (LATEST, PREVIOUS):
        if (Path(directory) / name).exists():
            return Path(directory) / name
    return None
