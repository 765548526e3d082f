"""Attention dispatch and the fused Triton attention-with-JVP kernel (installed as flowmap_convert.kernels)."""

from .attention import (
    BACKENDS,
    AttentionWithJVP,
    attention,
    describe,
    get_default_backend,
    math_attention,
    resolve_backend,
    sdpa_attention,
    set_default_backend,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "AttentionWithJVP",
    "attention",
    "describe",
    "get_default_backend",
    "math_attention",
    "resolve_backend",
    "sdpa_attention",
    "set_default_backend",
    "triton_available",
]
