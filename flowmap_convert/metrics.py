"""Fréchet distance between Gaussian feature statistics (FID, FD-DINOv2, digits FD)."""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of an (N, D) feature matrix, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; tiny negative eigenvalues from round-off are clipped."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), stable for near-singular covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        from .errors import FlowmapError

        raise FlowmapError(f"reference statistics do not match the features: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}; recompute them with the same feature extractor.")
    r1 = _psd_sqrt(s1)
    # tr sqrt(S1^1/2 S2 S1^1/2) = sum of sqrt eigenvalues of a symmetric PSD matrix (no complex sqrtm needed).
    inner = np.linalg.eigvalsh((r1 @ s2 @ r1 + (r1 @ s2 @ r1).T) / 2)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
