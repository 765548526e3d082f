"""Scores on feature sets: sample-count checks, bootstrap confidence intervals, paired MSE, Inception Score,
precision / recall, and reference statistics (dataset, ADM batch, stats .npz). The Fréchet math is
`flowmap_convert.frechet`; the networks that make features are `flowmap_convert.extractors` (both re-exported
here for callers that score and extract in one place).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .budget import check_npz
from .errors import FlowmapError
from .extractors import EXTRACTORS, auto_features, cache_dir, get_extractor, register_extractor  # noqa: F401
from .frechet import _FrechetTo, _psd_sqrt, feature_stats, frechet_distance  # noqa: F401  (re-exported)
from .outputs import atomic_file


def check_sample_count(n: int, dim: int, warn: Callable[[str], None] | None = None) -> None:
    """Fewer than 2 samples is an error; fewer than the feature dimension makes the covariance rank-deficient: warn."""
    if n < 2:
        raise FlowmapError(f"a Fréchet distance needs at least 2 samples, got {n}; raise `num_samples`.")
    if n < dim and warn is not None:
        warn(
            f"{n} samples are fewer than the {dim} feature dimensions: the sample covariance is rank-deficient and the Fréchet distance is biased upward; use `num_samples` >= {dim} for comparable numbers."
        )


def _quantiles(values: np.ndarray, ci: float) -> list[float]:
    """Two-sided percentile interval holding `ci` of the bootstrap distribution."""
    lo, hi = np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])
    return [float(lo), float(hi)]


def bootstrap_fd(
    features: np.ndarray,
    ref_mu=None,
    ref_sigma=None,
    ref_features: np.ndarray | None = None,
    draws: int = 200,
    ci: float = 0.9,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """FD with a bias-corrected percentile bootstrap CI: resample samples (paired with `ref_features` when given)."""
    f = np.asarray(features, np.float64)
    if ref_features is not None:
        r = np.asarray(ref_features, np.float64)
        if r.shape != f.shape:
            raise FlowmapError(
                f"teacher features {r.shape} do not pair with the sample features {f.shape}; use the same `num_samples` and seed."
            )
        point = frechet_distance(*feature_stats(f), *feature_stats(r))
    else:
        fd_to = _FrechetTo(ref_mu, ref_sigma)
        if fd_to.mu.shape != (f.shape[1],) or fd_to.sigma.shape != (f.shape[1], f.shape[1]):
            raise FlowmapError(
                f"reference statistics have dimension {fd_to.mu.shape[0]} but the features have {f.shape[1]}; recompute the reference with the same `features`."
            )
        point = fd_to(*feature_stats(f))
    if draws <= 0:
        return point, [point, point]
    rng = np.random.default_rng(seed)
    vals = np.empty(draws)
    with _single_thread_blas():
        _fill_bootstrap(
            vals, f, r if ref_features is not None else None, None if ref_features is not None else fd_to, rng
        )
    # Resampling with replacement duplicates rows, which biases FD upward; shift the percentile interval by the
    # bootstrap bias estimate (mean of draws - point) so that it brackets the point estimate.
    bias = float(vals.mean() - point)
    lo, hi = _quantiles(vals, ci)
    return point, [max(lo - bias, 0.0), max(hi - bias, 0.0)]


def _single_thread_blas():
    """Small eigh/matmul calls run ~20x faster on one BLAS thread on a busy machine (threadpoolctl when present)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fill_bootstrap(vals, f, r, fd_to, rng) -> None:
    """Bootstrap draws of FD: resample rows with replacement (the same rows of `r` when paired)."""
    n = len(f)
    for i in range(len(vals)):
        idx = rng.integers(0, n, n)  # resample samples with replacement
        if r is not None:
            vals[i] = frechet_distance(*feature_stats(f[idx]), *feature_stats(r[idx]))  # paired: same noise indices
        else:
            vals[i] = fd_to(*feature_stats(f[idx]))


def bootstrap_mean(values: np.ndarray, draws: int = 200, ci: float = 0.9, seed: int = 0) -> tuple[float, list[float]]:
    """Mean with a percentile bootstrap CI over samples (used for the paired per-sample error)."""
    v = np.asarray(values, np.float64)
    point = float(v.mean())
    if draws <= 0:
        return point, [point, point]
    rng = np.random.default_rng(seed)
    vals = v[rng.integers(0, len(v), (draws, len(v)))].mean(axis=1)
    return point, _quantiles(vals, ci)


def paired_mse(x, y) -> np.ndarray:
    """Per-sample mean squared error between two equally shaped batches (pixel or latent space): shape (N,)."""
    a = np.asarray(x, np.float64).reshape(len(x), -1)
    b = np.asarray(y, np.float64).reshape(len(y), -1)
    if a.shape != b.shape:
        raise FlowmapError(f"paired samples differ in shape: {a.shape} vs {b.shape}.")
    return ((a - b) ** 2).mean(axis=1)


