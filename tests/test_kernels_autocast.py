"""Mixed dtypes under autocast: q / k out of a q-k norm in fp32, v in the autocast dtype (the DMF / REPA case).

Kernel runs use Triton's CPU interpreter (fp16 autocast: the interpreter has no bf16 tl.dot);
the bf16 CUDA version of the same check is in tests/test_kernels.py (marked gpu).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (see test_kernels.py)

import pytest  # noqa: E402
from flowmap_convert.kernels import (  # noqa: E402
    attention,
    compute_dtype,
    triton_available,  # noqa: E402
    use_backend,
)


def _interpreting():
    if not triton_available():
        return False
    from flowmap_convert.kernels.triton_jvp import interpreting

    return interpreting()


needs_interpreter = pytest.mark.skipif(
    not _interpreting(), reason="needs triton's CPU interpreter (TRITON_INTERPRET=1)"
)


def test_compute_dtype_follows_autocast_else_promotes():
    """Autocast on: its dtype for every non-fp64 input (as SDPA under autocast); off: the promoted dtype."""
    f32, f16, b16 = (torch.zeros(1, dtype=d) for d in (torch.float32, torch.float16, torch.bfloat16))
    assert compute_dtype(f32, f32, b16) == torch.float32
    assert compute_dtype(f16, f16, f16) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(f32, f32, b16) == torch.bfloat16
        assert compute_dtype(f32, f32, f32) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(f32, b16, f16) == torch.float16
        assert compute_dtype(f32, torch.zeros(1, dtype=torch.float64), f16) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert compute_dtype(f32, f32, b16) == torch.float32


def test_math_backend_mixed_dtypes_without_autocast_promote():
    """fp32 q / k with a bf16 v (no autocast) compute in fp32 instead of failing."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    v = torch.randn(1, 2, 5, 16, generator=g).bfloat16()
    o = attention(q, k, v, backend="math")
    assert o.dtype == torch.float32
    torch.testing.assert_close(o, attention(q, k, v.float(), backend="math"))


@needs_interpreter
def test_triton_jvp_under_autocast_with_fp32_qk_and_half_v():
    """The crash case: fp32 q / k, fp16 v and tangents in mixed dtypes under fp16 autocast, then backward."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 2, 33, 72)
    q, k, tq, tk = (torch.randn(shape, generator=g) for _ in range(4))
    v, tv = (torch.randn(shape, generator=g).half() for _ in range(2))

    def run(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.float16):
            o, t = torch.func.jvp(lambda a, b, c: attention(a, b, c, backend=backend), tuple(leaves), (tq, tk, tv))
        o.float().pow(2).sum().backward()
        return o, t, *(x.grad for x in leaves)

    got, want = run("triton"), run("math")
    assert got[0].dtype == got[1].dtype == torch.float16  # what SDPA gives under fp16 autocast
    assert got[2].dtype == torch.float32 and got[4].dtype == torch.float16  # gradients in the leaves' dtypes
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


@needs_interpreter
def test_dmf_step_on_a_qk_norm_model_under_autocast_with_triton_attention():
    """A whole DMF loss + backward (FM branch plain, MF branch through torch.func.jvp) on an RMS q-k-norm model
    under fp16 CPU autocast: --attention triton runs and agrees with --attention math."""
    from conftest import randomize, tiny_config

    from flowmap_convert.finetuning.common import Calls, Context
    from flowmap_convert.finetuning.objectives import OBJECTIVE_FNS
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.model import FlowMap

    def step(backend):
        torch.manual_seed(0)
        cfg = tiny_config(num_blocks=2, patch_size=4, hidden_size=64, num_heads=2, qk_norm="rms")
        model = randomize(FlowMap(cfg), std=0.05).with_depth(1)
        ctx = Context(Calls(model), Recipe(), model.config.num_classes)
        x0 = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        with use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            loss, metrics = OBJECTIVE_FNS["dmf"](ctx, x0, torch.tensor([1, 2]), torch.Generator().manual_seed(1))
        loss.float().backward()
        return loss.item(), metrics["dudt"], [p.grad for p in model.parameters() if p.grad is not None]

    got, want = step("triton"), step("math")
    assert got[0] == pytest.approx(want[0], rel=1e-3) and got[1] == pytest.approx(want[1], rel=1e-2)
    assert len(got[2]) == len(want[2]) > 0
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)
