"""One home for each convention: FlowMap.decode(FlowMap.encode(x, t, y), r, y) is the model, for every family.

Decoder-only fine-tuning runs the encoder once under no_grad and differentiates the decoder from that state, so its u
and du/dt must equal the whole model's for every source convention (DiT DDPM epsilon, reversed SiT with learn_sigma,
canonical REPA / DMF, RAE DiT^DH); MF-RAE cannot split and refuses.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_config
from flowmap_convert.adapters import FAMILIES, LoadOptions
from flowmap_convert.adapters.dit import DiTFamily
from test_dit_family import random_dit_sd
from test_new_families import lightning_sd, repa_sit_sd
from test_rae_family import ddt_state_dict
from torch.func import jvp

from flowmap_convert.errors import FlowmapError
from flowmap_convert.finetuning.common import Calls
from flowmap_convert.model import FlowMap


def dit_eps_model():
    """DiT (DDPM epsilon, learn_sigma) from its original-layout checkpoint, split at depth 2 of 3."""
    return DiTFamily().build(random_dit_sd(seed=21), LoadOptions(num_heads=4)).with_depth(2)


def tiny(seed, **over):
    torch.manual_seed(seed)
    return randomize(FlowMap(tiny_config(**over)), seed=seed, std=0.1).with_depth(2)


def rae_model():
    return FAMILIES["rae"].build(ddt_state_dict(seed=22)).with_depth(2)


FAMILY_MODELS = {
    "dit-ddpm-eps": dit_eps_model,
    "sit-reversed-learn-sigma": lambda: tiny(23, time_convention="reversed", learn_sigma=True),
    "repa-canonical": lambda: tiny(24, qk_norm="layernorm"),
    "dmf-canonical": lambda: tiny(25, qk_norm="rms", logvar=True),
    "rae-dit-dh": rae_model,
    "lightningdit-reversed": lambda: (
        FAMILIES["lightningdit"].build(lightning_sd(seed=28, qk=True), LoadOptions()).with_depth(2)
    ),
    "repa-e-canonical": lambda: FAMILIES["repa-e"].build(repa_sit_sd(seed=29), LoadOptions(num_heads=2)).with_depth(2),
}


def batch(model, seed=3):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (3, cfg.in_channels, cfg.input_size, cfg.input_size)
    x, v = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    t, r = torch.tensor([0.93, 0.55, 0.2]), torch.tensor([0.4, 0.55, 0.05])
    return x, v, t, r, torch.tensor([1, cfg.num_classes, 7])


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_decode_of_encode_is_the_model(family):
    model = FAMILY_MODELS[family]().eval()
    x, _, t, r, y = batch(model)
    with torch.no_grad():
        state = model.encode(x, t, y)
        assert torch.equal(model.decode(state, r, y), model(x, t, r, y))
        assert torch.equal(model.decode(state, None, y), model.velocity(x, t, y))


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_decoder_only_u_and_dudt_equal_the_full_model(family):
    model = FAMILY_MODELS[family]().eval()
    x, v, t, r, y = batch(model)
    dec, full = Calls(model, decoder_only=True), Calls(model)
    u_ref = model(x, t, r, y).detach()
    # fp32 rounding grows with the magnitude: a few ulps of |u| (about 4 here) exceed 1e-6 on some CPUs' kernels
    tol_u = 1e-6 * max(1.0, u_ref.abs().max().item())
    assert (dec.u(x, t, r, y).detach() - u_ref).abs().max().item() <= tol_u
    assert (full.u(x, t, r, y).detach() - u_ref).abs().max().item() <= tol_u
    # the full model's du/dt along (v, 1, 0), straight from torch.func on model(x, t, r, y)
    _, dudt_ref = jvp(lambda x_, t_: model(x_, t_, r, y), (x, t), (v, torch.ones(3)))
    u_d, dudt_d = dec.u_and_dudt_jvp(x, t, r, y, v)
    u_f, dudt_f = full.u_and_dudt_jvp(x, t, r, y, v)
    scale = max(1.0, dudt_ref.abs().max().item())
    assert (u_d - u_ref).abs().max().item() <= tol_u
    assert (dudt_d - dudt_ref).abs().max().item() <= 1e-5 * scale, family
    assert (dudt_f - dudt_ref).abs().max().item() <= 1e-5 * scale, family
    assert dudt_ref.abs().max().item() > 1e-3  # a real derivative, not zeros on both sides


def test_decoder_only_dit_jvp_sees_the_time_tangent_of_the_epsilon_algebra():
    """Dropping the encoder state's t tangent (the eps -> v algebra depends on t) gives a different du/dt."""
    model = dit_eps_model().eval()
    x, v, t, r, y = batch(model)
    _, dudt = Calls(model, decoder_only=True).u_and_dudt_jvp(x, t, r, y, v)
    with torch.no_grad():
        state, dstate = jvp(lambda x_, t_: model.encode(x_, t_, y), (x, t), (v, torch.ones(3)))
    frozen_t = dstate._replace(t=torch.zeros_like(t))
    _, wrong = jvp(lambda s_: model.decode(s_, r, y), (state,), (frozen_t,))
    assert (wrong - dudt).abs().max().item() > 1e-3


def test_mf_rae_decoder_only_refuses_in_one_line():
    model = FAMILIES["mf-rae"].build(ddt_state_dict(meanflow=True, seed=26))
    assert model.config.conditioning == "meanflow" and not Calls.can_split(model)
    with pytest.raises(FlowmapError) as err:
        Calls(model, decoder_only=True)
    assert "\n" not in str(err.value) and "`train` all" in str(err.value)
    x, _, t, r, y = batch(model)
    with torch.no_grad():  # the whole-network path still goes through encode / decode
        assert torch.equal(model.decode(model.encode(x, t, y), r, y), model(x, t, r, y))


def test_velocity_models_cannot_be_fine_tuned_decoder_only_until_split():
    model = DiTFamily().build(random_dit_sd(seed=27), LoadOptions(num_heads=4))
    assert model.config.conditioning == "velocity" and not Calls.can_split(model)
    assert Calls.can_split(model.with_depth(1))


def test_rae_decoder_only_training_reaches_only_the_decoder():
    from flowmap_convert.finetuning.common import Context, mf_target
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.trainer import set_trainable

    model = rae_model()
    set_trainable(model, "decoder")
    x, v, t, r, y = batch(model)
    ctx = Context(Calls(model, decoder_only=True), Recipe(train="decoder"), model.config.num_classes)
    u, u_tgt, _ = mf_target(ctx, x, t, r, y, v)
    (u - u_tgt).pow(2).sum().backward()
    net = model.net
    assert all(p.grad is None for p in net.blocks[0].parameters())  # encoder block on t: frozen, not run with grad
    assert net.blocks[2].adaLN_modulation[1].weight.grad.abs().sum() > 0  # encoder block on r: decoder side
    assert net.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0 and net.final_layer.linear.weight.grad.abs().sum() > 0
