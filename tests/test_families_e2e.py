"""End to end through load_source and the CLI: fake offline Hub caches in the real repo layouts, decoding to pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_vae
from flowmap_convert.adapters import load_source
from hubcache import add_repo, dir_files, run_cli, torch_bytes
from test_decoders import rae_decoder_sd, rae_stats
from test_dit_family import random_dit_sd
from test_rae_family import ddt_state_dict

RAE_STAGE2 = "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt"
RAE_DECODER = "decoders/dinov2/wReg_base/ViTXL_n08/model.pt"
RAE_STATS = "stats/dinov2/wReg_base/imagenet1k/stat.pt"
SIDE16 = 16  # the 256-px latent side, so RAE's real decoder/stats paths are the ones picked


@pytest.mark.e2e
def test_rae_collections_convert_and_sample_offline(tmp_path, offline_hub):
    cache, env = offline_hub
    sd = ddt_state_dict(seed=11, side=SIDE16)
    dec_sd = rae_decoder_sd(seed=12, patches=SIDE16 * SIDE16)
    stats = {
        "mean": torch.zeros(1, 8, SIDE16, SIDE16),
        "var": torch.ones(1, 8, SIDE16, SIDE16),
    }  # [1, C, H, W] accepted
    add_repo(
        cache,
        "nyu-visionx/RAE-collections",
        {
            RAE_STAGE2: torch_bytes({"ema": sd, "model": sd, "step": 7}),
            RAE_DECODER: torch_bytes(dec_sd),
            RAE_STATS: torch_bytes(stats),
        },
    )
    model, info = load_source("nyu-visionx/RAE-collections", filename=RAE_STAGE2)
    assert info["family"] == "rae" and info["weights"] == "ema" and model.config.latent.extra["decoder"] == RAE_DECODER
    out = tmp_path / "rae-dmf"
    r = run_cli(["convert", "bytetriper/RAE", "--out", str(out)], env)  # the alias names the same Hub file
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["arch"] == "ddt"
        and cfg["depth"] == 3
        and cfg["sampling"]["shift"] == pytest.approx((8 * 256 / 4096) ** 0.5)
    )
    r = run_cli(
        ["sample", str(out), "--nfe", "2", "-n", "2", "--classes", "1,2", "--npz", "--out", str(tmp_path / "s")], env
    )
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (2, SIDE16 * 2, SIDE16 * 2, 3) and arr.dtype == np.uint8  # 16 tokens/side x patch 2
    # statistics of the wrong resolution are a clear user error at sampling time
    from flowmap_convert.api import load
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.sampling import sample

    add_repo(cache, "nyu-visionx/RAE-collections", {RAE_STATS: torch_bytes(rae_stats())}, commit="b" * 40)
    with pytest.raises(
        FlowmapError, match=r"statistics mean has shape \(8, 4, 4\) but the model's latents are \(8, 16, 16\)"
    ):
        sample(load(str(out)), nfe=1, classes=[0])


def put_diffusers_dit(cache, tmp_path):
    from test_dit_family import save_diffusers_dit

    src = tmp_path / "src"
    save_diffusers_dit(src, num_layers=2)
    add_repo(
        cache, "facebook/DiT-XL-2-256", {**dir_files(src), "scheduler/scheduler_config.json": b"{}", "README.md": b"x"}
    )


def test_diffusers_dit_repo_converts_and_samples_offline(tmp_path, offline_hub):
    from flowmap_convert.api import convert, load
    from flowmap_convert.io import export
    from flowmap_convert.sampling import sample

    cache, _ = offline_hub
    put_diffusers_dit(cache, tmp_path)
    model, info = load_source("facebook/DiT-XL-2-256")
    assert (
        info["family"] == "dit" and model.config.time_convention == "ddpm-eps" and model.config.extra["freq_shift"] == 1
    )
    assert model.config.latent.repo == "facebook/DiT-XL-2-256" and model.config.latent.extra == {"subfolder": "vae"}
    assert model.config.latent.image_size == 16
    export(convert("facebook/DiT-XL-2-256", depth=1), tmp_path / "dit-dmf")
    back = load(str(tmp_path / "dit-dmf"))
    assert back.config.depth == 1 and back.config.provenance["family"] == "dit"
    images = sample(back, nfe=2, classes=[3, 4], seed=1)  # decoded by the repo's own vae/ from the offline cache
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


@pytest.mark.e2e
@pytest.mark.slow
def test_diffusers_dit_repo_cli_offline(tmp_path, offline_hub):
    cache, env = offline_hub
    put_diffusers_dit(cache, tmp_path)
    out = tmp_path / "dit-dmf"
    r = run_cli(["convert", "facebook/DiT-XL-2-256", "--depth", "1", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(
        ["sample", str(out), "--nfe", "2", "-n", "2", "--classes", "3", "--npz", "--out", str(tmp_path / "s")], env
    )
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_original_dit_file_samples_through_the_cached_sd_vae(tmp_path, offline_hub):
    from flowmap_convert.sampling import sample

    cache, _ = offline_hub
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    add_repo(cache, "stabilityai/sd-vae-ft-ema", dir_files(vae_dir))
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(random_dit_sd(), path)
    model, info = load_source(str(path), num_heads=4)
    assert info["family"] == "dit" and model.config.latent.repo == "stabilityai/sd-vae-ft-ema"
    images = sample(model.with_depth(2), nfe=2, classes=[1, 2], seed=0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


def test_mf_rae_file_samples_in_one_step(tmp_path, offline_hub):
    from flowmap_convert.sampling import sample

    cache, _ = offline_hub
    # MF-RAE: a local file (their weights live on Google Drive), its own meanflow conditioning, RAE decoder files
    add_repo(
        cache,
        "nyu-visionx/RAE-collections",
        {
            RAE_DECODER: torch_bytes(rae_decoder_sd(patches=SIDE16 * SIDE16)),
            RAE_STATS: torch_bytes(rae_stats_16()),
        },
    )
    mf = tmp_path / "ema.pt"
    torch.save({"ema": ddt_state_dict(meanflow=True, side=SIDE16)}, mf)
    model, info = load_source(str(mf))
    assert info["family"] == "mf-rae" and model.config.conditioning == "meanflow"
    one, lat1, _, _ = sample(model, nfe=1, classes=[4], seed=3, return_latents=True)
    z = torch.randn(1, 8, SIDE16, SIDE16, generator=torch.Generator().manual_seed(3 * 1_000_003))
    with torch.no_grad():  # MF-RAE 1-step sampling: x = z - u(z, r=0, t=1)
        ref = z - model(z, torch.ones(1), torch.zeros(1), torch.tensor([4]))
    assert torch.allclose(lat1, ref, atol=1e-5) and one.shape == (1, 32, 32, 3)


def rae_stats_16():
    g = torch.Generator().manual_seed(0)
    return {
        "mean": torch.randn(8, SIDE16, SIDE16, generator=g) * 0.1,
        "var": torch.rand(8, SIDE16, SIDE16, generator=g) + 0.5,
    }
