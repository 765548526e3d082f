"""MCG-NJU's DDT: official-equivalence of the converted flow map and of few-step sampling, the split at DDT's own
encoder / decoder boundary, detection, and Lightning checkpoints read through the real loader from a Hub cache."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import random_xty
from flowmap_convert.adapters import FAMILIES, choose_family, load_source
from flowmap_convert.adapters.interface import LoadOptions
from hubcache import add_repo, run_cli, torch_bytes
from mcg_ddt_reference import ddt_forward, euler_sample, random_ddt_sd

from flowmap_convert.errors import FlowmapError

HID, HEADS, NB, NE, C, P, K, SIDE = 32, 4, 5, 3, 4, 2, 10, 8
OPTS = LoadOptions(encoder_depth=NE, input_size=SIDE)


def inputs(seed=1, b=3):
    return random_xty(C, SIDE, K, seed, b)


def official_u(sd, x, t, y, r=None, ne=NE, heads=HEADS):
    """The official velocity in canonical terms: DDT time 1 - t, output x0 - eps negated (docs/conventions.md)."""
    return -ddt_forward(sd, x, 1 - t, y, heads, ne, t_dec=None if r is None else 1 - r)


def lightning_ckpt(ema: dict, model: dict) -> dict:
    """What DDT's LightningModel saves: the module's state_dict with its child names, plus Lightning's bookkeeping."""
    state = {"ema_denoiser." + k: v for k, v in ema.items()}
    state.update({"denoiser." + k: v for k, v in model.items()})
    state["diffusion_trainer.proj.0.weight"] = torch.zeros(3, 3)  # REPA projector: left unread
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3}}}},
        "callbacks": {
            "CheckpointHook{'every_n_train_steps': 10000}": {
                "best_model_path": "",
                "kth_value": torch.tensor(float("inf")),
            }
        },
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0, 1]}]}],
        "lr_schedulers": [],
    }


def test_only_the_ddt_family_claims_ddt_weights_and_ddt_claims_no_other_family():
    sd = random_ddt_sd()
    assert [n for n, f in FAMILIES.items() if f.detect(sd)] == ["ddt"]
    assert choose_family(sd, {}) == ("ddt", "weights")
    from test_rae_family import ddt_state_dict  # RAE's DiT^DH shares the s_embedder / x_embedder names

    assert not FAMILIES["ddt"].detect(ddt_state_dict()) and FAMILIES["rae"].detect(ddt_state_dict())
    with pytest.raises(FlowmapError, match="not a DDT"):
        FAMILIES["ddt"].build(ddt_state_dict(), OPTS)


def test_velocity_equals_the_official_forward_at_every_depth():
    sd = random_ddt_sd(HID, HEADS, NB, C, P, K, seed=2)
    model = FAMILIES["ddt"].build(sd, OPTS)
    cfg = model.config
    assert (cfg.arch, cfg.num_blocks, cfg.num_heads, cfg.patch_size, cfg.input_size, cfg.extra) == (
        "mcg-ddt",
        NB,
        HEADS,
        P,
        SIDE,
        {"encoder_blocks": NE},
    )
    assert cfg.time_convention == "reversed" and cfg.latent.kind == "sd-vae" and cfg.latent.image_size == 8 * SIDE
    assert model.num_parameters() == sum(v.numel() for v in sd.values())  # no parameter added or dropped
    x, t, y = inputs()
    with torch.no_grad():
        ref = official_u(sd, x, t, y)
        assert ref.abs().max() > 0.1  # a real signal, not zeros
        assert (model.velocity(x, t, y) - ref).abs().max().item() <= 1e-5
        for depth in range(1, NB + 1):
            assert (model.with_depth(depth)(x, t, t, y) - ref).abs().max().item() <= 1e-5, depth


