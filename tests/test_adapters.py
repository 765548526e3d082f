"""Adapters: every family converts to a flow map whose r = t output is the SOURCE velocity (independent reference)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from dit_reference import make_sd, ref_forward, ref_logvar, ref_sit_velocity
from flowmap_convert.adapters import LoadOptions, load_source
from safetensors.torch import save_file

import flowmap_convert as fm
from flowmap_convert.errors import FlowmapError
from flowmap_convert.io import export

TOL = 1e-5


def inputs(b=3, c=4, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g)
    t = torch.tensor([0.9, 0.37, 0.05])[:b]
    y = torch.tensor([0, 7, classes])[:b]  # the last one is the null label
    return x, t, y


def maxerr(a, b):
    return (a - b).abs().max().item()


def save_pt(obj, path):
    torch.save(obj, path)
    return str(path)


# --------------------------------------------------------------------------------------------- REPA
def test_repa_training_dict_with_namespace_projectors_and_layernorm_qk(tmp_path, capsys):
    ema = make_sd(qk="layernorm", projectors=True, seed=1)
    raw = make_sd(qk="layernorm", projectors=True, seed=2)
    args = argparse.Namespace(
        model="SiT-B/2", enc_type="dinov2-vit-b", encoder_depth=2, proj_coeff=np.float64(0.5), num_classes=10
    )
    path = save_pt(
        {"model": raw, "ema": ema, "opt": {"state": {}}, "args": args, "steps": 4000}, tmp_path / "0004000.pt"
    )
    x, t, y = inputs()
    model, info = load_source(path, num_heads=4)
    err = capsys.readouterr().err
    assert "projectors" in err and "family repa" in err and "weights: ema" in err
    assert (
        info["weights"] == "ema"
        and info["family"] == "repa"
        and len(info["sha256"]) == 64
        and info["train_steps"] == 4000
    )
    assert (
        model.config.qk_norm == "layernorm"
        and model.config.latent.kind == "sd-vae"
        and model.config.latent.image_size == 64
    )
    v_src = ref_forward(ema, x, t, y, heads=4, qk="layernorm")
    for depth in (1, 2, 3, 4):
        conv = fm.convert(path, depth=depth, num_heads=4)
        assert conv.config.depth == depth
        assert maxerr(conv(x, t, t, y), v_src) <= TOL
    # --weights model picks the other tensors
    m2, info2 = load_source(path, num_heads=4, weights="model")
    assert info2["weights"] == "model"
    assert maxerr(m2.velocity(x, t, y), ref_forward(raw, x, t, y, heads=4, qk="layernorm")) <= TOL


def test_repa_euler_step_matches_source_sampler():
    sd = make_sd(seed=3)
    x, t, y = inputs()
    dt = 0.125
    from flowmap_convert.adapters import FAMILIES

    model = FAMILIES["repa"].build(dict(sd), LoadOptions(num_heads=4)).with_depth(3)
    # REPA's Euler sampler: x_next = x_cur + (t_next - t_cur) v, from t down to t - dt.
    ref_next = x + ((t - dt) - t).view(-1, 1, 1, 1) * ref_forward(sd, x, t, y, heads=4)
    ours = x + ((t - dt) - t).view(-1, 1, 1, 1) * model(x, t, t, y)  # Euler: x_r = x_t + (r - t) u(x_t, t, t)
    assert maxerr(ours, ref_next) <= TOL


def test_repa_legacy_decoder_blocks(tmp_path):
    sd = make_sd(blocks=4, seed=4)
    legacy = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i >= 1:  # encoder_depth 1: blocks 1.. were named decoder_blocks 0..
                k = f"decoder_blocks.{i - 1}." + k.split(".", 2)[2]
        legacy[k] = v
    x, t, y = inputs()
    path = save_pt(
        {"ema": legacy, "args": argparse.Namespace(encoder_depth=1, enc_type="dinov2-vit-b")}, tmp_path / "legacy.pt"
    )
    model, _ = load_source(path, num_heads=4)
    assert maxerr(model.velocity(x, t, y), ref_forward(sd, x, t, y, heads=4)) <= TOL
    plain = save_pt(legacy, tmp_path / "legacy_plain.pt")
    model, _ = load_source(plain, num_heads=4, family="repa", encoder_depth=1)
    assert maxerr(model.with_depth(2)(x, t, t, y), ref_forward(sd, x, t, y, heads=4)) <= TOL
    with pytest.raises(FlowmapError, match="`encoder_depth`"):
        load_source(plain, num_heads=4, family="repa")
    with pytest.raises(FlowmapError, match="`encoder_depth` 1"):
        load_source(plain, num_heads=4, family="repa", encoder_depth=2)


def test_prefixes_are_stripped_and_default_heads_from_hidden(tmp_path):
    sd = make_sd(seed=5)
    wrapped = {("module._orig_mod." + k): v for k, v in sd.items()}
    path = tmp_path / "wrapped.safetensors"
    save_file(wrapped, str(path))
    x, t, y = inputs()
    model, info = load_source(str(path))
    assert model.config.num_heads == 1  # hidden 64 is not a standard size: 64-d heads
    assert info["weights"] == "plain"
    assert maxerr(model.velocity(x, t, y), ref_forward(sd, x, t, y, heads=1)) <= TOL


# --------------------------------------------------------------------------------------------- SiT
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_sit_learn_sigma_reversed_time_at_every_depth(tmp_path, fmt, capsys):
    sd = make_sd(learn_sigma=True, seed=6)
    path = tmp_path / f"SiT-XL-2-256x256.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    x, t, y = inputs()
    model, info = load_source(str(path), num_heads=4)
    assert "family sit" in capsys.readouterr().err
    assert model.config.time_convention == "reversed" and model.config.learn_sigma
    v_sit = ref_sit_velocity(sd, x, 1 - t, y, heads=4)  # SiT time: t_sit = 1 - t, v_sit = x0 - eps
    for depth in (1, 3, 4):
        conv = fm.convert(str(path), depth=depth, num_heads=4)
        assert maxerr(conv(x, t, t, y), -v_sit) <= TOL


def test_sit_one_euler_step_matches_the_source_direction(tmp_path):
    sd = make_sd(learn_sigma=True, seed=7)
    path = save_pt(sd, tmp_path / "sit.pt")
    model = fm.convert(path, depth=2, num_heads=4, family="sit")  # a bare learn_sigma file also fits DiT
    x, _, y = inputs()
    t_sit, dt = torch.tensor([0.2, 0.5, 0.7]), 0.1
    src_next = x + dt * ref_sit_velocity(sd, x, t_sit, y, heads=4)  # SiT's ODE: t_sit -> t_sit + dt with +v_sit
    t, r = 1 - t_sit, 1 - (t_sit + dt)
    ours = x + (r - t).view(-1, 1, 1, 1) * model(x, t, t, y)
    assert maxerr(ours, src_next) <= TOL


def test_sit_training_args_make_a_plain_velocity_head_sit(tmp_path, capsys):
    sd = make_sd(seed=8)  # no learn_sigma: weights alone read as REPA (canonical)
    args = argparse.Namespace(model="SiT-B/2", path_type="Linear", prediction="velocity")
    path = save_pt({"ema": sd, "model": sd, "args": args}, tmp_path / "0001000.pt")
    model, info = load_source(path, num_heads=4)
    assert info["family"] == "sit" and model.config.time_convention == "reversed"
    x, t, y = inputs()
    assert maxerr(model.velocity(x, t, y), -ref_sit_velocity(sd, x, 1 - t, y, heads=4)) <= TOL
    assert "family sit (weights + file name / training args)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- DMF
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_dmf_plain_dict_with_logvar_and_rms_qk(tmp_path, fmt):
    sd = make_sd(qk="rms", logvar=True, seed=9)
    path = tmp_path / f"dmf_tiny.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    x, t, y = inputs()
    r = torch.tensor([0.5, 0.1, 0.0])
    model, info = load_source(str(path))
    assert info["family"] == "dmf" and model.config.num_heads == 4  # from the QK-norm width
    assert model.config.conditioning == "decoupled" and model.config.depth == 3 and model.config.logvar  # 2/3 of 4
    for depth in (1, 2, 4):
        conv = fm.convert(str(path), depth=depth)
        assert maxerr(conv(x, t, t, y), ref_forward(sd, x, t, y, heads=4, qk="rms")) <= TOL
        assert maxerr(conv(x, t, r, y), ref_forward(sd, x, t, y, heads=4, qk="rms", r_src=r, depth=depth)) <= TOL
        u, lv = conv(x, t, r, y, return_logvar=True)
        assert maxerr(lv, ref_logvar(sd, t, r)) <= TOL
    # DMF's own one-step update x_r = x_t - (t - r) u(x_t, t, r)
    conv = fm.convert(str(path), depth=2)
    ref_next = x - (t - r).view(-1, 1, 1, 1) * ref_forward(sd, x, t, y, heads=4, qk="rms", r_src=r, depth=2)
    assert maxerr(x + (r - t).view(-1, 1, 1, 1) * conv(x, t, r, y), ref_next) <= TOL


def test_dmf_depth_from_training_args(tmp_path):
    sd = make_sd(logvar=True, seed=10)
    path = save_pt(
        {"ema": sd, "model": sd, "args": argparse.Namespace(dmf_depth=1, model="DMFT-B/2")}, tmp_path / "0400000.pt"
    )
    model = fm.convert(path, num_heads=4)
    assert model.config.depth == 1
    assert fm.convert(path, depth=4, num_heads=4).config.depth == 4


# --------------------------------------------------------------------------------------------- exported
def test_exported_directory_round_trip(tmp_path):
    sd = make_sd(learn_sigma=True, seed=11)
    path = save_pt(sd, tmp_path / "sit.pt")
    conv = fm.convert(path, depth=3, num_heads=4, family="sit")  # a bare learn_sigma file also fits DiT
    out = export(conv, tmp_path / "out")
    x, t, y = inputs()
    loaded, info = load_source(str(out))
    assert info["family"] == "flowmap" and info["source_family"] == "sit" and info["file"] == "sit.pt"
    assert loaded.config.depth == 3 and loaded.config.time_convention == "reversed"
    assert maxerr(loaded(x, t, t, y), -ref_sit_velocity(sd, x, 1 - t, y, heads=4)) <= TOL
    for depth in (1, 4):
        assert maxerr(fm.convert(str(out), depth=depth)(x, t, t, y), -ref_sit_velocity(sd, x, 1 - t, y, heads=4)) <= TOL


# --------------------------------------------------------------------------------------------- strictness
def test_detection_and_shape_errors(tmp_path):
    sit = save_pt(make_sd(learn_sigma=True, seed=12), tmp_path / "sit.pt")
    with pytest.raises(FlowmapError, match="learn_sigma"):
        load_source(sit, family="repa", num_heads=4)
    with pytest.raises(FlowmapError, match="unknown `family`"):
        load_source(sit, family="nope")
    with pytest.raises(FlowmapError, match="does not divide"):
        load_source(sit, num_heads=5, family="sit")
    dmf = save_pt(make_sd(logvar=True, seed=13), tmp_path / "dmf.pt")
    with pytest.raises(FlowmapError, match="unexpected: logvar_linear"):
        load_source(dmf, family="sit", num_heads=4)
    other = save_pt({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(FlowmapError, match="no known model family"):
        load_source(other)
    with pytest.raises(FlowmapError, match="plain state dict"):
        load_source(sit, weights="ema")
    with pytest.raises(FlowmapError, match="no 'ema' weights"):
        load_source(save_pt({"model": make_sd(seed=1)}, tmp_path / "m.pt"), weights="ema")


def test_ambiguous_learn_sigma_needs_family_when_dit_is_registered(tmp_path):
    from flowmap_convert import adapters

    sd = make_sd(learn_sigma=True, seed=14)
    with pytest.raises(FlowmapError, match="`family` sit"):
        load_source(save_pt(sd, tmp_path / "renamed.pt"), num_heads=4)
    model, info = load_source(save_pt(sd, tmp_path / "SiT-B-2-256x256.pt"), num_heads=4)
    assert info["family"] == "sit"
    assert adapters.choose_family(sd, {"name": "DiT-XL-2-256x256.pt"})[0] == "dit"


def test_non_linear_or_non_velocity_training_args_are_refused(tmp_path):
    sd = make_sd(seed=15)
    cosine = save_pt(
        {"ema": sd, "args": argparse.Namespace(enc_type="dinov2-vit-b", path_type="cosine")}, tmp_path / "cos.pt"
    )
    with pytest.raises(FlowmapError, match="'cosine' path"):
        load_source(cosine, num_heads=4)
    noise = save_pt(
        {"ema": sd, "args": argparse.Namespace(model="SiT-B/2", path_type="Linear", prediction="noise")},
        tmp_path / "eps.pt",
    )
    with pytest.raises(FlowmapError, match="predicts 'noise'"):
        load_source(noise, num_heads=4)


def test_dmf_refuses_a_learn_sigma_head_and_detection_order_is_specific_first(tmp_path):
    from flowmap_convert.adapters import DETECTION_ORDER

    assert DETECTION_ORDER[:3] == ("dmf", "repa", "sit")
    path = save_pt(make_sd(learn_sigma=True, logvar=True, seed=16), tmp_path / "dmf_sigma.pt")
    with pytest.raises(FlowmapError, match="learn_sigma head"):
        load_source(path, num_heads=4)


def test_half_precision_files_load_as_fp32_and_frozen_tables_stay_frozen(tmp_path):
    sd = make_sd(seed=17)
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in sd.items()}, str(path))
    model, _ = load_source(str(path), num_heads=4)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    assert not model.net.pos_embed.requires_grad and model.net.blocks[0].attn.qkv.weight.requires_grad
    x, t, y = inputs()
    ref = ref_forward({k: v.half().float() for k, v in sd.items()}, x, t, y, heads=4)
    assert maxerr(model.velocity(x, t, y), ref) <= TOL


def test_a_dmf_file_without_logvar_is_read_as_dmf_when_named_so(tmp_path):
    sd = make_sd(seed=18)  # DMFT weights minus logvar_linear look exactly like a REPA SiT
    model, info = load_source(save_pt(sd, tmp_path / "dmf_xl_2_256.pt"), num_heads=4)
    assert info["family"] == "dmf" and model.config.conditioning == "decoupled" and not model.config.logvar
    x, t, y = inputs()
    r = torch.tensor([0.2, 0.2, 0.0])
    assert maxerr(model(x, t, r, y), ref_forward(sd, x, t, y, heads=4, r_src=r, depth=model.config.depth)) <= TOL
    _, info = load_source(save_pt(sd, tmp_path / "plain.pt"), num_heads=4)
    assert info["family"] == "repa"  # no name, no args: the canonical velocity reading
