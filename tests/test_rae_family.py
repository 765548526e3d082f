"""RAE DiT^DH and MF-RAE: strict loading of RAE's keys (docs/checkpoints.md), r = t equivalence with a plain reference forward, detection."""

from __future__ import annotations

import math

import pytest
import reference_models as R
import torch
import torch.nn.functional as F
from conftest import random_xty
from flowmap_convert.adapters import FAMILIES
from reference_models import ddt_forward, rope_tables

from flowmap_convert.errors import FlowmapError

C, SIDE, DE, DD, NE, ND, HE, HD, K = 8, 4, 32, 48, 3, 2, 2, 3, 10


def ddt_state_dict(meanflow: bool = False, seed: int = 0, qk_norm: bool = False, side: int = SIDE) -> dict:
    """A tiny DiT^DH checkpoint with exactly RAE's key set (plus MF-RAE's r_embedder), random values everywhere."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.15  # noqa: E731
    L = side * side
    sd = {
        "s_embedder.proj.weight": r(DE, C, 1, 1),
        "s_embedder.proj.bias": r(DE),
        "x_embedder.proj.weight": r(DD, C, 1, 1),
        "x_embedder.proj.bias": r(DD),
        "s_projector.weight": r(DD, DE),
        "s_projector.bias": r(DD),
        "y_embedder.embedding_table.weight": r(K + 1, DE),
        "pos_embed": r(1, L, DE),
        "final_layer.norm_final.weight": 1 + r(DD),
        "final_layer.linear.weight": r(C, DD),
        "final_layer.linear.bias": r(C),
        "final_layer.adaLN_modulation.1.weight": r(2 * DD, DD),
        "final_layer.adaLN_modulation.1.bias": r(2 * DD),
    }
    for emb in ("t_embedder",) + (("r_embedder",) if meanflow else ()):
        sd.update(
            {
                f"{emb}.W": torch.randn(256, generator=g),
                f"{emb}.mlp.0.weight": r(DE, 512),
                f"{emb}.mlp.0.bias": r(DE),
                f"{emb}.mlp.2.weight": r(DE, DE),
                f"{emb}.mlp.2.bias": r(DE),
            }
        )
    for name, d, h in (("enc", DE, HE), ("dec", DD, HD)):
        cos, sin = rope_tables(d // h, side)
        sd[f"{name}_feat_rope.freqs_cos"], sd[f"{name}_feat_rope.freqs_sin"] = cos, sin
    for i in range(NE + ND):
        d, h = (DE, HE) if i < NE else (DD, HD)
        hid = int(2 / 3 * 4 * d)
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(d),
                p + "norm2.weight": 1 + r(d),
                p + "attn.qkv.weight": r(3 * d, d),
                p + "attn.qkv.bias": r(3 * d),
                p + "attn.proj.weight": r(d, d),
                p + "attn.proj.bias": r(d),
                p + "mlp.w12.weight": r(2 * hid, d),
                p + "mlp.w12.bias": r(2 * hid),
                p + "mlp.w3.weight": r(d, hid),
                p + "mlp.w3.bias": r(d),
                p + "adaLN_modulation.1.weight": r(6 * d, d),
                p + "adaLN_modulation.1.bias": r(6 * d),
            }
        )
        if qk_norm:
            sd[p + "attn.q_norm.weight"], sd[p + "attn.k_norm.weight"] = 1 + r(d // h), 1 + r(d // h)
    return sd


def inputs(seed=1, b=3):
    return random_xty(C, SIDE, K, seed, b)


def test_rope_tables_match_the_released_shapes():
    cos, _ = rope_tables(72, 16)  # XL encoder: hd 72 -> [256, 72]
    assert cos.shape == (256, 72)
    assert rope_tables(128, 16)[0].shape == (256, 128)
    from flowmap_convert.ddt import VisionRope

    ours = VisionRope(72, 16)
    ref_cos, ref_sin = rope_tables(72, 16)
    assert torch.allclose(ours.freqs_cos, ref_cos, atol=1e-6) and torch.allclose(ours.freqs_sin, ref_sin, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rae_equals_the_reference_forward_at_every_depth(qk_norm):
    sd = ddt_state_dict(qk_norm=qk_norm)
    assert FAMILIES["rae"].detect(sd) and not FAMILIES["mf-rae"].detect(sd)
    model = FAMILIES["rae"].build(sd)
    cfg = model.config
    assert (cfg.arch, cfg.num_blocks, cfg.num_heads, cfg.extra["decoder_heads"], cfg.in_channels, cfg.input_size) == (
        "ddt",
        NE,
        HE,
        HD,
        C,
        SIDE,
    )
    assert cfg.qk_norm == ("rms" if qk_norm else "none") and cfg.time_convention == "canonical"
    assert cfg.sampling["shift"] == pytest.approx(math.sqrt(C * SIDE * SIDE / 4096))
    x, t, y = inputs()
    with torch.no_grad():
        ref = ddt_forward(sd, x, t, y, HE, HD)
        assert (model.velocity(x, t, y) - ref).abs().max().item() <= 1e-5
        for depth in range(1, NE + 1):
            u = model.with_depth(depth)(x, t, t, y)
            assert (u - ref).abs().max().item() <= 1e-5, depth


def test_rae_decoupled_head_sees_r():
    sd = ddt_state_dict(seed=3)
    model = FAMILIES["rae"].build(sd)
    x, t, y = inputs(seed=4)
    r = t * 0.3
    with torch.no_grad():
        full = model.with_depth(NE)(x, t, r, y)
        assert not torch.allclose(full, model.velocity(x, t, y), atol=1e-4)
        # depth N_e: encoder on t, head on r; the reference with the injection time swapped to r gives the same
        # the expected output, built by hand from the reference pieces
        te = lambda s: R.fourier(sd, "t_embedder", s)  # noqa: E731
        c = F.silu(te(t) + sd["y_embedder.embedding_table.weight"][y])
        s = (
            F.conv2d(x, sd["s_embedder.proj.weight"], sd["s_embedder.proj.bias"]).flatten(2).transpose(1, 2)
            + sd["pos_embed"]
        )
        for i in range(NE):
            s = R.ddt_block(s, c, sd, f"blocks.{i}.", HE, rope_tables(DE // HE, SIDE))
        s = R._lin(F.silu(te(r)[:, None] + s), sd, "s_projector")
        h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]).flatten(2).transpose(1, 2)
        for i in range(NE, NE + ND):
            h = R.ddt_block(h, s, sd, f"blocks.{i}.", HD, rope_tables(DD // HD, SIDE))
        shift, scale = R._lin(F.silu(s), sd, "final_layer.adaLN_modulation.1").chunk(2, -1)
        out = R._lin(R.rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift, sd, "final_layer.linear")
        assert (full - out.transpose(1, 2).reshape(x.shape)).abs().max().item() <= 1e-5


def test_mf_rae_is_a_meanflow_flow_map_matching_its_forward():
    sd = ddt_state_dict(meanflow=True, seed=5)
    assert FAMILIES["mf-rae"].detect(sd) and not FAMILIES["rae"].detect(sd)
    model = FAMILIES["mf-rae"].build({"ema": sd, "model": {}})  # training containers: 'ema' is used
    assert (
        model.config.conditioning == "meanflow" and model.config.is_flow_map and model.config.sampling["shift"] == 1.0
    )
    x, t, y = inputs(seed=6)
    r = t * torch.tensor([0.0, 0.5, 1.0])
    with torch.no_grad():
        ref = ddt_forward(sd, x, t, y, HE, HD, r=r)  # their forward(x, r, t, y)
        assert (model(x, t, r, y) - ref).abs().max().item() <= 1e-5
        ref_tt = ddt_forward(sd, x, t, y, HE, HD, r=t)
        assert (model.velocity(x, t, y) - ref_tt).abs().max().item() <= 1e-5
    with pytest.raises(FlowmapError, match="already a MeanFlow"):
        model.with_depth(2)


def test_rae_loading_is_strict():
    sd = ddt_state_dict()
    bad = dict(sd)
    bad.pop("t_embedder.W")  # the frozen Fourier table must come from the file
    with pytest.raises(FlowmapError, match="missing: t_embedder.W"):
        FAMILIES["rae"].build(bad)
    bad = dict(sd, **{"blocks.4.mlp.w3.bias": torch.zeros(DD + 1)})
    with pytest.raises(FlowmapError, match="shape mismatch"):
        FAMILIES["rae"].build(bad)
    with pytest.raises(FlowmapError, match="mf-rae"):
        FAMILIES["rae"].build(ddt_state_dict(meanflow=True))


def test_rae_export_round_trip(tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import read_model_dir

    model = FAMILIES["rae"].build(ddt_state_dict(seed=7)).with_depth(2)
    export(model, tmp_path / "m")
    back = read_model_dir(tmp_path / "m")
    x, t, y = inputs(seed=8)
    with torch.no_grad():
        assert torch.equal(back(x, t, t * 0.5, y), model(x, t, t * 0.5, y))
    assert back.config.latent.kind == "rae" and back.config.depth == 2
