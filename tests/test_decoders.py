"""Latent decoders: SD-VAE encode/decode (tiny random AutoencoderKL), RAE stats + ViT-MAE decoder, mismatch errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vae
from hubcache import add_repo, torch_bytes

from flowmap_convert.config import LatentSpace
from flowmap_convert.decoders import IMAGENET_MEAN, IMAGENET_STD, RAEDecoder, get_decoder
from flowmap_convert.errors import FlowmapError

# ------------------------------------------------------------------------------------------------ SD-VAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    return root, vae


def test_sd_vae_decode_and_encode_match_diffusers(vae_dir):
    root, vae = vae_dir
    lat = LatentSpace(
        kind="sd-vae", channels=4, size=8, image_size=16, repo=str(root), scale=0.18215, extra={"subfolder": "vae"}
    )
    dec = get_decoder(lat)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vae.decode(z / 0.18215).sample
        img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        mean = vae.encode(img).latent_dist.mean * 0.18215
    assert (dec.decode(z) - ref).abs().max().item() < 1e-5
    assert dec.decode(z).shape == (2, 3, 16, 16)
    assert (dec.encode(img, sample=False) - mean).abs().max().item() < 1e-5
    g = torch.Generator().manual_seed(3)
    s1, s2 = dec.encode(img, generator=g), dec.encode(img, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, dec.encode(img, sample=False))


def test_sd_vae_shape_mismatches_are_user_errors(vae_dir):
    root, _ = vae_dir
    with pytest.raises(FlowmapError, match="latent channels"):
        get_decoder(LatentSpace(kind="sd-vae", channels=8, size=8, repo=str(root), extra={"subfolder": "vae"}))
    dec = get_decoder(LatentSpace(kind="sd-vae", channels=4, size=8, repo=str(root), extra={"subfolder": "vae"}))
    with pytest.raises(FlowmapError, match="do not fit"):
        dec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(FlowmapError, match="could not load the SD-VAE"):
        get_decoder(LatentSpace(kind="sd-vae", channels=4, repo=str(root / "nope")))


# ------------------------------------------------------------------------------------------------ RAE
C, SIDE, DIM, LAYERS, HEADS, INTER, PATCH = 8, 4, 24, 2, 2, 40, 2


def rae_decoder_sd(seed=0, in_dim=C, patches=SIDE * SIDE) -> dict:
    """A tiny GeneralDecoder state dict with exactly RAE's decoder key names (docs/checkpoints.md)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {
        "decoder_embed.weight": r(DIM, in_dim),
        "decoder_embed.bias": r(DIM),
        "decoder_pos_embed": r(1, patches + 1, DIM),
        "trainable_cls_token": r(1, 1, DIM),
        "decoder_norm.weight": 1 + r(DIM),
        "decoder_norm.bias": r(DIM),
        "decoder_pred.weight": r(PATCH * PATCH * 3, DIM),
        "decoder_pred.bias": r(PATCH * PATCH * 3),
    }
    for i in range(LAYERS):
        p = f"decoder_layers.{i}."
        for n in ("query", "key", "value"):
            sd[p + f"attention.attention.{n}.weight"], sd[p + f"attention.attention.{n}.bias"] = r(DIM, DIM), r(DIM)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r(DIM, DIM), r(DIM)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(INTER, DIM), r(INTER)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(DIM, INTER), r(DIM)
        for n in ("layernorm_before", "layernorm_after"):
            sd[p + f"{n}.weight"], sd[p + f"{n}.bias"] = 1 + r(DIM), r(DIM)
    return sd


