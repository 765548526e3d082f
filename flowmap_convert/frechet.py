"""Fréchet distance between Gaussian feature statistics: the one implementation behind FID, FD-DINOv2 and digits FD.

Pure numpy and the bottom layer: `metrics` (extractors, references) and `digits` (the builtin classifier) both
import it, so neither imports the other for the arithmetic.
"""

from __future__ import annotations

import numpy as np

from .errors import FlowmapError


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
        raise FlowmapError(
            f"reference statistics do not match the features: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}; recompute them with the same feature extractor."
        )
    return _FrechetTo(mu2, s2)(mu1, s1)


class _FrechetTo:
    """Fréchet distance to fixed statistics (mu_r, S_r), with S_r^1/2 computed once (bootstrap draws reuse it)."""

    def __init__(self, mu_r: np.ndarray, sigma_r: np.ndarray):
        self.mu = np.asarray(mu_r, np.float64)
        self.sigma = np.asarray(sigma_r, np.float64)
        self.root = _psd_sqrt(self.sigma)
        self.trace = float(np.trace(self.sigma))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FD of (mu, sigma) to the fixed statistics."""
        m = self.root @ sigma @ self.root
        # tr sqrt(S_r^1/2 S S_r^1/2) = sum of sqrt eigenvalues of a symmetric PSD matrix (no complex sqrtm needed);
        # it equals tr sqrt(S S_r) because S_r^1/2 S S_r^1/2 and S S_r are similar.
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        diff = mu - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * tr_covmean)
