"""Source adapters: resolve a source, read it safely, detect its family and build a canonical FlowMap.

Pipeline (DESIGN.md): resolve -> download/cache -> read state dict safely -> detect family -> build -> load strictly.
`load_source(source, ...)` is the single entry point and returns `(model, info)`: `model` is a FlowMap in the
canonical convention (a base velocity model, or already a flow map for DMF / MF-RAE / exported sources) and
`info` its provenance (source, revision, file, sha256, weights, family).

Family modules register themselves in FAMILIES with `@register("name")` on a class providing
`detect(sd) -> bool` (from keys and shapes alone) and `build(sd, options) -> FlowMap`.
"""

from __future__ import annotations

from pathlib import Path

from .. import __file__ as _package_init  # adapters/ lives outside flowmap_convert/ on disk (package-dir mapping)
from ..errors import FlowmapError

BUILTIN_DIR = Path(_package_init).resolve().parent / "builtin"
FAMILIES: dict[str, object] = {}
# Order matters for detection: more specific families first (e.g. dmf before repa before sit).
DETECTION_ORDER: list[str] = []


def register(name: str):
    """Class decorator adding a family adapter to the registry under `name`."""

    def deco(cls):
        FAMILIES[name] = cls()
        if name not in DETECTION_ORDER:
            DETECTION_ORDER.append(name)
        return cls

    return deco


def builtin_path(name: str) -> Path:
    """Directory of a model shipped inside the package (`builtin:NAME`)."""
    p = BUILTIN_DIR / name
    if not p.is_dir():
        known = sorted(d.name for d in BUILTIN_DIR.iterdir() if d.is_dir()) if BUILTIN_DIR.is_dir() else []
        raise FlowmapError(f"unknown builtin model {name!r}; available: {', '.join(known) or 'none'}.")
    return p


def load_source(source: str, **options):
    """Build a FlowMap from an exported directory or a builtin model (other families: see the adapter modules)."""
    from ..io import is_model_dir, read_model_dir, sha256_file

    path = builtin_path(source.split(":", 1)[1]) if source.startswith("builtin:") else Path(source)
    if path.is_dir() and is_model_dir(path):
        model = read_model_dir(path)
        info = dict(model.config.provenance)
        info.setdefault("source", source)
        info.setdefault("sha256", sha256_file(path / "model.safetensors"))
        info["family"] = "flowmap"
        return model, info
    raise FlowmapError(f"cannot find a model at {source!r}; pass a flowmap directory, a checkpoint file, a Hub repo id or builtin:NAME.")