def test_the_default_split_is_ddts_boundary_and_its_decoder_sees_r():
    from flowmap_convert.config import default_depth

    sd = random_ddt_sd(HID, HEADS, NB, C, P, K, seed=3)
    model = FAMILIES["ddt"].build(sd, OPTS)

    assert default_depth(model.config) == NE
    x, t, y = inputs(seed=4)
    r = t * 0.3
    with torch.no_grad():
        u = model.with_depth(NE)(x, t, r, y)
        # the official network with only the decoder's time injection s = silu(te + s) moved to r
        assert (u - official_u(sd, x, t, y, r=r)).abs().max().item() <= 1e-5
        assert (u - official_u(sd, x, t, y)).abs().max().item() > 1e-3  # r matters
        deeper = model.with_depth(NE + 1)(x, t, r, y)  # one decoder block on t: differs from both
        assert (deeper - u).abs().max().item() > 1e-4


@pytest.mark.e2e
def test_cli_convert_then_u_equals_the_official_velocity(tmp_path):
    sd = random_ddt_sd(HID, HEADS, NB, C, P, K, seed=5)
    src = tmp_path / "ddt-3en2de-r64.pt"  # the name gives N_e = 3 and 64 px (8x8 latents)
    torch.save(sd, src)
    out = tmp_path / "ddt-fm"
    run = run_cli(["convert", str(src), "--out", str(out)], {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "3 encoder + 2 decoder blocks (from the name 3en2de)" in run.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["depth"] == NE and cfg["input_size"] == SIDE and cfg["provenance"]["family"] == "ddt"
    assert cfg["sampling"] == {"shift": 1.0, "cfg_scale": 2.0, "guidance_low": 0.0, "guidance_high": 0.7}
    from flowmap_convert.api import load

    back = load(str(out))
    x, t, y = inputs(seed=6)
    with torch.no_grad():
        ref = official_u(sd, x, t, y)
        for depth in (1, NE, NB):
            assert (back.with_depth(depth)(x, t, t, y) - ref).abs().max().item() <= 1e-5, depth


@pytest.mark.parametrize("nfe,cfg", [(1, 1.0), (4, 2.0), (5, 3.0)])
def test_few_step_sampling_equals_the_official_euler_sampler(nfe, cfg):
    """`flowmap sample`'s integrator and noise (sample_latents, NoiseBank) against DDT's EulerSampler, same noise."""
    from flowmap_convert.sampling import NoiseBank, SampleSettings, sample_latents

    sd = random_ddt_sd(HID, HEADS, NB, C, P, K, seed=7)
    model = FAMILIES["ddt"].build(sd, OPTS)
    lo, hi = model.config.sampling["guidance_low"], model.config.sampling["guidance_high"]
    settings = SampleSettings(nfe=nfe, cfg_scale=cfg, guidance_interval=(lo, hi), seed=3).resolve(model)
    assert settings.shift == 1.0
    y = torch.tensor([1, 9])
    noise = NoiseBank(3, range(2)).draw((C, SIDE, SIDE))
    lat = sample_latents(model, noise, y, settings)
    net = lambda x, t, y: ddt_forward(sd, x, t, y, HEADS, NE)  # noqa: E731
    with torch.no_grad():
        ref = euler_sample(net, noise, y, null=K, num_steps=nfe, guidance=cfg)  # guidance for DDT t in (0.3, 1)
    assert ref.abs().max() > 0.1
    assert (lat - ref).abs().max().item() <= 1e-5


def test_lightning_checkpoint_from_the_hub_cache_through_the_alias(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ema = random_ddt_sd(16, 2, 28, C, P, K, seed=8)  # 28 blocks: the released 22en6de split
    raw = random_ddt_sd(16, 2, 28, C, P, K, seed=9)
    add_repo(
        cache, "MCG-NJU/DDT-XL-22en6de-R256", {"model.ckpt": torch_bytes(lightning_ckpt(ema, raw)), "README.md": b"x"}
    )
    model, info = load_source("MCG-NJU/DDT")
    assert info["family"] == "ddt" and info["weights"] == "ema" and info["file"] == "model.ckpt"
    assert info["train_steps"] == 120 and info["revision"] == "a" * 40
    cfg = model.config
    assert (cfg.extra["encoder_blocks"], cfg.input_size, cfg.sampling["cfg_scale"], cfg.latent.repo) == (
        22,
        32,
        2.0,
        "stabilityai/sd-vae-ft-ema",
    )
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, C, 32, 32, generator=g), torch.tensor([0.2, 0.9]), torch.tensor([3, K])
    with torch.no_grad():
        assert (model.velocity(x, t, y) - official_u(ema, x, t, y, ne=22, heads=2)).abs().max().item() <= 1e-5
        other, info2 = load_source("MCG-NJU/DDT", weights="model")
        assert info2["weights"] == "model"
        assert (other.velocity(x, t, y) - official_u(raw, x, t, y, ne=22, heads=2)).abs().max().item() <= 1e-5


def test_lightning_weight_selection_and_its_errors():
    from flowmap_convert.adapters.checkpoint import select_weights

    sd = {"a.weight": torch.ones(2)}
    ckpt = {"state_dict": {"ema_denoiser.a.weight": torch.ones(2), "diffusion_trainer.b": torch.zeros(1)}}
    got, used, _ = select_weights(ckpt)
    assert used == "ema" and list(got) == ["a.weight"]
    with pytest.raises(FlowmapError, match=r"no .model. weights .*ema \(ema_denoiser\.\*\)\); pass `weights` ema"):
        select_weights(ckpt, "model")
    got, used, _ = select_weights({"denoiser." + k: v for k, v in sd.items()})  # a bare Lightning state_dict
    assert used == "model" and list(got) == ["a.weight"]


def test_nothing_guessed_silently_about_the_split(tmp_path):
    sd = random_ddt_sd(HID, HEADS, NB, C, P, K, seed=10)
    with pytest.raises(FlowmapError, match=r"5 blocks and nothing says .* pass `encoder_depth`"):
        FAMILIES["ddt"].build(sd, LoadOptions(input_size=SIDE))
    with pytest.raises(FlowmapError, match="named 22en6de but holds 5 blocks"):
        FAMILIES["ddt"].build(sd, LoadOptions(what=str(tmp_path / "DDT-XL-22en6de-R256" / "x.ckpt")))
    with pytest.raises(FlowmapError, match="out of range for a DDT with 5 blocks"):
        FAMILIES["ddt"].build(sd, LoadOptions(encoder_depth=5, input_size=SIDE))
    with pytest.raises(FlowmapError, match="4 heads, not 8"):
        FAMILIES["ddt"].build(sd, dataclasses.replace(OPTS, num_heads=8))


@pytest.mark.parametrize("depth", [NE - 1, NE, NE + 1])
def test_decoder_only_u_and_dudt_equal_the_whole_model(depth):
    """Decoder-only fine-tuning runs encode once without grad: its u and du/dt (JVP) must be the whole model's."""
    from torch.func import jvp

    from flowmap_convert.finetuning.common import Calls

    model = FAMILIES["ddt"].build(random_ddt_sd(HID, HEADS, NB, C, P, K, seed=11), OPTS).with_depth(depth)
    x, t, y = inputs(seed=12)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(13))
    r = t * 0.5
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x, t, y), r, y), model(x, t, r, y))
    u_ref = model(x, t, r, y).detach()
    _, dudt_ref = jvp(lambda x_, t_: model(x_, t_, r, y), (x, t), (v, torch.ones(3)))
    u_d, dudt_d = Calls(model, decoder_only=True).u_and_dudt_jvp(x, t, r, y, v)
    assert (u_d - u_ref).abs().max().item() <= 1e-5
    assert dudt_ref.abs().max().item() > 1e-3
    assert (dudt_d - dudt_ref).abs().max().item() <= 1e-5 * max(1.0, dudt_ref.abs().max().item())


