"""Shared fixtures: tiny random models in every convention, built in temp dirs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Triton reads TRITON_INTERPRET when it is first imported: without CUDA, run kernels in its CPU interpreter.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("FLOWMAP_TRITON_AUTOTUNE", "0")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny test models gain nothing from more, and on shared CI cores spinning threads are slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides):
    """A 4-block DiT over 1x16x16 pixels with 10 classes and a null row."""
    from flowmap_convert.config import LatentSpace, ModelConfig

    base = dict(
        input_size=16,
        in_channels=1,
        patch_size=2,
        hidden_size=64,
        num_blocks=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
        class_embed_rows=11,
        latent=LatentSpace(kind="identity", channels=1, size=16, image_channels=1, image_size=16),
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize(model, seed: int = 0, std: float = 0.05):
    """Give every trainable weight random values so zero-init layers do not hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_xty(channels: int, side: int, classes: int, seed: int = 1, b: int = 3):
    """Network inputs (x ~ N(0, I) of (b, channels, side, side), t uniform in (0.01, 0.99), labels 0, 7 and the null
    label `classes`), the first b of them, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, channels, side, side, generator=g),
        torch.rand(b, generator=g) * 0.98 + 0.01,
        torch.tensor([0, 7, classes])[:b],
    )


@pytest.fixture
def tiny_model():
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    return randomize(FlowMap(tiny_config())).eval()


@pytest.fixture
def tiny_dir(tiny_model, tmp_path):
    """tiny_model exported to tmp_path/tiny (its path as a string, as a command line takes it)."""
    from flowmap_convert.io import export

    return str(export(tiny_model, tmp_path / "tiny"))


def tiny_vae():
    """A tiny random diffusers AutoencoderKL (4 latent channels, downsampling 2) for SD-VAE tests."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache at tmp_path/hub, read offline (HF_HUB_CACHE, HF_HUB_OFFLINE) by this process and by
    CLI subprocesses: gives (cache, the environment to hand those subprocesses)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, dict(os.environ)


def pytest_collection_modifyitems(config, items):
    """Every `slow` test is also `e2e`, so `-m "not e2e"` (the unit suite) leaves the slow ones out as the default
    `-m "not slow"` does, whatever a test file remembers to mark."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)
