"""Objectives: the MeanFlow target against an independent plain-PyTorch reference, FD vs JVP, losses, decoder-only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config
from torch.func import jvp


# ---------------------------------------------------------------------------------------------------- reference
def ref_u(sd, cfg, x, t, r, y, depth):
    """A from-scratch functional DiT flow map u(x, t, r, y) read straight from the canonical state dict."""
    d, p, nh = cfg.hidden_size, cfg.patch_size, cfg.num_heads
    b = x.shape[0]

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def temb(tt):
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=tt.dtype) / half)
        a = tt[:, None] * freqs[None]
        e = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
        return lin(F.silu(lin(e, "t_embedder.mlp.0")), "t_embedder.mlp.2")

    def ln(z):
        return F.layer_norm(z, (d,), eps=1e-6)

    ye = sd["y_embedder.embedding_table.weight"][y]
    ct, cr = temb(t) + ye, temb(r) + ye
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    L = h.shape[1]
    for i in range(cfg.num_blocks):
        c = ct if i < depth else cr
        s1, c1, g1, s2, c2, g2 = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, dim=-1)
        a = ln(h) * (1 + c1[:, None]) + s1[:, None]
        q, k, v = lin(a, f"blocks.{i}.attn.qkv").reshape(b, L, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // nh), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(b, L, d), f"blocks.{i}.attn.proj")
        m = ln(h) * (1 + c2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, f"blocks.{i}.mlp.fc1"), approximate="tanh"), f"blocks.{i}.mlp.fc2")
    sh, sc = lin(F.silu(cr), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    o = lin(ln(h) * (1 + sc[:, None]) + sh[:, None], "final_layer.linear")
    g, c_out = int(L**0.5), cfg.in_channels
    o = o.reshape(b, g, g, p, p, c_out)
    return torch.einsum("nhwpqc->nchpwq", o).reshape(b, c_out, g * p, g * p)


def make(depth=2, **over):
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    return randomize(FlowMap(tiny_config(**over)), std=0.1).with_depth(depth)


def ctx_for(model, train="all", **rec):
    from flowmap_convert.finetuning.common import Calls, Context
    from flowmap_convert.finetuning.recipe import Recipe

    recipe = Recipe(train=train, **rec)
    return Context(Calls(model, decoder_only=train == "decoder"), recipe, model.config.num_classes)


def inputs(b=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, 16, 16, generator=g, dtype=dtype)
    v = torch.randn(b, 1, 16, 16, generator=g, dtype=dtype)
    t = torch.tensor([0.9, 0.6, 0.35])[:b]
    r = torch.tensor([0.1, 0.55, 0.0])[:b]
    y = torch.tensor([3, 10, 7])[:b]  # includes the null class
    return x, v, t, r, y


# ---------------------------------------------------------------------------------------------------- tests
def test_reference_matches_model_forward():
    from flowmap_convert.io import canonical_state_dict

    model = make()
    x, v, t, r, y = inputs()
    sd = canonical_state_dict(model)
    with torch.no_grad():
        assert torch.allclose(model(x, t, r, y), ref_u(sd, model.config, x, t, r, y, 2), atol=1e-5)


@pytest.mark.parametrize("train", ["all", "decoder"])
def test_meanflow_target_matches_independent_jvp(train):
    from flowmap_convert.finetuning.common import mf_target
    from flowmap_convert.io import canonical_state_dict

    model = make()
    if train == "decoder":
        from flowmap_convert.finetuning.trainer import set_trainable

        set_trainable(model, "decoder")
    x, v, t, r, y = inputs()
    u, u_tgt, dudt = mf_target(ctx_for(model, train), x, t, r, y, v)
    sd = canonical_state_dict(model)
    u_ref, dudt_ref = jvp(
        lambda x_, t_, r_: ref_u(sd, model.config, x_, t_, r_, y, 2), (x, t, r), (v, torch.ones(3), torch.zeros(3))
    )
    tgt_ref = v + (r - t).reshape(-1, 1, 1, 1) * dudt_ref  # DMF Eq. 3 target
    assert torch.allclose(u, u_ref, atol=1e-5)
    assert torch.allclose(dudt, dudt_ref, atol=1e-5)
    assert torch.allclose(u_tgt, tgt_ref, atol=1e-5)
    assert not u_tgt.requires_grad and u.requires_grad


def test_decoder_only_jvp_equals_full_jvp_and_only_decoder_gets_gradients():
    from flowmap_convert.finetuning.common import mf_target
    from flowmap_convert.finetuning.trainer import set_trainable

    model = make(depth=3)
    set_trainable(model, "decoder")
    x, v, t, r, y = inputs()
    u_d, tgt_d, _ = mf_target(ctx_for(model, "decoder"), x, t, r, y, v)
    u_a, tgt_a, _ = mf_target(ctx_for(model, "all"), x, t, r, y, v)
    assert torch.allclose(u_d, u_a, atol=1e-6) and torch.allclose(tgt_d, tgt_a, atol=1e-5)
    (u_d - tgt_d).pow(2).sum().backward()
    enc = [model.net.x_embedder, model.net.t_embedder, model.net.y_embedder, *model.net.blocks[:3]]
    assert all(p.grad is None for m in enc for p in m.parameters())
    assert model.net.final_layer.linear.weight.grad.abs().sum() > 0


def test_decoder_plus_time_trains_the_time_embedder_through_the_frozen_encoder():
    """--train decoder+time (DMF Sec. 3.1): the timestep embedder gets the gradient of the whole model (its use by the
    encoder included), the encoder blocks and the other embedders none, and u / du/dt are the full model's."""
    from flowmap_convert.finetuning.common import mf_target
    from flowmap_convert.finetuning.trainer import set_trainable

    model = make(depth=3)
    x, v, t, r, y = inputs()
    # reference: every weight trainable, the whole model differentiated
    set_trainable(model, "all")
    u_a, tgt_a, _ = mf_target(ctx_for(model, "all"), x, t, r, y, v)
    (u_a - tgt_a).pow(2).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    trainable = set_trainable(model, "decoder+time")
    u_d, tgt_d, _ = mf_target(ctx_for(model, "decoder+time"), x, t, r, y, v)
    assert torch.allclose(u_d, u_a, atol=1e-6) and torch.allclose(tgt_d, tgt_a, atol=1e-5)
    (u_d - tgt_d).pow(2).sum().backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in names if n.startswith("net.t_embedder.")} and len(trainable) == len(names)
    assert not any(
        n.startswith(("net.x_embedder.", "net.y_embedder.", "net.blocks.0.", "net.blocks.2.")) for n in names
    )
    for n, p in model.named_parameters():
        if p.requires_grad:  # the same gradient as when everything trains: nothing was cut at the encoder
            assert torch.allclose(p.grad, ref[n], atol=1e-6, rtol=1e-5), n
        else:
            assert p.grad is None, n


