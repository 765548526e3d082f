"""Exported model directories: config.json (with `flowmap_format`) + model.safetensors + README.md.

`read_model_files` returns (ModelConfig, state dict); building the FlowMap is the model layer's job
(`flowmap_convert.model.read_model_dir`), so this module never imports the model. Where outputs may be written,
and how they are written atomically, is `flowmap_convert.outputs`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .card import model_card
from .config import ModelConfig
from .errors import FlowmapError
from .outputs import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, atomic_dir, current_umask

FORMAT = "flowmap/1"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights under the source family's own key names (`net.` dropped), contiguous, for safetensors."""
    out = {}
    for k, v in model.state_dict().items():
        key = k[len("net.") :] if k.startswith("net.") else k
        out[key] = v.detach().contiguous().cpu()
    return out


def load_canonical_state_dict(model, sd: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Strictly load canonical keys into a FlowMap, reporting a readable key/shape diff on mismatch.

    One pass over the tensors: the model's state dict is built once (not once per key).
    """
    own = model.state_dict()
    target = {(k[len("net.") :] if k.startswith("net.") else k): k for k in own}
    check_keys_and_shapes(sd, {c: own[k].shape for c, k in target.items()}, what)
    model.load_state_dict({target[k]: v for k, v in sd.items()}, strict=True, assign=assign)


def check_keys_and_shapes(sd: dict, expected: dict, what: str) -> None:
    """Raise a FlowmapError listing missing, unexpected and mis-shaped keys (at most a few of each)."""
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    if not (missing or extra or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
            parts.append(f"{label}: {', '.join(items[:4])}{more}")
    raise FlowmapError(
        f"{what} does not match the architecture ({'; '.join(parts)}); check `family`/`num_heads` or that the file is the checkpoint you meant."
    )


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_bn_counter(key, value) -> bool:
    """BatchNorm's `num_batches_tracked`: one int64 count, not a weight (REPA-E's latent `bn`, docs/checkpoints.md)."""
    return (
        isinstance(key, str)
        and key.endswith("num_batches_tracked")
        and isinstance(value, torch.Tensor)
        and value.dtype == torch.int64
        and value.numel() == 1
    )


def check_tensor_dtypes(sd: dict, what: str) -> None:
    """Weights must be real floating-point tensors: int / bool / complex ones are refused by name."""
    bad = [
        (k, v)
        for k, v in sd.items()
        if (not isinstance(v, torch.Tensor) or v.dtype not in FLOAT_DTYPES) and not _is_bn_counter(k, v)
    ]
    if bad:
        names = ", ".join(
            f"{k} ({str(getattr(v, 'dtype', type(v).__name__)).replace('torch.', '')})" for k, v in bad[:3]
        )
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise FlowmapError(
            f"{what} holds non-float weights {names}{more}; model weights must be float16/bfloat16/float32/float64."
        )


ABSURD = 1e6  # no trained weight of these models comes near this magnitude


def nonfinite_report(named_tensors) -> tuple[list[str], list[str]]:
    """(names of tensors with NaN/Inf, names of finite tensors with |w| > ABSURD), one min/max pass per tensor."""
    bad, huge = [], []
    for name, t in named_tensors:
        if not t.is_floating_point() or t.numel() == 0 or t.is_meta:
            continue
        try:
            lo, hi = (float(v) for v in torch.aminmax(t.detach()))  # one pass, no temporaries; NaN propagates
        except RuntimeError:  # a dtype without aminmax on this device
            lo, hi = float(t.detach().min()), float(t.detach().max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad.append(name)
        elif max(-lo, hi) > ABSURD:
            huge.append(name)
    return bad, huge


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header's `__metadata__` in sorted key order, in place.

    The Rust writer keeps metadata in a hash map, so two saves of the same tensors could differ in the order of
    "format" and "flowmap" (same length, other bytes); sorted, the same weights always give the same file.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > n:  # never longer: same keys and values; keep the writer's bytes if json spells them otherwise
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def write_model_dir(
    model, directory: str | os.PathLike, card: str | None = None, extra_files: dict | None = None
) -> Path:
    """Write config.json, model.safetensors and a model card into `directory` (files written in place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg = {"flowmap_format": FORMAT, **cfg}
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    try:
        save_file(
            canonical_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt", "flowmap": FORMAT}
        )
    except SafetensorError as e:  # the Rust writer reports I/O failures (disk full, file too large) this way
        raise OSError(errno.EIO, str(e).splitlines()[0] if str(e) else "write failed") from None
    sort_metadata(directory / WEIGHTS_NAME)
    (directory / WEIGHTS_NAME).chmod(0o666 & ~current_umask())  # the safetensors writer creates 0600 files
    (directory / CARD_NAME).write_text(card if card is not None else model_card(model.config))
    for name, data in (extra_files or {}).items():
        (directory / name).write_bytes(data)
    return directory


def export(
    model,
    out: str | os.PathLike,
    card: str | None = None,
    extra_files: dict | None = None,
    *,
    force: bool = False,
    sources=(),
) -> Path:
    """Atomically export a FlowMap to `out` (see the module docstring for when an existing `out` is replaced)."""
    with atomic_dir(out, "model", force=force, sources=sources, force_flag="`force`") as tmp:
        write_model_dir(model, tmp, card=card, extra_files=extra_files)
    return Path(out)


def read_model_files(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(validated config, state dict of float tensors) of an exported directory; one FlowmapError otherwise."""
    directory = Path(directory)
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FlowmapError(
            f"{directory} has no config.json; point at a directory written by `flowmap convert`."
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FlowmapError(f"{directory / CONFIG_NAME} is not valid JSON ({e}); re-export the model.") from None
    except OSError as e:
        raise FlowmapError(f"cannot read {directory / CONFIG_NAME} ({e.strerror}); check the path.") from None
    cfg = ModelConfig.from_dict(data, where=str(directory / CONFIG_NAME))
    try:
        sd = load_file(str(directory / WEIGHTS_NAME))
    except FileNotFoundError:
        raise FlowmapError(f"{directory} has no model.safetensors; re-export the model.") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlowmapError(
            f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-download or re-export it."
        ) from None
    check_tensor_dtypes(sd, str(directory / WEIGHTS_NAME))
    return cfg, sd