def test_decoder_only_training_gives_every_trainable_parameter_a_gradient():
    """--train decoder on DDT's boundary: the encoder (and its s_embedder) is frozen, every trainable weight learns."""
    from flowmap_convert.finetuning.common import Calls, Context, mf_target
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.setup import set_trainable

    model = FAMILIES["ddt"].build(random_ddt_sd(HID, HEADS, NB, C, P, K, seed=14), OPTS).with_depth(NE)
    params = set_trainable(model, "decoder", loss="l2")
    x, t, y = inputs(seed=15)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(16))
    ctx = Context(Calls(model, decoder_only=True), Recipe(train="decoder"), K)
    u, u_tgt, _ = mf_target(ctx, x, t, t * 0.5, y, v)
    (u - u_tgt).pow(2).sum().backward()
    net = model.net
    assert not any(p.requires_grad for p in (*net.s_embedder.parameters(), *net.blocks[NE - 1].parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert net.blocks[NE].attn.qkv.weight.requires_grad and net.final_layer.linear.weight.requires_grad


def test_alias_offline_hint_and_revision(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FlowmapError, match=r"MCG-NJU/DDT-XL-22en6de-R256 is not in the local Hub cache .* unset HF_HUB_OFFLINE"
    ):
        load_source("MCG-NJU/DDT")
    old, new = random_ddt_sd(16, 2, 28, C, P, K, seed=17), random_ddt_sd(16, 2, 28, C, P, K, seed=18)
    add_repo(
        cache, "MCG-NJU/DDT-XL-22en6de-R256", {"model.ckpt": torch_bytes(lightning_ckpt(old, old))}, commit="b" * 40
    )
    add_repo(
        cache, "MCG-NJU/DDT-XL-22en6de-R256", {"model.ckpt": torch_bytes(lightning_ckpt(new, new))}, commit="c" * 40
    )
    model, info = load_source("MCG-NJU/DDT", revision="b" * 40)  # refs/main points at c...; --revision picks b...
    assert info["revision"] == "b" * 40
    assert torch.equal(model.net.blocks[0].attn.qkv.weight, old["blocks.0.attn.qkv.weight"])
    _, info = load_source("MCG-NJU/DDT")
    assert info["revision"] == "c" * 40


def test_the_512_px_release_is_read_from_its_repository_name(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = random_ddt_sd(16, 2, 28, C, P, K, seed=19)
    add_repo(cache, "MCG-NJU/DDT-XL-22en6de-R512", {"ckpts/last.ckpt": torch_bytes(lightning_ckpt(sd, sd))})
    model, info = load_source("MCG-NJU/DDT-XL-22en6de-R512")  # the repository's only weights file
    cfg = model.config
    assert info["family"] == "ddt" and info["file"] == "ckpts/last.ckpt"
    assert (cfg.input_size, cfg.latent.image_size, cfg.sampling["cfg_scale"], cfg.extra["encoder_blocks"]) == (
        64,
        512,
        3.0,
        22,
    )


def test_mcg_njus_plain_dit_shares_the_key_names_and_is_refused_not_guessed():
    """DDT's repository also has a plain DiT (`improved_dit.py`): DDT's keys without s_embedder. No family reads it,
    so detection must say so instead of handing it to a DiT-style family that shares the top-level names."""
    sd = {k: v for k, v in random_ddt_sd().items() if not k.startswith("s_embedder.")}
    assert not any(f.detect(sd) for f in FAMILIES.values())
    with pytest.raises(FlowmapError, match="no known model family matches this checkpoint"):
        choose_family(sd, {})


@pytest.mark.parametrize("bad", [None, "22", 0, 5, True])
def test_a_damaged_encoder_split_in_config_json_is_one_error(bad):
    from flowmap_convert.model import FlowMap

    cfg = FAMILIES["ddt"].build(random_ddt_sd(), OPTS).config
    extra = {} if bad is None else {"encoder_blocks": bad}
    with pytest.raises(FlowmapError, match=r"extra.encoder_blocks = .* must be an integer in \[1, 4\]"):
        FlowMap(cfg.replace(extra=extra))
