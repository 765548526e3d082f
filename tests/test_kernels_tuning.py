"""Autotuning of the fused attention kernel as plain Python: head-dim tiles, configs, the shared-memory prune, keys."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton` (see test_kernels.py)

import pytest  # noqa: E402
from flowmap_convert.kernels import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_head_dim_tiles_avoid_padding_to_the_next_power_of_two():
    """72 runs as 64 + 16 (80 lanes, not 128); powers of two stay whole; a split no better than padding is not made."""
    from flowmap_convert.kernels.triton_jvp import head_dim_tiles

    assert head_dim_tiles(72) == (64, 16)
    assert head_dim_tiles(96) == (64, 32)
    assert head_dim_tiles(40) == (32, 16)
    assert head_dim_tiles(64) == (64, 0) and head_dim_tiles(128) == (128, 0)
    assert head_dim_tiles(100) == (128, 0) and head_dim_tiles(24) == (32, 0)
    assert head_dim_tiles(8) == (16, 0)
    for d in range(1, 257):
        d1, d2 = head_dim_tiles(d)
        assert d1 + d2 >= d and d1 >= 16 and (d2 == 0 or d2 >= 16)
        assert d1 & (d1 - 1) == 0 and d2 & (d2 - 1) == 0  # powers of two (tl.arange)
        assert d1 + d2 <= max(16, 1 << (d - 1).bit_length())  # never more than one padded tile


@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_at_most_four_configs_per_head_dim_and_some_fit(D, dtype):
    """<= 4 candidates per head dim; at least one passes the prune at H100's 227 KiB."""
    from flowmap_convert.kernels.triton_jvp import autotune_configs, fixed_config, prune_configs

    configs = autotune_configs(D, dtype)
    assert 1 <= len(configs) <= 4
    elem = torch.empty((), dtype=dtype).element_size()
    kept = prune_configs(configs, D, elem, 227 * 1024)
    assert kept and all(c in configs for c in kept)
    fixed = fixed_config(D, dtype)
    assert (fixed.kwargs, fixed.num_warps, fixed.num_stages) == (kept[0].kwargs, kept[0].num_warps, kept[0].num_stages)


def test_shared_memory_counts_every_tile():
    """q + tangent-q, four K/V-side tiles per stage and four score tiles; D = 128 (128, 64, 2 stages) needs 256 KiB."""
    from flowmap_convert.kernels.triton_jvp import shared_memory_bytes

    # 2 * 128 * 128 * 2 (q, dq) + 4 * 64 * 128 * 2 * 2 (k, dk, v, dv; 2 stages) + 4 * 128 * 64 * 2 (scores)
    assert shared_memory_bytes(128, 64, 2, 128, 2) == 64 * 1024 + 128 * 1024 + 64 * 1024
    # D = 72 counts 80 lanes (64 + 16), not 128
    assert shared_memory_bytes(64, 64, 2, 72, 2) == 2 * 64 * 80 * 2 + 4 * 64 * 80 * 2 * 2 + 4 * 64 * 64 * 2


def test_prune_drops_configs_over_the_limit_and_never_returns_nothing():
    """A 256 KiB config is dropped at 227 KiB, kept at 260 KiB; with a tiny limit the smallest tile survives."""
    import triton
    from flowmap_convert.kernels.triton_jvp import prune_configs, shared_memory_bytes

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=5)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    assert shared_memory_bytes(128, 32, 5, 128, 2) == 256 * 1024
    assert prune_configs([big, small], 128, 2, 227 * 1024) == [small]
    assert prune_configs([big, small], 128, 2, 260 * 1024) == [big, small]
    assert prune_configs([big, small], 128, 2, 1024) == [small]


def test_prune_drops_configs_that_would_spill_registers():
    """Register estimate vs offline sm_90 compiles at D = 128: (64, 64, 4 warps) spilled, (128, 32, 8 warps) did not."""
    import triton
    from flowmap_convert.kernels.triton_jvp import prune_configs, registers_per_thread

    spills = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
    fits = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    assert registers_per_thread(64, 64, 128, 4, 2) == 128 + 64 + 96  # acc_O + acc_T, q + dq, three score tiles
    assert prune_configs([spills, fits], 128, 2, 1 << 30) == [fits]
    assert prune_configs([spills, fits], 72, 2, 1 << 30) == [spills, fits]  # 80 lanes: both fit


def test_autotune_key_buckets_lengths_and_names_the_head_dim():
    """Lengths enter the key as a power-of-two bucket (no re-tune per length); the head dim is in the key."""
    from flowmap_convert.kernels.triton_jvp import _autotuned_kernel, l_bucket

    assert l_bucket(1, 1) == 64 and l_bucket(65, 65) == 128 and l_bucket(256, 257) == 512
    assert l_bucket(1000, 1024) == l_bucket(1024, 600) == 1024
    tuner = _autotuned_kernel(72, torch.bfloat16)
    assert "L_BUCKET" in tuner.keys and "HEAD_DIM" in tuner.keys and "L_Q" not in tuner.keys
    assert len(tuner.configs) <= 4
    assert _autotuned_kernel(72, torch.float16) is tuner  # fp16 / bf16 share configs (dtype is in triton's key)


def test_fixed_config_switch(monkeypatch):
    """FLOWMAP_TRITON_AUTOTUNE=0 turns autotuning off (compiled launches then use fixed_config)."""
    from flowmap_convert.kernels.triton_jvp import autotune_enabled

    monkeypatch.setenv("FLOWMAP_TRITON_AUTOTUNE", "0")
    assert not autotune_enabled()
    monkeypatch.setenv("FLOWMAP_TRITON_AUTOTUNE", "1")
    assert autotune_enabled()


def test_grid_is_one_dimensional_for_many_heads():
    """B*H = 70000 > 65535 (the cap of grid axis 1) fits: one axis of cdiv(L, BLOCK_M) * B * H programs."""
    from flowmap_convert.kernels.triton_jvp import launch_grid

    assert launch_grid(65, 2, 35000, 64) == (2 * 70000,)
    assert launch_grid(1, 1, 1, 64) == (1,)
