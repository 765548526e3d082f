"""Fréchet distance between Gaussian feature statistics (FID, FD-DINOv2, digits FD), feature extractors, references.

Extractors live in a small registry (`EXTRACTORS`, name -> factory); each built extractor has `.name`, `.dim` and
`.features(images_uint8_nhwc) -> (N, D) float64`. Heavy networks (Inception-v3, DINOv2) are imported lazily so the
core install never needs torchvision or transformers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FlowmapError

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF FID graph
FID_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity"


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


def check_sample_count(n: int, dim: int, warn: Callable[[str], None] | None = None) -> None:
    """Fewer than 2 samples is an error; fewer than the feature dimension makes the covariance rank-deficient: warn."""
    if n < 2:
        raise FlowmapError(f"a Fréchet distance needs at least 2 samples, got {n}; raise --num-samples.")
    if n < dim and warn is not None:
        warn(
            f"{n} samples are fewer than the {dim} feature dimensions: the sample covariance is rank-deficient and the Fréchet distance is biased upward; use --num-samples >= {dim} for comparable numbers."
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
                f"teacher features {r.shape} do not pair with the sample features {f.shape}; use the same --num-samples and seed."
            )
        point = frechet_distance(*feature_stats(f), *feature_stats(r))
    else:
        fd_to = _FrechetTo(ref_mu, ref_sigma)
        if fd_to.mu.shape != (f.shape[1],) or fd_to.sigma.shape != (f.shape[1], f.shape[1]):
            raise FlowmapError(
                f"reference statistics have dimension {fd_to.mu.shape[0]} but the features have {f.shape[1]}; recompute the reference with the same --features."
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
def cache_dir() -> Path:
    """$FLOWMAP_CACHE, else ~/.cache/flowmap (weights, reference statistics)."""
    return Path(os.environ.get("FLOWMAP_CACHE") or Path.home() / ".cache" / "flowmap")


# ---------------------------------------------------------------------------------------------- extractors
EXTRACTORS: dict[str, Callable[..., object]] = {}


def register_extractor(name: str):
    """Decorator adding an extractor factory `factory(device) -> extractor` to the registry."""

    def deco(factory):
        EXTRACTORS[name] = factory
        return factory

    return deco


def _check_images(images) -> np.ndarray:
    """Accept uint8 NHWC only (the layout `sample` returns), with a clear error otherwise."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise FlowmapError(f"feature extractors take uint8 NHWC images with 1 or 3 channels, got {a.dtype} {a.shape}.")
    return a


class PixelFeatures:
    """Raw pixels average-pooled to at most 8x8 per channel, in [-1, 1]: a dependency-free sanity-check probe."""

    name = "pixels"

    def __init__(self, device="cpu", size: int = 8):
        self.size = size
        self.dim = None  # depends on the channel count; set on first call

    def features(self, images) -> np.ndarray:
        """(N, C * 8 * 8) pooled pixels in float64."""
        import torch
        import torch.nn.functional as F

        a = _check_images(images)
        x = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1.0
        s = min(self.size, x.shape[-1])
        out = F.adaptive_avg_pool2d(x, s).reshape(len(a), -1).numpy()
        self.dim = out.shape[1]
        return out

    def output_dim(self, channels: int, image_size: int) -> int:
        """Feature dimension for images of this shape (known before sampling)."""
        return channels * min(self.size, image_size) ** 2


class DigitsFeatures:
    """Penultimate features of the builtin digits classifier (flowmap_convert.digits), for 1x16x16 digits models."""

    name = "digits"

    def __init__(self, device="cpu"):
        try:
            from . import digits
        except ImportError as e:
            raise FlowmapError(
                f"the digits feature extractor is not available in this install ({e}); use --features pixels or --features inception."
            ) from None
        self._digits = digits
        self.dim = int(digits.digits_features(np.zeros((1, 16, 16, 1), np.uint8)).shape[1])  # known before sampling

    def features(self, images) -> np.ndarray:
        """(N, 64) classifier features in float64."""
        out = np.asarray(self._digits.digits_features(_check_images(images)), np.float64)
        self.dim = out.shape[1]
        return out

    def output_dim(self, channels: int, image_size: int) -> int | None:
        """Feature dimension (64)."""
        return self.dim

    def dataset_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """Statistics of the real digits (computed by the digits module, cached there)."""
        mu, sigma = self._digits.reference_stats()[:2]
        return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def inception_weights_path() -> Path | None:
    """The local Inception weights file if one exists: $FLOWMAP_CACHE first, then the torch hub checkpoint cache."""
    import torch

    for p in (cache_dir() / INCEPTION_WEIGHTS, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS):
        if p.is_file():
            return p
    return None


