"""Safe checkpoint reading: safetensors first, `.pt` through `torch.load(weights_only=True)` with a small allowlist.

A training checkpoint is a dict `{'model', 'ema', 'opt', 'args', ...}` whose `args` is an `argparse.Namespace`
(DiT, SiT, REPA, DMF; docs/checkpoints.md); a released file is a plain state dict. `read_checkpoint` returns both
kinds as a `Checkpoint` holding one state dict (EMA by default), the training args as a plain dict, and what
was chosen. Pickles needing anything beyond tensors, containers, `argparse.Namespace` and numpy scalars are
refused unless the user passes `--trust-pickle`.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FlowmapError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers (DMF's EMA helper strips both)
WEIGHT_CHOICES = ("auto", "ema", "model")
# Lightning checkpoints (MCG-NJU/DDT's LightningModel): ckpt["state_dict"] keys carry the module's name.
LIGHTNING_PREFIXES = {"ema": "ema_denoiser.", "model": "denoiser."}


@dataclass
class Checkpoint:
    """One state dict read from a file, with the training args and which weights were taken."""

    state_dict: dict[str, torch.Tensor]
    weights: str  # "ema", "model", "state_dict" or "plain"
    args: dict[str, Any] = field(default_factory=dict)  # training args (argparse.Namespace -> dict), if any
    path: Path | None = None
    format: str = "pickle"  # "safetensors" or "pickle"
    steps: int | None = None  # training step count when the file records one


def _safe_globals() -> list:
    """The only non-tensor globals a weights-only load may build: argparse args and numpy scalars in them."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    scalar = core.multiarray.scalar
    allowed: list = [argparse.Namespace, np.dtype, scalar, (scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through these classes
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by sniffing the header (8-byte little-endian length followed by a JSON object)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _torch_load(path: Path, weights_only: bool) -> Any:
    """torch.load memory-mapped (read_checkpoint copies only the weights it selects; optimizer state and the other
    weights are never read), or fully read for legacy (pre-zip) files, which cannot be mapped."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=weights_only)


def load_file_object(path: str | Path, trust_pickle: bool = False, pickle_flag: bool = True) -> tuple[Any, str]:
    """Read a checkpoint file into Python objects without running code from it; returns (object, format).

    `pickle_flag`: the calling command has --trust-pickle (otherwise the hint names `flowmap convert`).
    """
    path = Path(path)
    if not path.is_file():
        raise FlowmapError(f"checkpoint file {path} does not exist; check the path or the `filename`.")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FlowmapError(
                f"{path} is not a readable safetensors file ({e}); re-download it (delete the cached copy) or check the file."
            ) from None
    try:
        if trust_pickle:  # explicit opt-in: full pickle, may run code from the file
            return _torch_load(path, weights_only=False), "pickle"
        with torch.serialization.safe_globals(_safe_globals()):
            return _torch_load(path, weights_only=True), "pickle"
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, EOFError... for bad files
        msg = str(e)
        found = re.findall(r"GLOBAL ([\w.]+)", msg)
        if found and ("Unsupported global" in msg or "unsupported GLOBAL" in msg):
            fix = (
                "rerun with `trust_pickle` (it runs code from the file)"
                if pickle_flag
                else f"convert it first with `flowmap convert {path} --trust-pickle --out DIR` (it runs code from the file) and use DIR"
            )
            raise FlowmapError(
                f"{path} is a pickle that needs {found[0]}, which safe loading does not allow; if you trust the file's origin, {fix}."
            ) from None
        if isinstance(e, RuntimeError) and "zip archive" in msg or isinstance(e, (EOFError, zipfile.BadZipFile)):
            raise FlowmapError(
                f"{path} is truncated or corrupted (not a complete PyTorch checkpoint); download it again."
            ) from None
        raise FlowmapError(
            f"{path} is not a PyTorch or safetensors checkpoint ({type(e).__name__}); check that the file is the checkpoint you meant."
        ) from None


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` / `_orig_mod.` wrappers from every key (in any nesting order)."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key in out:
            raise FlowmapError(
                f"key {key!r} appears twice after removing module./_orig_mod. prefixes; the checkpoint mixes wrapped and unwrapped weights."
            )
        out[key] = value
    return out


def _as_state_dict(obj: Any) -> Any:
    """A pickled nn.Module (only reachable with --trust-pickle) becomes its state dict."""
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def _is_state_dict(obj: Any) -> bool:
    """A non-empty flat mapping of string keys to tensors."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _lightning_weights(inner: dict, weights: str, where: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """A Lightning module's state dict holding `ema_denoiser.*` / `denoiser.*` (MCG-NJU/DDT): (weights, used), or None.

    `auto` and `ema` take `ema_denoiser.`, `model` takes `denoiser.`; every other entry (REPA projectors, the
    trainer's feature encoder) is left in the file, unread.
    """
    present = [w for w, pre in LIGHTNING_PREFIXES.items() if any(k.startswith(pre) for k in inner)]
    if not present:
        return None
    used = present[0] if weights == "auto" else (weights if weights in present else None)
    if used is None:
        have = ", ".join(f"{w} ({LIGHTNING_PREFIXES[w]}*)" for w in present)
        raise FlowmapError(
            f"{where} has no {weights!r} weights (its Lightning state_dict has: {have}); pass `weights` {present[0]}."
        )
    pre = LIGHTNING_PREFIXES[used]
    return strip_prefixes({k[len(pre) :]: v for k, v in inner.items() if k.startswith(pre)}), used


def _args_dict(args: Any) -> dict[str, Any]:
    """Training args as a plain dict (Namespace, dict or absent)."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    return {}


def select_weights(
    obj: Any, weights: str = "auto", where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Pick the state dict from a training dict (ema/model) or take a plain one; returns (sd, used, args)."""
    weights = (weights or "auto").lower()
    obj = _as_state_dict(obj)
    if isinstance(obj, dict):
        obj = {k: _as_state_dict(v) for k, v in obj.items()}
    if weights not in WEIGHT_CHOICES:
        raise FlowmapError(f"`weights` {weights!r} is not one of {', '.join(WEIGHT_CHOICES)}; pass ema, model or auto.")
    if _is_state_dict(obj) or isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        lightning = _lightning_weights(obj if _is_state_dict(obj) else obj["state_dict"], weights, where)
        if lightning is not None:
            return *lightning, _args_dict(obj.get("args"))
    if _is_state_dict(obj):
        if weights != "auto":
            raise FlowmapError(
                f"{where} is a plain state dict with no 'ema'/'model' entries; drop `weights` {weights} (or use auto)."
            )
        return strip_prefixes(obj), "plain", {}
    if not isinstance(obj, dict):
        raise FlowmapError(
            f"{where} holds a {type(obj).__name__}, not a state dict; pass a checkpoint of model weights."
        )
    args = _args_dict(obj.get("args"))
    present = [k for k in ("ema", "model", "state_dict") if _is_state_dict(obj.get(k))]
    if weights == "auto":
        used = present[0] if present else None
    else:
        used = weights if weights in present else None
        if used is None:
            raise FlowmapError(
                f"{where} has no {weights!r} weights (it has: {', '.join(present) or 'none'}); pass `weights` {present[0] if present else 'auto'}."
            )
    if used is None:
        keys = ", ".join(sorted(map(str, obj))[:6])
        raise FlowmapError(
            f"{where} is a dict without model weights (top-level keys: {keys}); pass a checkpoint holding a state dict or 'ema'/'model' entries."
        )
    return strip_prefixes(obj[used]), used, args


def read_checkpoint(
    path: str | Path, weights: str = "auto", trust_pickle: bool = False, pickle_flag: bool = True, mapped: bool = False
) -> Checkpoint:
    """Read a checkpoint file safely and select its weights (`--weights auto` = EMA when present).

    The selected weights are copied out of the file mapping, so a model does not change when its file is later
    overwritten in place; `mapped=True` leaves them mapped (no copy), for a caller that exports and exits.
    `pickle_flag`: the calling command has --trust-pickle (otherwise the hint names `flowmap convert`).
    """
    path = Path(path)
    obj, fmt = load_file_object(path, trust_pickle=trust_pickle, pickle_flag=pickle_flag)
    sd, used, args = select_weights(obj, weights, where=str(path))
    if fmt == "pickle" and not mapped:
        sd = {k: v.clone() for k, v in sd.items()}
    steps = obj.get("steps") if isinstance(obj, dict) and isinstance(obj.get("steps"), int) else None
    if steps is None and isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
        steps = obj["global_step"]  # Lightning
    return Checkpoint(state_dict=sd, weights=used, args=args, path=path, format=fmt, steps=steps)
