"""The canonical FlowMap: the r = t invariant at every depth, decoupling, time handling, logvar head."""

import pytest
import torch
from conftest import randomize, tiny_config

from flowmap_convert.errors import FlowmapError
from flowmap_convert.model import FlowMap


def test_r_equals_t_is_the_velocity_at_every_depth(tiny_model):
    x, t, y = torch.randn(5, 1, 16, 16), torch.rand(5), torch.tensor([0, 3, 9, 10, 4])
    v = tiny_model.velocity(x, t, y)
    for depth in range(1, 5):
        u = tiny_model.with_depth(depth)(x, t, t, y)
        assert (u - v).abs().max().item() <= 1e-5


def test_decoder_sees_r_and_encoder_sees_t(tiny_model):
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    t, r = torch.full((2,), 0.8), torch.full((2,), 0.3)
    fm2 = tiny_model.with_depth(2)
    # Reference computed by hand from the blocks: encoder blocks on c(t), the rest and the head on c(r).
    net = tiny_model.net
    h = net.x_embedder(x) + net.pos_embed
    ct, cr = net.cond(t, y), net.cond(r, y)
    for i, blk in enumerate(net.blocks):
        h = blk(h, ct if i < 2 else cr)
    ref = net.unpatchify(net.final_layer(h, cr))
    assert torch.allclose(fm2(x, t, r, y), ref, atol=1e-6)
    # depth N: only the head sees r, so the output differs from the velocity but the blocks do not.
    assert not torch.allclose(tiny_model.with_depth(4)(x, t, r, y), tiny_model.velocity(x, t, y))


def test_with_depth_shares_weights_and_rejects_bad_depths(tiny_model):
    fm = tiny_model.with_depth(3)
    assert fm.net is tiny_model.net
    for bad in (0, 5, -1):
        with pytest.raises(FlowmapError, match="out of range"):
            tiny_model.with_depth(bad)


def test_time_shapes_are_normalised(tiny_model):
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    a = tiny_model(x, 0.5, 0.25, y)
    b = tiny_model(x, torch.full((3, 1, 1, 1), 0.5), torch.full((3,), 0.25), y)
    assert torch.equal(a, b)
    with pytest.raises(FlowmapError, match="times"):
        tiny_model(x, torch.rand(2), None, y)


def test_reversed_convention_flips_time_and_sign():
    canon = randomize(FlowMap(tiny_config()))
    rev = FlowMap(tiny_config(time_convention="reversed"))
    rev.load_state_dict(canon.state_dict())
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([1, 5])
    assert torch.allclose(rev.velocity(x, t, y), -canon.velocity(x, 1 - t, y))


def test_logvar_head_is_zero_initialised_and_depends_on_t_and_r():
    m = FlowMap(tiny_config(logvar=True))
    t, r = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.5])
    assert torch.equal(m.logvar(t, r), torch.zeros(2, 1, 1, 1))
    torch.nn.init.normal_(m.logvar_linear.weight)
    lv = m.logvar(t, r)
    assert lv.shape == (2, 1, 1, 1) and lv[0] != lv[1]


def test_unconditional_needs_a_null_row():
    m = FlowMap(tiny_config(class_embed_rows=10))
    with pytest.raises(FlowmapError, match="null-class"):
        m(torch.randn(1, 1, 16, 16), 0.5)


def test_export_gets_the_usual_directory_permissions(tmp_path, tiny_model):
    import os

    from flowmap_convert.io import export

    umask = os.umask(0o022)
    try:
        out = export(tiny_model, tmp_path / "m")
    finally:
        os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o755


def test_public_functions_stay_callable_after_their_modules_are_imported():
    import importlib

    import flowmap_convert as fm

    importlib.import_module("flowmap_convert.sampling")
    importlib.import_module("flowmap_convert.finetuning")
    importlib.import_module("flowmap_convert.search")
    for name in ("sample", "finetune", "search_depth", "convert", "load"):
        assert callable(getattr(fm, name)), name


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    import numpy as np

    from flowmap_convert.outputs import atomic_file

    target = tmp_path / "sub" / "stats.npz"
    with atomic_file(target, suffix=".npz") as tmp:
        np.savez(tmp, mu=np.zeros(2))  # np.savez would append .npz to a name without it
    assert np.load(target)["mu"].shape == (2,)
    with pytest.raises(RuntimeError):
        with atomic_file(target, suffix=".npz") as tmp:
            np.savez(tmp, mu=np.ones(3))
            raise RuntimeError("writer failed")
    assert np.load(target)["mu"].shape == (2,)  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["stats.npz"]


def test_default_depth_rule():
    from flowmap_convert.config import ModelConfig, default_depth

    cfg = ModelConfig(num_blocks=28, hidden_size=64, num_heads=4)
    assert default_depth(cfg) == 19  # 2/3 of 28, rounded
    assert default_depth(cfg.replace(arch="ddt")) == 28  # RAE DiT^DH: the whole DDT head on r
    assert default_depth(cfg.replace(provenance={"search": {"best_depth": 22}})) == 22
    assert default_depth(cfg.replace(provenance={"search": {"best_depth": 99}})) == 19  # out of range: ignored
    assert default_depth(cfg.replace(conditioning="decoupled", depth=7)) == 7


def test_builtin_carries_its_searched_depth():
    import flowmap_convert as fm

    assert fm.convert("builtin:digits-sit").depth == 5


def test_times_keep_float64_and_everything_else_becomes_float32():
    from flowmap_convert.model import as_time

    assert as_time(torch.tensor([0.25, 0.5], dtype=torch.float64), 2, "cpu").dtype == torch.float64
    assert as_time(torch.tensor([0.25, 0.5], dtype=torch.bfloat16), 2, "cpu").dtype == torch.float32
    assert as_time(1, 3, "cpu").dtype == torch.float32 and as_time(1, 3, "cpu").shape == (3,)


def test_log_variance_head_has_one_constructor(tiny_model):
    from flowmap_convert.model import make_logvar_head

    head = make_logvar_head()
    assert head.in_features == 256 and not head.weight.any() and not head.bias.any()
    assert tiny_model.logvar_linear is None and not tiny_model.config.logvar
    tiny_model.add_logvar_head()
    first = tiny_model.logvar_linear
    tiny_model.add_logvar_head()  # idempotent: an existing (possibly trained) head is kept
    assert tiny_model.logvar_linear is first and tiny_model.config.logvar
    assert tiny_model.with_depth(2).logvar_linear is first
