"""The public functions behind the CLI: convert and load (sample, search_depth, finetune live in their modules)."""

from __future__ import annotations

from ._version import __version__
from .adapters import load_source
from .config import check_depth, default_depth
from .errors import FlowmapError


def load(source: str, **options):
    """Load any supported source as a FlowMap in canonical convention (exported dir, Hub id, file, URL, builtin)."""
    model, _ = load_source(str(source), **options)
    return model.eval()


def convert(source: str, depth: int | None = None, **options):
    """Load `source` and rewire it as a decoupled flow map split at `depth` (default: config.default_depth).

    NaN / Inf weights are refused unless `allow_nonfinite=True` (`load` only warns about them).
    """
    options.setdefault("allow_nonfinite", False)
    model, info = load_source(str(source), depth=depth, **options)
    n = model.config.num_blocks
    if model.config.conditioning == "meanflow":
        if depth is not None:
            raise FlowmapError(
                "this checkpoint is already a MeanFlow model with its own (t - r) embedder; drop `depth`."
            )
        return model.eval()
    if depth is None:
        depth = default_depth(model.config)
    check_depth(depth, n)
    out = model.with_depth(depth)
    prov = dict(info)
    prov["flowmap_version"] = __version__
    out.config = out.config.replace(provenance=prov)
    return out.eval()
