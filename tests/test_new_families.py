"""LightningDiT, REPA-E and their LDM VAEs: tiny random instances against independent references of the official code.

References (tests/reference_models.py) re-derive LightningDiT.forward, transport's Euler ODE sampler, REPA-E's
euler_sampler and the LDM AutoencoderKL from the official repositories (docs/checkpoints.md); nothing there imports
flowmap_convert.
"""

from __future__ import annotations

import math
import os

import pytest
import reference_models as R
import torch
from conftest import random_xty
from dit_reference import dit_block_sd, dit_stem_sd
from flowmap_convert.adapters import FAMILIES, choose_family
from flowmap_convert.adapters.interface import LoadOptions
from hubcache import add_repo, run_cli, torch_bytes

from flowmap_convert.errors import FlowmapError

C, SIDE, D, HEADS, N, K = 32, 4, 32, 2, 3, 10


def lightning_sd(seed=0, patch=1, rope=True, swiglu=True, rmsnorm=True, qk=False, wo_shift=False, learn_sigma=False):
    """A tiny LightningDiT state dict with the official key set for the chosen block options, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.15  # noqa: E731
    grid = SIDE // patch
    out = C * (2 if learn_sigma else 1)
    sd = dit_stem_sd(r, D, C, patch, out, K, pos_embed=lambda: torch.from_numpy(R.sincos_2d(D, grid)).float()[None])
    if rmsnorm:
        sd["final_layer.norm_final.weight"] = 1 + r(D)
    if rope:
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = R.rope_tables(D // HEADS, grid)
    hid = int(4 * D)
    for i in range(N):
        p = f"blocks.{i}."
        sd.update(dit_block_sd(r, p, D, modulations=4 if wo_shift else 6))
        if rmsnorm:
            sd[p + "norm1.weight"], sd[p + "norm2.weight"] = 1 + r(D), 1 + r(D)
        if swiglu:
            sw = int(2 / 3 * hid)
            sd.update({p + "mlp.w12.weight": r(2 * sw, D), p + "mlp.w12.bias": r(2 * sw)})
            sd.update({p + "mlp.w3.weight": r(D, sw), p + "mlp.w3.bias": r(D)})
        else:
            sd.update({p + "mlp.fc1.weight": r(hid, D), p + "mlp.fc1.bias": r(hid)})
            sd.update({p + "mlp.fc2.weight": r(D, hid), p + "mlp.fc2.bias": r(D)})
        if qk:
            hd = D // HEADS
            sd[p + "attn.q_norm.weight"], sd[p + "attn.k_norm.weight"] = 1 + r(hd), 1 + r(hd)
            if not rmsnorm:
                sd[p + "attn.q_norm.bias"], sd[p + "attn.k_norm.bias"] = r(hd), r(hd)
    return sd


def repa_sit_sd(seed=0, channels=4, side=4, patch=1, bn=True):
    """REPA-E's SiT keys (REPA's SiT + projectors + bn), random values; bn stats far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.15  # noqa: E731
    grid = side // patch
    pos = lambda: torch.from_numpy(R.sincos_2d(D, grid)).float()[None]  # noqa: E731
    sd = dit_stem_sd(r, D, channels, patch, channels, K, pos)
    sd["projectors.0.0.weight"], sd["projectors.0.0.bias"] = r(16, D), r(16)
    for i in range(N):
        sd.update(dit_block_sd(r, f"blocks.{i}.", D, mlp_hidden=4 * D))
    if bn:
        sd["bn.running_mean"] = torch.randn(channels, generator=g)
        sd["bn.running_var"] = torch.rand(channels, generator=g) * 3 + 0.2
        sd["bn.num_batches_tracked"] = torch.tensor(1234, dtype=torch.int64)
    return sd