def test_fixed_parameters_never_train():
    """RAE's random Fourier frequencies W stay fixed under every --train choice."""
    from flowmap_convert.ddt import GaussianFourierEmbedder
    from flowmap_convert.finetuning.trainer import set_trainable

    model = make(depth=3)
    model.net.t_embedder.extra = GaussianFourierEmbedder(8)  # a module that declares a fixed parameter
    for part in ("all", "decoder", "decoder+time"):
        set_trainable(model, part)
        assert not model.net.t_embedder.extra.W.requires_grad, part
        assert model.net.t_embedder.extra.mlp[0].weight.requires_grad == (part != "decoder"), part


def _fp64(monkeypatch):
    """Run the tiny model fully in float64 (the CPU attention placeholder and time embedding compute in fp32)."""
    import flowmap_convert.dit as dit
    import flowmap_convert.layers as layers

    def attn(q, k, v, backend="auto", scale=None):
        s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        return s.softmax(-1) @ v

    def temb(t, dim=256, max_period=10000.0, freq_shift=0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - freq_shift))
        a = t.double()[:, None] * freqs[None]
        return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)

    monkeypatch.setattr(dit, "attention", attn)
    monkeypatch.setattr(layers, "timestep_embedding", temb)


@pytest.mark.parametrize("train", ["all", "decoder"])
def test_finite_difference_error_shrinks_quadratically(monkeypatch, train):
    _fp64(monkeypatch)
    model = make().double()
    x, v, _, _, y = inputs(dtype=torch.float64)
    t = torch.tensor([0.75, 0.5, 0.625])  # exact in fp32 (the model's time boundary), as are t +- 2^-k
    r = torch.tensor([0.25, 0.0, 0.5])
    calls = ctx_for(model, train).calls
    with torch.no_grad():
        _, exact = calls.u_and_dudt_jvp(x, t, r, y, v)
        errs = [(calls.u_and_dudt_fd(x, t, r, y, v, d)[1] - exact).abs().max().item() for d in (2**-4, 2**-5, 2**-6)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(3.5 < q < 4.5 for q in ratios), (errs, ratios)  # central difference: O(delta^2)
    assert errs[-1] < 1e-3 * exact.abs().max().item()


def test_fd_target_uses_one_batched_call_and_gradients_only_through_u():
    model = make()
    calls = ctx_for(model, "all", derivative="fd").calls
    seen = []
    h = model.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x, v, t, r, y = inputs()
    u, dudt = calls.u_and_dudt_fd(x, t, r, y, v, 5e-3)
    h.remove()
    assert seen == [9] and u.shape == x.shape and not dudt.requires_grad


def test_dmf_loss_matches_reference_with_same_random_draws():
    """The whole DMF loss (label dropout, times, guidance, both branches, log-variance loss) recomputed by hand."""
    from flowmap_convert.finetuning.dmf import dmf_loss
    from flowmap_convert.io import canonical_state_dict
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    model = randomize(FlowMap(tiny_config(logvar=True)), std=0.1).with_depth(2)
    ctx = ctx_for(model, "all", mg_scale=0.6, guidance_interval=(0.0, 0.7), label_dropout=0.3)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 1, 16, 16, generator=g)
    y0 = torch.randint(0, 10, (6,), generator=g)
    loss, _ = dmf_loss(ctx, x0, y0, torch.Generator().manual_seed(9))

    sd = canonical_state_dict(model)
    cfg, b = model.config, 6

    def f(x, t, r, y):
        return ref_u(sd, cfg, x, t, r, y, 2)

    g = torch.Generator().manual_seed(9)
    drop = torch.rand(b, generator=g) < 0.3
    y = torch.where(drop, torch.full_like(y0, 10), y0)

    def lv(t, r):  # DMF's head: Linear(cat[emb128(t), emb128(r)])
        def e(tt):
            fr = torch.exp(-math.log(10000.0) * torch.arange(64) / 64)
            a = tt[:, None] * fr[None]
            return torch.cat([torch.cos(a), torch.sin(a)], -1)

        return (torch.cat([e(t), e(r)], -1) @ sd["logvar_linear.weight"].T + sd["logvar_linear.bias"]).reshape(-1)

    def guided(xt, t, vt):
        use = (t >= 0.0) & (t <= 0.7) & ~drop
        with torch.no_grad():
            vc, vu = f(xt, t, t, y), f(xt, t, t, torch.full_like(y, 10))
        return torch.where(use.reshape(-1, 1, 1, 1), vt + 0.6 * (vc - vu), vt)  # DMF Eq. 4

    def lvloss(err, lvv):
        mse = err.pow(2).mean((1, 2, 3))
        return torch.log(mse * torch.exp(-lvv) + 0.01) + lvv

    tf = torch.sigmoid(0.0 + torch.randn(b, generator=g))
    e1 = torch.randn(x0.shape, generator=g)
    xt = (1 - tf.reshape(-1, 1, 1, 1)) * x0 + tf.reshape(-1, 1, 1, 1) * e1
    vt = guided(xt, tf, e1 - x0)
    fm = lvloss(f(xt, tf, tf, y) - vt, lv(tf, tf))
    a = torch.sigmoid(0.4 + torch.randn(b, generator=g))
    c = torch.sigmoid(-1.2 + torch.randn(b, generator=g))
    t, r = torch.maximum(a, c), torch.minimum(a, c)
    e2 = torch.randn(x0.shape, generator=g)
    xt = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * e2
    vt = guided(xt, t, e2 - x0)
    u, du = jvp(lambda x_, t_, r_: f(x_, t_, r_, y), (xt, t, r), (vt, torch.ones(b), torch.zeros(b)))
    mf = lvloss(u - (vt + (r - t).reshape(-1, 1, 1, 1) * du), lv(t, r))
    assert abs(loss.item() - (0.5 * (fm + mf)).mean().item()) < 1e-5