def reference_rae_decode(sd, stats, z, eps=1e-5, ln_eps=1e-12):
    """RAE decode written from docs/checkpoints.md: denormalise, ViT-MAE decoder, unpatchify, x * std + mean."""
    z = z * torch.sqrt(stats["var"].reshape(C, SIDE, SIDE) + eps) + stats["mean"].reshape(C, SIDE, SIDE)
    b = z.shape[0]
    x = F.linear(z.reshape(b, C, -1).transpose(1, 2), sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    x = torch.cat([sd["trainable_cls_token"].expand(b, -1, -1), x], 1) + sd["decoder_pos_embed"]
    for i in range(LAYERS):
        p = f"decoder_layers.{i}."
        lin = lambda h, n, p=p: F.linear(h, sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        h = F.layer_norm(x, (DIM,), sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"], ln_eps)
        q, k, v = [
            lin(h, f"attention.attention.{n}").reshape(b, -1, HEADS, DIM // HEADS).transpose(1, 2)
            for n in ("query", "key", "value")
        ]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), -1) @ v
        x = x + lin(a.transpose(1, 2).reshape(b, -1, DIM), "attention.output.dense")
        h = F.layer_norm(x, (DIM,), sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"], ln_eps)
        x = x + lin(F.gelu(lin(h, "intermediate.dense")), "output.dense")
    x = F.layer_norm(x, (DIM,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], ln_eps)
    logits = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    img = (
        logits.reshape(b, SIDE, SIDE, PATCH, PATCH, 3)
        .permute(0, 5, 1, 3, 2, 4)
        .reshape(b, 3, SIDE * PATCH, SIDE * PATCH)
    )
    img = img * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return img.clamp(0, 1) * 2 - 1


def rae_stats(seed=0, lead=False):
    g = torch.Generator().manual_seed(seed)
    shape = (1, C, SIDE, SIDE) if lead else (C, SIDE, SIDE)
    return {"mean": torch.randn(*shape, generator=g) * 0.3, "var": torch.rand(*shape, generator=g) + 0.5}


def write_rae_dir(root, sd=None, stats=None):
    (root / "decoders").mkdir(parents=True, exist_ok=True)
    (root / "stats").mkdir(parents=True, exist_ok=True)
    torch.save(sd if sd is not None else rae_decoder_sd(), root / "decoders" / "model.pt")
    torch.save(stats if stats is not None else rae_stats(), root / "stats" / "stat.pt")
    return root


def rae_latent(repo, **extra):
    ex = {
        "decoder": "decoders/model.pt",
        "stats": "stats/stat.pt",
        "eps": 1e-5,
        "layer_norm_eps": 1e-12,
        "decoder_heads": HEADS,
        "encoder_input_size": 28,
    }
    ex.update(extra)
    return LatentSpace(
        kind="rae", channels=C, size=SIDE, image_channels=3, image_size=SIDE * PATCH, repo=str(repo), extra=ex
    )


@pytest.mark.parametrize("lead", [False, True])
def test_rae_decoder_matches_the_reference(tmp_path, lead):
    sd, stats = rae_decoder_sd(), rae_stats(lead=lead)
    write_rae_dir(tmp_path, sd, stats)
    dec = get_decoder(rae_latent(tmp_path))
    z = torch.randn(3, C, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    out = dec.decode(z)
    assert out.shape == (3, 3, SIDE * PATCH, SIDE * PATCH)
    assert (out - reference_rae_decode(sd, stats, z)).abs().max().item() < 1e-5


def test_rae_encode_normalises_with_the_stats(tmp_path):
    stats = rae_stats(seed=2)
    write_rae_dir(tmp_path, stats=stats)
    seen = {}

    def fake_dino(x):  # tokens from the (resized, ImageNet-normalised) image: 2x2 average pooling of 2 channels
        seen["x"] = x
        pooled = F.avg_pool2d(x, 7)  # 28 -> 4
        return pooled.repeat(1, 3, 1, 1)[:, :C].flatten(2).transpose(1, 2)

    dec = RAEDecoder(rae_latent(tmp_path), encoder=fake_dino)
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = dec.encode(img)
    x01 = F.interpolate((img + 1) / 2, size=(28, 28), mode="bicubic", align_corners=False)
    xn = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], xn, atol=1e-6)
    raw = F.avg_pool2d(xn, 7).repeat(1, 3, 1, 1)[:, :C]
    assert torch.allclose(z, (raw - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5), atol=1e-5)


def test_rae_encoder_needs_transformers(tmp_path):
    try:
        import transformers  # noqa: F401

        pytest.skip("transformers is installed")
    except ImportError:
        pass
    write_rae_dir(tmp_path)
    dec = get_decoder(rae_latent(tmp_path))
    with pytest.raises(FlowmapError, match=r"flowmap-convert\[rae\]"):
        dec.encode(torch.zeros(1, 3, 8, 8))


def test_rae_mismatches_are_user_errors(tmp_path):
    write_rae_dir(tmp_path / "a", stats={"mean": torch.zeros(C, SIDE + 1, SIDE), "var": torch.ones(C, SIDE + 1, SIDE)})
    with pytest.raises(FlowmapError, match="statistics mean has shape"):
        get_decoder(rae_latent(tmp_path / "a"))
    write_rae_dir(tmp_path / "b", stats={"mean": torch.zeros(C, SIDE, SIDE)})
    with pytest.raises(FlowmapError, match="'mean', 'var'"):
        get_decoder(rae_latent(tmp_path / "b"))
    write_rae_dir(tmp_path / "c", sd=rae_decoder_sd(in_dim=C + 1))
    with pytest.raises(FlowmapError, match="expects 16 tokens of 9 channels"):
        get_decoder(rae_latent(tmp_path / "c"))
    write_rae_dir(tmp_path / "d", sd=rae_decoder_sd(patches=64))
    with pytest.raises(FlowmapError, match="expects 64 tokens"):
        get_decoder(rae_latent(tmp_path / "d"))
    bad = rae_decoder_sd()
    bad.pop("decoder_layers.1.output.dense.bias")
    write_rae_dir(tmp_path / "e", sd=bad)
    with pytest.raises(FlowmapError, match="missing: decoder_layers.1.output.dense.bias"):
        get_decoder(rae_latent(tmp_path / "e"))
    write_rae_dir(tmp_path / "f")
    dec = get_decoder(rae_latent(tmp_path / "f"))
    with pytest.raises(FlowmapError, match="do not fit this RAE decoder"):
        dec.decode(torch.zeros(1, C, SIDE * 2, SIDE * 2))
    with pytest.raises(FlowmapError, match="does not exist"):
        get_decoder(rae_latent(tmp_path / "f", decoder="decoders/missing.pt"))


def test_rae_files_resolve_from_an_offline_hub_cache(tmp_path, monkeypatch):
    sd, stats = rae_decoder_sd(seed=9), rae_stats(seed=9)
    add_repo(
        tmp_path / "hub",
        "nyu-visionx/RAE-collections",
        {
            "decoders/dinov2/wReg_base/ViTXL_n08/model.pt": torch_bytes(sd),
            "stats/dinov2/wReg_base/imagenet1k/stat.pt": torch_bytes(stats),
        },
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lat = rae_latent(
        "nyu-visionx/RAE-collections",
        decoder="decoders/dinov2/wReg_base/ViTXL_n08/model.pt",
        stats="stats/dinov2/wReg_base/imagenet1k/stat.pt",
    )
    dec = get_decoder(lat)
    z = torch.randn(1, C, SIDE, SIDE)
    assert (dec.decode(z) - reference_rae_decode(sd, stats, z)).abs().max().item() < 1e-5
    with pytest.raises(FlowmapError, match="offline mode is on"):
        get_decoder(rae_latent("nyu-visionx/RAE-collections", stats="stats/dinov2/wReg_base/imagenet1k_512/stat.pt"))