# ---------------------------------------------------------------------------------------------- caches
def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` consecutive splits (torch-fidelity)."""
    lg = np.asarray(logits, np.float64)
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(py, 1e-30, None)))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radii(f, k: int, block: int = 1024):
    """Distance of each row to its k-th nearest other row (the k-NN manifold radius)."""
    import torch

    x = torch.as_tensor(f, dtype=torch.float64)
    out = []
    for i in range(0, len(x), block):
        d = torch.cdist(x[i : i + block], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _covered(queries, centres, radii, block: int = 1024) -> float:
    """Share of query rows inside at least one ball (centre, radius)."""
    import torch

    q = torch.as_tensor(queries, dtype=torch.float64)
    c = torch.as_tensor(centres, dtype=torch.float64)
    hit = 0
    for i in range(0, len(q), block):
        d = torch.cdist(q[i : i + block], c)
        hit += int((d <= radii[None, :]).any(dim=1).sum())
    return hit / len(q)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN manifolds: (precision, recall).

    precision: share of generated samples inside the real manifold (union of balls reaching each real sample's
    k-th nearest real neighbour); recall: share of real samples inside the generated manifold.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise FlowmapError(
            f"precision / recall with k = {k} needs more than {k} samples on each side, got {len(fake)} samples and {len(real)} reference images."
        )
    precision = _covered(fake, real, _kth_radii(real, k))
    recall = _covered(real, fake, _kth_radii(fake, k))
    return precision, recall


# ---------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ReferenceStats:
    """Gaussian statistics of reference features, with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    source: str

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.mu.shape[0])

    def digest(self) -> str:
        """Short content hash (keys result caches to the exact reference)."""
        h = hashlib.sha256(np.ascontiguousarray(self.mu).tobytes())
        h.update(np.ascontiguousarray(self.sigma).tobytes())
        return h.hexdigest()[:16]


def save_reference(path, mu, sigma) -> Path:
    """Write `mu`/`sigma` to an .npz atomically (ADM reference-batch key names)."""
    path = Path(path)
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


def load_reference(path, extractor=None) -> ReferenceStats:
    """Read reference statistics: an .npz with `mu`/`sigma` (ours or an ADM reference batch), or images in `arr_0`.

    Images (uint8 NHWC in `arr_0`, as ADM / `flowmap sample --npz` write them) are run through `extractor` once and
    the statistics cached next to them as `<name>.<extractor>-stats.npz`.
    """
    path = Path(path)
    if not path.is_file():
        raise FlowmapError(
            f"reference file {path} does not exist; pass a .npz with mu/sigma (or arr_0 images), 'dataset' or 'teacher'."
        )
    try:
        check_npz(path, f"reference {path}")  # object arrays and impossible sizes refused before loading
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError) as e:
        raise FlowmapError(
            f"cannot read reference {path} as .npz ({e}); pass a file written by numpy.savez with mu/sigma keys."
        ) from None
    if {"mu", "sigma"} <= keys:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise FlowmapError(f"reference {path} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D).")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise FlowmapError(f"reference {path} has NaN or Inf in mu or sigma; recompute the statistics.")
        return ReferenceStats(mu, sigma, str(path))
    if "arr_0" in keys:
        if extractor is None:
            raise FlowmapError(
                f"reference {path} holds images, not statistics; name a feature extractor to compute them."
            )
        cached = path.with_name(f"{path.stem}.{extractor.name}-stats.npz")
        if cached.is_file() and cached.stat().st_mtime >= path.stat().st_mtime:
            return load_reference(cached)
        mu, sigma = feature_stats(extractor.features(data["arr_0"]))
        save_reference(cached, mu, sigma)
        return ReferenceStats(mu, sigma, f"{path} ({extractor.name} features, cached in {cached.name})")
    raise FlowmapError(
        f"reference {path} has neither mu/sigma nor arr_0 (keys: {', '.join(sorted(keys)) or 'none'}); write one with numpy.savez(path, mu=..., sigma=...)."
    )


def dataset_reference(extractor) -> ReferenceStats:
    """Statistics of the extractor's own dataset (digits), else a clear error pointing at the alternatives."""
    if not hasattr(extractor, "dataset_reference"):
        raise FlowmapError(
            f"there is no builtin dataset reference for {extractor.name} features; pass `reference` stats.npz (mu/sigma, e.g. an ADM reference batch) or `reference` teacher."
        )
    mu, sigma = extractor.dataset_reference()
    return ReferenceStats(mu, sigma, f"builtin dataset ({extractor.name} features)")
