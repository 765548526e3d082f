"""Source adapters: resolve a source, read it safely, detect its family and build a canonical FlowMap.

`load_source(source, ...)` is the single entry point; it returns `(model, info)` where `model` is a base
FlowMap (or an already-decoupled one for DMF / exported sources) and `info` is the provenance dict.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FlowmapError
from ..io import is_model_dir, read_model_dir, sha256_file

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"


def builtin_path(name: str) -> Path:
    """Directory of a model shipped inside the package (`builtin:NAME`)."""
    p = BUILTIN_DIR / name
    if not p.is_dir():
        known = sorted(d.name for d in BUILTIN_DIR.iterdir() if d.is_dir()) if BUILTIN_DIR.is_dir() else []
        raise FlowmapError(f"unknown builtin model {name!r}; available: {', '.join(known) or 'none'}.")
    return p


def load_source(source: str, **options):
    """Build a FlowMap from an exported directory or a builtin model (other families: see the adapter modules)."""
    path = builtin_path(source.split(":", 1)[1]) if source.startswith("builtin:") else Path(source)
    if path.is_dir() and is_model_dir(path):
        model = read_model_dir(path)
        info = dict(model.config.provenance)
        info.setdefault("source", source)
        info.setdefault("sha256", sha256_file(path / "model.safetensors"))
        info["family"] = "flowmap"
        return model, info
    raise FlowmapError(f"cannot find a model at {source!r}; pass a flowmap directory, a checkpoint file, a Hub repo id or builtin:NAME.")
