"""Exported model directories: config.json + model.safetensors + README.md, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import FlowmapError

FORMAT = "flowmap/1"
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"


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


def load_canonical_state_dict(model, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strictly load canonical keys into a FlowMap, reporting a readable key/shape diff on mismatch."""
    own = model.state_dict()  # once: it walks every module
    target = {k[len("net.") :] if k.startswith("net.") else k: k for k in own}
    check_keys_and_shapes(sd, {c: own[k].shape for c, k in target.items()}, what)
    model.load_state_dict({target[k]: v for k, v in sd.items()}, strict=True)


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
        f"{what} does not match the architecture ({'; '.join(parts)}); check --family/--num-heads or that the file is the checkpoint you meant."
    )


def replaceable_output(path: str | os.PathLike) -> bool:
    """True for a directory flowmap may replace: empty, or one it wrote (config.json or samples.json inside)."""
    p = Path(path)
    return p.is_dir() and (not any(p.iterdir()) or (p / CONFIG_NAME).exists() or (p / "samples.json").exists())


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary sibling directory that replaces `out` only if the block succeeds."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the final directory should get the usual permissions
    except OSError as e:
        raise FlowmapError(f"cannot write to {out} ({e.strerror}); choose a writable --out directory.") from None
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise FlowmapError(f"{out} already exists; remove it or choose another --out.")
            if not replaceable_output(out):
                raise FlowmapError(f"{out} exists and is not a flowmap output; remove it or choose another --out.")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary sibling path that replaces `path` only if the block succeeds (removed otherwise).

    `suffix` keeps writers that append an extension (np.savez adds `.npz`) from renaming the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model_dir(
    model, directory: str | os.PathLike, card: str | None = None, extra_files: dict | None = None
) -> Path:
    """Write config.json, model.safetensors and a model card into `directory` (files written in place)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg = {"flowmap_format": FORMAT, **cfg}
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    save_file(canonical_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt", "flowmap": FORMAT})
    from .card import model_card

    (directory / CARD_NAME).write_text(card if card is not None else model_card(model.config))
    for name, data in (extra_files or {}).items():
        (directory / name).write_bytes(data)
    return directory


def export(model, out: str | os.PathLike, card: str | None = None, extra_files: dict | None = None) -> Path:
    """Atomically export a FlowMap to `out` (nothing half-written is left on failure)."""
    with atomic_dir(out) as tmp:
        write_model_dir(model, tmp, card=card, extra_files=extra_files)
    return Path(out)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by flowmap (config.json with our format marker + weights)."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
        return False
    try:
        return json.loads((p / CONFIG_NAME).read_text()).get("flowmap_format", "").startswith("flowmap/")
    except (OSError, ValueError, AttributeError):
        return False


def read_model_dir(directory: str | os.PathLike):
    """Rebuild a FlowMap from an exported directory, strictly."""
    from .model import FlowMap

    directory = Path(directory)
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FlowmapError(
            f"{directory} has no config.json; point at a directory written by `flowmap convert`."
        ) from None
    except ValueError as e:
        raise FlowmapError(f"{directory / CONFIG_NAME} is not valid JSON ({e}); re-export the model.") from None
    cfg = ModelConfig.from_dict(data)
    try:
        sd = load_file(str(directory / WEIGHTS_NAME))
    except FileNotFoundError:
        raise FlowmapError(f"{directory} has no model.safetensors; re-export the model.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FlowmapError(
            f"{directory / WEIGHTS_NAME} is not a readable safetensors file ({e}); re-download or re-export it."
        ) from None
    model = FlowMap(cfg)
    load_canonical_state_dict(model, sd, str(directory / WEIGHTS_NAME))
    return model.eval()
