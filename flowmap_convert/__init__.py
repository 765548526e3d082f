"""flowmap: turn pretrained flow-matching / diffusion transformers into few-step flow maps."""

from ._version import __version__

__all__ = [
    "convert",
    "load",
    "sample",
    "search_depth",
    "finetune",
    "FlowMap",
    "ModelConfig",
    "FlowmapError",
    "__version__",
]


def __getattr__(name):
    # Lazy imports keep `import flowmap_convert` (and `flowmap --help`) fast.
    if name in ("convert", "load"):
        from . import api

        return getattr(api, name)
    if name == "sample":
        from .sampling import sample

        return sample
    if name == "search_depth":
        from .search import search_depth

        return search_depth
    if name == "finetune":
        from .finetuning import finetune

        return finetune
    if name == "FlowMap":
        from .model import FlowMap

        return FlowMap
    if name == "ModelConfig":
        from .config import ModelConfig

        return ModelConfig
    if name == "FlowmapError":
        from .errors import FlowmapError

        return FlowmapError
    raise AttributeError(f"module 'flowmap_convert' has no attribute {name!r}")