class InceptionFeatures:
    """2048-d pool3 features of the TF-FID Inception-v3 (torch-fidelity's bit-compatible port): standard FID."""

    name = "inception"
    dim = 2048

    def __init__(self, device="cpu", batch_size: int = 64):
        import torch

        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise FlowmapError(
                f"Inception FID features need torch-fidelity (and torchvision), the extra flowmap-convert[fid]; install them with `{FID_INSTALL}`."
            ) from None
        local = inception_weights_path()
        try:
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(local) if local else None
            )
        except (OSError, RuntimeError) as e:  # URLError is an OSError: offline
            raise FlowmapError(
                f"could not load the Inception FID weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}); download {INCEPTION_WEIGHTS} "
                f"from https://github.com/toshas/torch-fidelity/releases/tag/v0.2.0 and put it at {cache_dir() / INCEPTION_WEIGHTS} "
                f"(or {Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_WEIGHTS})."
            ) from None
        self.net = net.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    def features(self, images) -> np.ndarray:
        """(N, 2048) pool3 features in float64 (grayscale repeated to RGB)."""
        import torch

        a = _check_images(images)
        out = []
        with torch.no_grad():
            for i in range(0, len(a), self.batch_size):
                x = torch.from_numpy(a[i : i + self.batch_size]).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)  # grayscale -> RGB, as FID tools do
                out.append(self.net(x.contiguous().to(self.device))[0].double().cpu().numpy())
        return np.concatenate(out)

    def output_dim(self, channels: int, image_size: int) -> int:
        """Feature dimension, independent of the image shape."""
        return self.dim


class DinoV2Features:
    """CLS token (after the final norm) of DINOv2 on 224x224 bicubic-resized, ImageNet-normalised images: FD-DINOv2."""

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, device="cpu", repo: str = "facebook/dinov2-base", batch_size: int = 32):
        try:
            from transformers import AutoModel
        except ImportError:
            raise FlowmapError(
                "DINOv2 features need transformers, the extra flowmap-convert[rae]; install it with `pip install 'flowmap-convert[rae]'` (or `pip install transformers`)."
            ) from None
        try:
            self.net = AutoModel.from_pretrained(repo).to(device).eval()
        except OSError as e:
            raise FlowmapError(
                f"could not load {repo} ({str(e).splitlines()[0] if str(e) else 'offline'}); download it once with network access (`huggingface-cli download {repo}`) or set HF_HOME to a cache that holds it."
            ) from None
        self.name = "dinov2" if repo == "facebook/dinov2-base" else "dinov2-" + repo.rsplit("-", 1)[-1]
        self.dim = int(self.net.config.hidden_size)
        self.device = device
        self.batch_size = batch_size

    def features(self, images) -> np.ndarray:
        """(N, hidden) CLS features in float64."""
        import torch
        import torch.nn.functional as F

        a = _check_images(images)
        mean = torch.tensor(self.IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        out = []
        with torch.no_grad():
            for i in range(0, len(a), self.batch_size):
                x = torch.from_numpy(a[i : i + self.batch_size]).permute(0, 3, 1, 2).float() / 255.0
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
                x = ((x - mean) / std).to(self.device)
                out.append(self.net(pixel_values=x).pooler_output.double().cpu().numpy())
        return np.concatenate(out)

    def output_dim(self, channels: int, image_size: int) -> int:
        """Feature dimension, independent of the image shape."""
        return self.dim


register_extractor("pixels")(PixelFeatures)
register_extractor("digits")(DigitsFeatures)
register_extractor("inception")(InceptionFeatures)
register_extractor("dinov2")(DinoV2Features)
register_extractor("dinov2-large")(lambda device="cpu": DinoV2Features(device, repo="facebook/dinov2-large"))


def auto_features(config) -> str:
    """Default extractor for a model: the digits classifier for pixel-space 1x16x16 models, else Inception (FID)."""
    lat = config.latent
    if lat.kind == "identity" and lat.image_channels == 1 and lat.image_size == 16:
        return "digits"
    return "inception"


def get_extractor(name: str, config=None, device="cpu"):
    """Build the extractor registered under `name` ('auto' picks from the model config)."""
    if name == "auto":
        if config is None:
            raise FlowmapError("--features auto needs a model to choose from; name an extractor instead.")
        name = auto_features(config)
    if name not in EXTRACTORS:
        raise FlowmapError(f"unknown feature extractor {name!r}; choose one of auto, {', '.join(EXTRACTORS)}.")
    return EXTRACTORS[name](device=device)


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
    from .io import atomic_file  # io imports torch; metrics stays numpy-only at import

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
            f"there is no builtin dataset reference for {extractor.name} features; pass --reference stats.npz (mu/sigma, e.g. an ADM reference batch) or --reference teacher."
        )
    mu, sigma = extractor.dataset_reference()
    return ReferenceStats(mu, sigma, f"builtin dataset ({extractor.name} features)")
