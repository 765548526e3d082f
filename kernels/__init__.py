"""Attention dispatch and the fused Triton attention-with-JVP kernel (installed as flowmap_convert.kernels)."""

from .attention import (
    BACKENDS,
    FusedAttentionJVP,
    attention,
    attention_backward,
    backward_counts,
    compute_dtype,
    describe,
    get_default_backend,
    math_attention,
    math_backward,
    resolve_backend,
    sdpa_attention,
    triton_available,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "FusedAttentionJVP",
    "attention",
    "attention_backward",
    "backward_counts",
    "compute_dtype",
    "describe",
    "get_default_backend",
    "math_attention",
    "math_backward",
    "resolve_backend",
    "sdpa_attention",
    "triton_available",
    "use_backend",
]
