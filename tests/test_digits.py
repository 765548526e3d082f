"""The builtin digits benchmark: data, classifier, digits FD and the shipped base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from flowmap_convert.adapters import builtin_path

import flowmap_convert as fm
from flowmap_convert.digits import (
    builtin_dataset,
    digits_features,
    evaluate_digits,
    load_classifier,
    load_digits_tensor,
    reference_stats,
)
from flowmap_convert.errors import FlowmapError
from flowmap_convert.metrics import feature_stats, frechet_distance


def test_builtin_dataset_shapes_range_labels():
    x, y = builtin_dataset("builtin:digits")
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # background is 0 -> -1, strokes reach 16 -> ~1
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    from sklearn.datasets import load_digits

    raw = load_digits()
    # Independent bilinear 8 -> 16 with half-pixel centres (align_corners=False): source coordinate
    # (i + 0.5) / 2 - 0.5, clamped at the border, separable in rows and columns.
    src = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 7)
    w = src - lo
    m = np.zeros((16, 8))
    m[np.arange(16), lo] += 1 - w
    m[np.arange(16), hi] += w
    expected = np.einsum("ia,nab,jb->nij", m, raw.images, m) / 8 - 1
    assert np.allclose(x[:, 0].numpy(), expected, atol=1e-5)
    assert np.array_equal(y.numpy(), raw.target)


def test_train_test_split_is_disjoint_and_stratified():
    xtr, ytr = load_digits_tensor("train", seed=0)
    xte, yte = load_digits_tensor("test", seed=0)
    assert len(xtr) + len(xte) == 1797
    assert 0.18 < len(xte) / 1797 < 0.22
    assert torch.bincount(yte, minlength=10).min() >= 34  # every class held out
    flat_tr = {tuple(v) for v in xtr.reshape(len(xtr), -1).numpy().round(4)}
    assert (
        sum(tuple(v) in flat_tr for v in xte.reshape(len(xte), -1).numpy().round(4)) <= 2
    )  # sklearn has a few duplicate images
    with pytest.raises(FlowmapError):
        builtin_dataset("builtin:cifar")
    with pytest.raises(FlowmapError):
        load_digits_tensor("val")


def test_classifier_heldout_accuracy_and_feature_shape():
    clf = load_classifier()
    x, y = load_digits_tensor("test", seed=0)
    with torch.no_grad():
        acc = (clf(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.95
    f = digits_features(x)
    assert f.shape == (len(x), 64) and np.isfinite(f).all()


def test_uint8_and_float_inputs_agree():
    from flowmap_convert.sampling import to_uint8

    x, _ = load_digits_tensor("test")
    f_float = digits_features(x[:50])
    f_uint8 = digits_features(to_uint8(x[:50]))  # NHWC uint8, as fm.sample returns
    assert np.abs(f_float - f_uint8).max() < 0.05 * (np.abs(f_float).max() + 1e-6)


def test_fd_real_halves_much_smaller_than_noise():
    x, y = load_digits_tensor("all")
    f = digits_features(x)
    p = np.random.default_rng(0).permutation(len(f))
    halves = frechet_distance(*feature_stats(f[p[:898]]), *feature_stats(f[p[898:]]))
    noise = torch.rand(898, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    to_noise = frechet_distance(*feature_stats(f[p[:898]]), *feature_stats(digits_features(noise)))
    assert halves * 10 < to_noise
    mu, sigma = reference_stats()
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    # The cached reference equals the statistics recomputed from all real images.
    mu2, sigma2 = feature_stats(f)
    assert np.allclose(mu, mu2, atol=1e-5) and np.allclose(sigma, sigma2, atol=1e-5)
    real = evaluate_digits(x, y)
    assert real["n"] == 1797 and real["acc"] > 0.98 and real["fd"] < 1e-6


def test_builtin_model_loads_small_and_is_a_base_sit():
    d = builtin_path("digits-sit")
    assert (d / "model.safetensors").stat().st_size <= 5 * 1024 * 1024
    model = fm.load("builtin:digits-sit")
    cfg = model.config
    assert (cfg.conditioning, cfg.time_convention, cfg.input_size, cfg.in_channels) == ("velocity", "canonical", 16, 1)
    assert (cfg.num_classes, cfg.class_embed_rows) == (10, 11)
    assert cfg.provenance["source"] == "builtin:digits-sit" and cfg.training["recipe"]["steps"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("depth", [2, 4])
def test_converted_builtin_r_equals_t_after_reload(depth, tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import read_model_dir

    base = fm.load("builtin:digits-sit")
    out = export(fm.convert("builtin:digits-sit", depth=depth), tmp_path / f"d{depth}")
    conv = read_model_dir(out)
    assert conv.config.depth == depth and conv.config.conditioning == "decoupled"
    g = torch.Generator().manual_seed(depth)
    x = torch.randn(6, 1, 16, 16, generator=g)
    t = torch.rand(6, generator=g)
    y = torch.tensor([0, 3, 7, 9, 10, 5])
    with torch.no_grad():
        v = base(x, t, None, y)
        assert torch.allclose(conv(x, t, t, y), v, atol=1e-5)  # r = t: the decoupled map is the base velocity
        assert not torch.allclose(conv(x, t, t * 0.5, y), v, atol=1e-3)  # r != t really changes the decoder


@pytest.mark.e2e
def test_demo_commands_run(tmp_path):
    """What `make demo` runs: convert the builtin at depth 5, then sample 4 NFE (fewer samples here)."""
    import json

    from hubcache import run_cli

    out = tmp_path / "digits-dmf5"
    r = run_cli(["convert", "builtin:digits-sit", "--depth", "5", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    r = run_cli(["sample", str(out), "--nfe", "4", "--num-samples", "10", "--out", str(tmp_path / "s")])
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert meta["shape"] == [10, 16, 16, 1] and (tmp_path / "s" / "grid.png").is_file()
