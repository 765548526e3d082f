"""Fréchet distance against scipy, stability for singular covariances, bootstrap CIs, extractors and references."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.linalg

from flowmap_convert.errors import FlowmapError
from flowmap_convert.metrics import (
    bootstrap_fd,
    bootstrap_mean,
    check_sample_count,
    feature_stats,
    frechet_distance,
    get_extractor,
    load_reference,
    paired_mse,
    save_reference,
)


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy.linalg.sqrtm (pytorch-fid style), as an independent reference."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng, dim, n):
    """Statistics of correlated random features (full rank when n > dim)."""
    a = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    f = rng.standard_normal((n, dim)) @ a + rng.standard_normal(dim)
    return feature_stats(f)


@pytest.mark.parametrize("dim", [3, 16, 64])
def test_fd_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        mu1, s1 = random_stats(rng, dim, 4 * dim + 10)
        mu2, s2 = random_stats(rng, dim, 4 * dim + 10)
        ours, ref = frechet_distance(mu1, s1, mu2, s2), scipy_fd(mu1, s1, mu2, s2)
        assert ours == pytest.approx(ref, rel=1e-6)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-6)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_fd_stable_for_rank_deficient_covariances():
    rng = np.random.default_rng(0)
    dim = 64
    mu1, s1 = random_stats(rng, dim, 20)  # rank 19 < 64
    mu2, s2 = random_stats(rng, dim, 30)  # rank 29 < 64
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd >= 0
    eps = 1e-10
    ridge = frechet_distance(mu1, s1 + eps * np.eye(dim), mu2, s2 + eps * np.eye(dim))
    assert fd == pytest.approx(ridge, rel=1e-3)
    # scipy on the ridged matrices agrees too (sqrtm is well defined there).
    assert fd == pytest.approx(scipy_fd(mu1, s1 + eps * np.eye(dim), mu2, s2 + eps * np.eye(dim)), rel=1e-3)
    # a covariance of exact zeros (identical samples) is fine as well
    assert frechet_distance(np.zeros(4), np.zeros((4, 4)), np.ones(4), np.eye(4)) == pytest.approx(4 + 4)


def test_fd_rejects_mismatched_statistics():
    with pytest.raises(FlowmapError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_bootstrap_ci_brackets_the_point_and_shrinks_with_more_samples():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4000, 8))
    mu, sigma = feature_stats(ref)
    small = rng.standard_normal((200, 8)) + 0.3
    large = rng.standard_normal((2000, 8)) + 0.3
    p1, (lo1, hi1) = bootstrap_fd(small, mu, sigma, draws=200, seed=0)
    p2, (lo2, hi2) = bootstrap_fd(large, mu, sigma, draws=200, seed=0)
    assert lo1 <= p1 <= hi1 and lo2 <= p2 <= hi2
    assert hi2 - lo2 < hi1 - lo1
    assert p2 == pytest.approx(8 * 0.09, rel=0.3)  # ||0.3 * 1||^2 = 0.72 for equal covariances
    # paired bootstrap against reference features of the same shape
    p3, (lo3, hi3) = bootstrap_fd(small, ref_features=ref[:200], draws=100, seed=0)
    assert p3 == pytest.approx(frechet_distance(*feature_stats(small), *feature_stats(ref[:200])))
    assert lo3 <= p3 <= hi3
    m, (a, b) = bootstrap_mean(np.arange(100.0), draws=200)
    assert m == 49.5 and a < 49.5 < b


def test_sample_count_checks():
    with pytest.raises(FlowmapError, match="at least 2 samples"):
        check_sample_count(1, 64)
    seen = []
    check_sample_count(10, 64, seen.append)
    assert seen and "fewer than the 64 feature dimensions" in seen[0]
    seen.clear()
    check_sample_count(100, 64, seen.append)
    assert not seen


def test_paired_mse_is_per_sample():
    x = np.zeros((3, 1, 2, 2))
    y = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2)), 2 * np.ones((1, 2, 2))])
    assert paired_mse(x, y).tolist() == [0.0, 1.0, 4.0]


def test_pixel_extractor_and_registry():
    ext = get_extractor("pixels")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    f = ext.features(imgs)
    assert f.shape == (5, 64) and f.dtype == np.float64
    # the 2x2 average of pixels mapped to [-1, 1]
    expect = (imgs[0, :2, :2, 0].astype(np.float64) / 127.5 - 1).mean()
    assert f[0, 0] == pytest.approx(expect)
    with pytest.raises(FlowmapError, match="unknown feature extractor"):
        get_extractor("nope")
    with pytest.raises(FlowmapError, match="uint8 NHWC"):
        ext.features(imgs.astype(np.float32))


def test_inception_needs_the_fid_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path))
    (tmp_path / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"")  # weights present, package absent
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(FlowmapError) as e:
        get_extractor("inception")
    assert "flowmap-convert[fid]" in str(
        e.value
    ) and "pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity" in str(e.value)


def test_inception_uses_local_weights_and_explains_offline(monkeypatch, tmp_path):
    import torch

    calls = []

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert features_list == ["2048", "logits_unbiased"]
            calls.append(feature_extractor_weights_path)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            f = x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]
            return f, f[:, :1008]

    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("FLOWMAP_OFFLINE", "1")
    with pytest.raises(FlowmapError) as e:
        get_extractor("inception")
    msg = str(e.value)
    assert str(tmp_path / "weights-inception-2015-12-05-6726825d.pth") in msg and "offline" in msg
    assert "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" in msg and calls == []
    (tmp_path / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"")
    ext = get_extractor("inception")
    assert calls[-1] == str(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    f = ext.features(np.zeros((3, 8, 8, 1), np.uint8))
    assert f.shape == (3, 2048) and f.dtype == np.float64


def test_dinov2_needs_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FlowmapError, match=r"flowmap-convert\[rae\]"):
        get_extractor("dinov2")


def test_reference_files(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = random_stats(rng, 8, 50)
    p = save_reference(tmp_path / "ref.npz", mu, sigma)
    ref = load_reference(p)
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, sigma) and ref.dim == 8
    # images in arr_0 (ADM / `flowmap sample --npz`): statistics computed with the extractor and cached
    imgs = rng.integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs)
    ext = get_extractor("pixels")
    ref2 = load_reference(tmp_path / "imgs.npz", ext)
    mu2, s2 = feature_stats(ext.features(imgs))
    assert np.allclose(ref2.mu, mu2) and np.allclose(ref2.sigma, s2)
    assert (tmp_path / "imgs.pixels-stats.npz").is_file()
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(FlowmapError, match="neither mu/sigma nor arr_0"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FlowmapError, match="does not exist"):
        load_reference(tmp_path / "missing.npz")


def test_inception_score_and_precision_recall():
    from flowmap_convert.metrics import inception_score, precision_recall

    # one-hot confident predictions spread evenly over 4 classes: IS = 4; all on one class: IS = 1
    logits = np.full((40, 4), -50.0)
    logits[np.arange(40), np.arange(40) % 4] = 50.0
    assert inception_score(logits, splits=2)[0] == pytest.approx(4.0, rel=1e-6)
    assert inception_score(np.zeros((10, 4)), splits=1)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 2))
    p, r = precision_recall(real, real.copy(), k=3)
    assert p == 1.0 and r == 1.0
    # generated samples collapsed onto a small part of the data: precise but low recall
    fake = real[real[:, 0] > 1.0][:, :] + 0.0
    p, r = precision_recall(real, fake, k=3)
    assert p == 1.0 and r < 0.5
    # generated samples far away: neither
    p, r = precision_recall(real, real + 100.0, k=3)
    assert p == 0.0 and r == 0.0
    with pytest.raises(FlowmapError, match="k = 3"):
        precision_recall(real, real[:3])