def test_losses():
    from flowmap_convert.finetuning.common import per_sample_loss
    from flowmap_convert.finetuning.recipe import Recipe

    err = torch.randn(4, 1, 4, 4, requires_grad=True)
    lv = torch.tensor([0.0, 0.5, -0.5, 1.0]).reshape(-1, 1, 1, 1)
    mse = err.detach().pow(2).mean((1, 2, 3))
    got = per_sample_loss(err, lv, Recipe(loss="adaptive"))
    assert torch.allclose(got, torch.log(mse * torch.exp(-lv.reshape(-1)) + 0.01) + lv.reshape(-1))
    w = per_sample_loss(err, None, Recipe(loss="adaptive-weight"))
    w.sum().backward()
    m = err.detach().pow(2).sum((1, 2, 3))
    # the weight is detached: d/de [w m] = w * 2 e with w = 1 / (m + c)
    assert torch.allclose(err.grad, 2 * err.detach() / (m + 1e-3).reshape(-1, 1, 1, 1), atol=1e-6)
    assert torch.allclose(per_sample_loss(err, None, Recipe(loss="mse")), mse)


def test_mfrae_loss_is_the_released_squared_form():
    """MF-RAE's code: m = sum e^2, w = sg(1 / (m^2 + c)^p), loss = w m^2; value and gradient against that formula."""
    from flowmap_convert.finetuning.common import per_sample_loss
    from flowmap_convert.finetuning.recipe import Recipe

    err = (0.3 * torch.randn(5, 2, 3, 3)).requires_grad_(True)
    for p in (1.0, 0.5):
        err.grad = None
        got = per_sample_loss(err, None, Recipe(loss="mfrae", adaptive_p=p))
        m = err.detach().pow(2).sum((1, 2, 3))
        assert torch.allclose(got.detach(), m**2 / (m**2 + 1e-3) ** p, rtol=1e-5)
        got.sum().backward()
        # d/de [w m^2] = w * 2 m * 2 e, the weight held fixed
        want = (4 * m / (m**2 + 1e-3) ** p).reshape(-1, 1, 1, 1) * err.detach()
        assert torch.allclose(err.grad, want, rtol=1e-4, atol=1e-6)
    # not the MeanFlow form: for |e|^2 = m the two differ
    other = per_sample_loss(err.detach(), None, Recipe(loss="adaptive-weight"))
    assert not torch.allclose(other, per_sample_loss(err.detach(), None, Recipe(loss="mfrae")))