def repa_sit_velocity(sd, x, t, y):
    """REPA-E SiT.inference(x, t, y): REPA's SiT (LayerNorm blocks, GELU MLP) in REPA's time, written out plainly."""
    emb = _lin_t(sd, t) + sd["y_embedder.embedding_table.weight"][y]
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    h = torch.nn.functional.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    for i in range(N):
        h = R.lightning_block(h, emb, sd, f"blocks.{i}.", HEADS, None)  # no RMSNorm / SwiGLU keys: SiT's block
    shift, scale = R._lin(torch.nn.functional.silu(emb), sd, "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    out = R._lin(R._ln(h) * (1 + scale) + shift, sd, "final_layer.linear")
    b, side, c = x.shape[0], x.shape[-1] // p, out.shape[-1] // (p * p)
    return out.reshape(b, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, side * p, side * p)


def _lin_t(sd, t):
    f = torch.nn.functional
    return R._lin(f.silu(R._lin(R.sinusoid(t, 128), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")


def ldm_vae_sd(seed=0, z=4, widths=(32, 64), attn_last=True):
    """A tiny LDM AutoencoderKL (encoder + decoder, 2 levels = f2, one ResNet per level, attention on the last)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {}

    def conv(name, cin, cout, k=3):
        sd[name + ".weight"], sd[name + ".bias"] = r(cout, cin, k, k), r(cout)

    def gn(name, ch):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(ch), r(ch)

    def res(pre, cin, cout):
        gn(pre + "norm1", cin)
        conv(pre + "conv1", cin, cout)
        gn(pre + "norm2", cout)
        conv(pre + "conv2", cout, cout)
        if cin != cout:
            conv(pre + "nin_shortcut", cin, cout, 1)

    def attn(pre, ch):
        gn(pre + "norm", ch)
        for n in ("q", "k", "v", "proj_out"):
            conv(pre + n, ch, ch, 1)

    base, last = widths[0], widths[-1]
    conv("encoder.conv_in", 3, base)
    cin = base
    for lv, w in enumerate(widths):
        res(f"encoder.down.{lv}.block.0.", cin, w)
        cin = w
        if attn_last and lv == len(widths) - 1:
            attn(f"encoder.down.{lv}.attn.0.", w)
        if lv != len(widths) - 1:
            conv(f"encoder.down.{lv}.downsample.conv", w, w)
    for m in ("encoder.mid.", "decoder.mid."):
        res(m + "block_1.", last, last)
        attn(m + "attn_1.", last)
        res(m + "block_2.", last, last)
    gn("encoder.norm_out", last)
    conv("encoder.conv_out", last, 2 * z)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", z, last)
    cin = last
    for lv in reversed(range(len(widths))):
        w = widths[lv]
        for j in range(2):
            res(f"decoder.up.{lv}.block.{j}.", cin, w)
            cin = w
            if attn_last and lv == len(widths) - 1:
                attn(f"decoder.up.{lv}.attn.{j}.", w)
        if lv != 0:
            conv(f"decoder.up.{lv}.upsample.conv", w, w)
    gn("decoder.norm_out", widths[0])
    conv("decoder.conv_out", widths[0], 3)
    sd["loss.logvar"] = torch.zeros(())  # training-only tensors a release may carry: ignored
    return sd


def inputs(seed=1, b=3, channels=C, side=SIDE):
    return random_xty(channels, side, K, seed, b)


def flowmap_sample(source: str, nfe: int, **options):
    """`flowmap sample`'s path (load, Sampler, per-sample noise bank) with latents kept: ((noise, latents), labels)."""
    from flowmap_convert.api import load
    from flowmap_convert.decoders import IdentityDecoder
    from flowmap_convert.sampling import NoiseBank, sample

    model = load(source, **options)
    _, latents, labels, s = sample(
        model, nfe=nfe, classes=[0, 7, 3], seed=4, decoder=IdentityDecoder(model.config.latent), return_latents=True
    )
    cfg = model.config
    noise = NoiseBank(s.seed, range(3)).draw((cfg.in_channels, cfg.input_size, cfg.input_size))
    return (noise, latents), labels


# ------------------------------------------------------------------------------------------------ LightningDiT
VARIANTS = {
    "released": {},
    "qknorm-wo_shift": {"qk": True, "wo_shift": True},
    "patch2-layernorm-gelu": {"patch": 2, "rmsnorm": False, "swiglu": False, "qk": True},
    "learn_sigma": {"learn_sigma": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lightningdit_velocity_equals_the_official_forward_at_every_depth(variant):
    opts = VARIANTS[variant]
    sd = lightning_sd(**opts)
    assert choose_family(sd, {"name": "x.pt"})[0] == "lightningdit"  # its own keys: no other family claims them
    model = FAMILIES["lightningdit"].build(sd, LoadOptions())
    cfg = model.config
    assert (cfg.arch, cfg.time_convention, cfg.num_heads, cfg.num_blocks, cfg.patch_size) == (
        "lightningdit",
        "reversed",
        HEADS,
        N,
        opts.get("patch", 1),
    )
    assert cfg.extra["wo_shift"] == opts.get("wo_shift", False) and cfg.extra["swiglu"] == opts.get("swiglu", True)
    assert cfg.sampling["shift"] == pytest.approx(1 / 0.3) and cfg.latent.kind == "ldm-vae"
    x, t, y = inputs()
    with torch.no_grad():
        official = R.lightningdit_forward(sd, x, 1 - t, y, HEADS)  # SiT time, data - noise
        for depth in range(1, N + 1):
            u = model.with_depth(depth)(x, t, t, y)
            assert (u + official).abs().max().item() <= 1e-5, depth  # canonical u = -(data - noise)
        r = t * 0.4
        split = model.with_depth(2)(x, t, r, y)
        ref = R.lightningdit_forward(sd, x, 1 - t, y, HEADS, r=1 - r, depth=2)
        assert (split + ref).abs().max().item() <= 1e-5  # blocks[2:] and the head see r
        assert (split - model.with_depth(2)(x, t, t, y)).abs().max().item() > 1e-3


@pytest.mark.e2e
def test_lightningdit_convert_cli_then_official_sampler(tmp_path):
    """`flowmap convert` of a file, then flowmap's Euler equals transport's ODE sampler (shift 0.3) with the same noise."""
    from flowmap_convert.model import read_model_dir

    sd = lightning_sd(seed=5)
    src = tmp_path / "lightningdit-xl-imagenet256-800ep.pt"
    torch.save({"ema": sd, "model": sd}, src)
    out = tmp_path / "fm"
    run = run_cli(["convert", str(src), "--out", str(out), "--depth", "2"], {**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "family lightningdit" in run.stderr
    model = read_model_dir(out)
    assert model.config.depth == 2 and model.config.sampling["source_guidance"]["cfg_scale"] == 6.7
    (noise, ours), y = flowmap_sample(str(src), nfe=3)  # a velocity model: `flowmap sample` of the source file
    points = 4  # their num_sampling_steps counts grid points: 3 Euler steps
    with torch.no_grad():
        ref = R.lightningdit_euler(sd, noise, y, HEADS, points, 0.3)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_lightningdit_with_sit_keys_is_never_guessed():
    """Every option off = SiT's exact keys: weights alone never pick LightningDiT; a hint or --family does."""
    sd = lightning_sd(rope=False, swiglu=False, rmsnorm=False)
    assert not FAMILIES["lightningdit"].detect(sd)
    assert choose_family(sd, {"name": "last.pt"})[0] != "lightningdit"
    assert choose_family(sd, {"name": "lightningdit-b.pt"})[0] == "lightningdit"
    assert choose_family(sd, {"name": "x.pt", "family_hint": "lightningdit"})[0] == "lightningdit"
    model = FAMILIES["lightningdit"].build(
        sd, LoadOptions(num_heads=HEADS)
    )  # no RoPE / QK-norm table: heads not stored
    x, t, y = inputs()
    with torch.no_grad():
        assert (model(x, t, t, y) + R.lightningdit_forward(sd, x, 1 - t, y, HEADS)).abs().max().item() <= 1e-5
    with pytest.raises(FlowmapError, match="repa-e"):
        FAMILIES["lightningdit"].build({**sd, "bn.running_mean": torch.zeros(C)}, LoadOptions())


# ------------------------------------------------------------------------------------------------ REPA-E
@pytest.mark.parametrize("channels,patch", [(4, 1), (32, 2)])
def test_repae_velocity_and_sampler_equal_the_official(channels, patch, tmp_path):
    from flowmap_convert.api import convert

    sd = repa_sit_sd(channels=channels, patch=patch)
    name = "sit-repae-sdvae" if channels == 4 else "sit-ldm-e2e-vavae"
    src = tmp_path / f"{name}-0400000.pt"
    torch.save({"ema": sd, "model": sd, "vae": {"x": torch.zeros(1)}}, src)
    assert choose_family(sd, {"name": "0400000.pt"})[0] == "repa-e"
    assert not FAMILIES["repa"].detect(sd) and not FAMILIES["sit"].detect(sd)
    x, t, y = inputs(channels=channels)
    with torch.no_grad():
        official = repa_sit_velocity(sd, x, t, y)
        converted = convert(str(src), num_heads=HEADS)  # REPA's SiT stores no head count
        for depth in range(1, N + 1):
            model = converted.with_depth(depth)
            assert (model(x, t, t, y) - official).abs().max().item() <= 1e-5, depth
    lat = model.config.latent
    assert lat.kind == "ldm-vae" and lat.repo == ("REPA-E/e2e-sdvae" if channels == 4 else "REPA-E/e2e-vavae")
    std = sd["bn.running_var"].double().sqrt()
    assert lat.extra["channel_std"] == pytest.approx(std.tolist()) and model.config.sampling["shift"] == 1.0
    assert model.config.sampling["source_guidance"]["release"] == name
    (noise, ours), y = flowmap_sample(str(src), nfe=3, num_heads=HEADS)
    with torch.no_grad():
        ref = R.repae_euler(lambda a, b, c: repa_sit_velocity(sd, a, b, c), noise, y, 3)
    assert (ours.double() - ref).abs().max().item() <= 1e-5


def test_repae_bn_is_checked():
    sd = repa_sit_sd()
    sd["bn.running_var"] = -sd["bn.running_var"]
    with pytest.raises(FlowmapError, match="positive"):
        FAMILIES["repa-e"].build(sd, LoadOptions())


# ------------------------------------------------------------------------------------------------ LDM VAE
@pytest.mark.parametrize("attn_last", [True, False])
def test_ldm_vae_decodes_and_encodes_like_the_official(attn_last, tmp_path):
    from flowmap_convert.config import LatentSpace
    from flowmap_convert.decoders import get_decoder

    sd = ldm_vae_sd(attn_last=attn_last)
    (tmp_path / "vae").mkdir()
    torch.save({"state_dict": sd}, tmp_path / "vae" / "vae-f2.pt")
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "vae" / "latents_stats.pt")
    latent = LatentSpace(
        kind="ldm-vae",
        channels=4,
        size=4,
        image_size=8,
        repo=str(tmp_path / "vae"),
        extra={"stats": "latents_stats.pt"},
    )
    dec = get_decoder(latent)  # the checkpoint is picked from the directory (the stats file is skipped)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        official = R.ldm_decode(sd, z * std + mean)  # LightningDiT: samples * std + mean, then vae.decode
        assert (dec.decode(z) - official).abs().max().item() <= 1e-5
        img = torch.rand(2, 3, 8, 8) * 2 - 1
        ref = (R.ldm_encode_mean(sd, img) - mean) / std
        assert (dec.encode(img, sample=False) - ref).abs().max().item() <= 1e-5


def test_ldm_vae_scale_bias_stats_and_inline_stats(tmp_path):
    from flowmap_convert.config import LatentSpace
    from flowmap_convert.decoders import get_decoder

    sd = ldm_vae_sd(seed=4)
    torch.save(sd, tmp_path / "e2e-sdvae-400k.pt")
    scale, bias = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(1, 4, 1, 1)
    torch.save({"latents_scale": scale, "latents_bias": bias}, tmp_path / "e2e-sdvae-400k-latents-stats.pt")
    z = torch.randn(2, 4, 4, 4)
    official = R.ldm_decode(sd, z / scale + bias)  # REPA-E denormalize_latents, then vae.decode
    for extra in (
        {"checkpoint": "e2e-sdvae-400k.pt", "stats": "e2e-sdvae-400k-latents-stats.pt"},
        {"channel_mean": bias.flatten().tolist(), "channel_std": (1 / scale).flatten().tolist()},
    ):
        latent = LatentSpace(kind="ldm-vae", channels=4, size=4, image_size=8, repo=str(tmp_path), extra=extra)
        with torch.no_grad():
            assert (get_decoder(latent).decode(z) - official).abs().max().item() <= 1e-5
    bad = LatentSpace(
        kind="ldm-vae", channels=32, size=4, image_size=8, repo=str(tmp_path), extra={"checkpoint": "e2e-sdvae-400k.pt"}
    )
    with pytest.raises(FlowmapError, match="latent channels"):
        get_decoder(bad)
    assert math.isfinite(float(official.abs().max()))


# ------------------------------------------------------------------------------------------------ aliases, offline
@pytest.mark.e2e
def test_lightningdit_alias_converts_and_samples_through_va_vae_offline(tmp_path, offline_hub):
    import json

    import numpy as np

    cache, env = offline_hub
    sd = lightning_sd(seed=7)
    add_repo(
        cache,
        "hustvl/lightningdit-xl-imagenet256-800ep",
        {"lightningdit-xl-imagenet256-800ep.pt": torch_bytes({"model": sd, "ema": sd})},
    )
    vae = ldm_vae_sd(seed=8, z=C)
    stats = {"mean": torch.randn(1, C, 1, 1), "std": torch.rand(1, C, 1, 1) + 0.5}
    add_repo(
        cache,
        "hustvl/vavae-imagenet256-f16d32-dinov2",
        {
            "vavae-imagenet256-f16d32-dinov2.pt": torch_bytes({"state_dict": vae}),
            "latents_stats.pt": torch_bytes(stats),
        },
    )
    out = tmp_path / "ldit"
    r = run_cli(["convert", "hustvl/LightningDiT", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "lightningdit" and cfg["depth"] == 2 and cfg["latent"]["kind"] == "ldm-vae"
    assert cfg["provenance"]["family"] == "lightningdit" and cfg["sampling"]["shift"] == pytest.approx(1 / 0.3)
    r = run_cli(
        ["sample", str(out), "--nfe", "1", "-n", "2", "--classes", "1,2", "--npz", "--out", str(tmp_path / "s")], env
    )
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 2 * SIDE, 2 * SIDE, 3) and arr.dtype == np.uint8  # the tiny VAE is f2
    # the same latents through the reference decode: the images are the VAE's, with the stats undone
    from flowmap_convert.api import load
    from flowmap_convert.sampling import sample

    imgs, lat, _, _ = sample(load(str(out)), nfe=1, classes=[1, 2], seed=0, return_latents=True)
    ref = R.ldm_decode(vae, lat * stats["std"] + stats["mean"])
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(imgs.astype(int) - ref_u8.astype(int)).max() <= 1


def test_repae_alias_picks_the_checkpoint_and_the_e2e_vae_offline(tmp_path, offline_hub):
    from flowmap_convert.adapters import load_source

    from flowmap_convert.sampling import sample

    cache, _ = offline_hub
    sd = repa_sit_sd(seed=9, channels=4)
    add_repo(
        cache,
        "REPA-E/sit-repae-sdvae",
        {"checkpoints/0400000.pt": torch_bytes({"ema": sd, "model": sd}), "args.json": b"{}"},
    )
    vae = ldm_vae_sd(seed=10, z=4)
    add_repo(
        cache,
        "REPA-E/e2e-sdvae",
        {"e2e-sdvae-400k.pt": torch_bytes(vae), "e2e-sdvae-400k-latents-stats.pt": torch_bytes({"x": torch.ones(1)})},
    )
    model, info = load_source("REPA-E/sit-repae-sdvae", num_heads=HEADS)
    assert info["family"] == "repa-e" and info["file"] == "checkpoints/0400000.pt"
    assert model.config.sampling["source_guidance"]["cfg_scale"] == 2.2
    imgs, lat, labels, _ = sample(model, nfe=2, classes=[3], seed=1, return_latents=True)
    mean = sd["bn.running_mean"].view(1, 4, 1, 1)
    scale = sd["bn.running_var"].rsqrt().view(1, 4, 1, 1)
    ref = R.ldm_decode(vae, lat / scale + mean)  # generate.py: denormalize_latents then vae.decode
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert imgs.shape == (1, 8, 8, 3) and abs(imgs.astype(int) - ref_u8.astype(int)).max() <= 1


def test_ldm_vae_without_level_attention_equals_diffusers_after_its_own_key_conversion(tmp_path):
    """A third implementation: diffusers' AutoencoderKL, loaded through diffusers' LDM -> diffusers key mapping."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from flowmap_convert.ldm_vae import AutoencoderKL

    sd = ldm_vae_sd(seed=12, attn_last=False)  # SD-VAE's f8d4 layout: attention only in the middle blocks
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
    }
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint({k: v for k, v in sd.items() if "loss" not in k}, config))
    ours = AutoencoderKL.from_state_dict(sd, "the test VAE")
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(13))
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max().item() <= 1e-5
        mean, logvar = ours.encode_moments(img)
        post = theirs.encode(img).latent_dist
        assert (mean - post.mean).abs().max().item() <= 1e-5
        assert (logvar - post.logvar).abs().max().item() <= 1e-5