def test_cmt_trajectory_and_chords_with_a_constant_teacher():
    from flowmap_convert.finetuning.cmt import cmt_loss, teacher_trajectory
    from flowmap_convert.finetuning.common import Calls, Context
    from flowmap_convert.finetuning.recipe import Recipe

    c = 0.7

    def teacher(x, t, y):
        return torch.full_like(x, c)

    z = torch.zeros(2, 1, 16, 16)
    states = teacher_trajectory(teacher, z, torch.tensor([1, 2]), 16, 1.0)
    assert states.shape[0] == 16 and torch.allclose(states[-1], torch.full_like(z, -0.999 * c).double())
    # a "model" that reports what it was asked: the CMT target of every pair is c * 0.999 (grid) / 1.0 (labels)
    model = make()

    class Probe(Calls):
        def u(self, x, t, r, y):
            return torch.full_like(x, c * 0.999) + 0 * x

    ctx = Context(Probe(model), Recipe(objective="cmt", loss="mse", label_dropout=0.0), 10, teacher)
    loss, _ = cmt_loss(ctx, torch.zeros(4, 1, 16, 16), torch.arange(4), torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10


def test_recipe_refuses_fp16_and_bad_values():
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.recipe import Recipe

    with pytest.raises(FlowmapError, match="fp16"):
        Recipe(precision="fp16")
    with pytest.raises(FlowmapError, match=r"^`mg_scale` must be in \[0, 1\), got 1.5"):  # the parameter, not a flag
        Recipe(mg_scale=1.5)
    with pytest.raises(FlowmapError, match="objective"):
        Recipe(objective="nope")
    assert Recipe.from_dict(Recipe(time_proposal=(0.1, -0.5)).to_dict()) == Recipe(time_proposal=(0.1, -0.5))
