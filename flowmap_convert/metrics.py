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
from .frechet import _FrechetTo, _psd_sqrt, feature_stats, frechet_distance  # noqa: F401  (re-exported)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF FID graph
FID_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity"


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


INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"


def inception_weights_path() -> Path | None:
    """The local Inception weights file if one exists: $FLOWMAP_CACHE first, then the torch hub checkpoint cache."""
    import torch

    for p in (cache_dir() / INCEPTION_WEIGHTS, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS):
        if p.is_file():
            return p
    return None


def offline() -> bool:
    """True when downloads are switched off (FLOWMAP_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in ("FLOWMAP_OFFLINE", "HF_HUB_OFFLINE"))


def missing_weights_error(reason: str) -> FlowmapError:
    """One line naming the Inception weights file, its URL and where to put it."""
    return FlowmapError(
        f"the Inception FID weights {INCEPTION_WEIGHTS} are not here ({reason}); download {INCEPTION_URL} "
        f"and put it at {cache_dir() / INCEPTION_WEIGHTS}."
    )


def fetch_inception_weights() -> Path:
    """The local weights file, downloaded once into $FLOWMAP_CACHE when the network allows."""
    import torch

    local = inception_weights_path()
    if local is not None:
        return local
    if offline():
        raise missing_weights_error("offline")
    dest = cache_dir() / INCEPTION_WEIGHTS
    try:
        from .outputs import atomic_file

        with atomic_file(dest) as tmp:
            torch.hub.download_url_to_file(INCEPTION_URL, str(tmp), progress=False)
    except Exception as e:  # URLError, HTTPError, socket errors: all mean "could not download"
        raise missing_weights_error(
            f"download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return dest


def _torch_fidelity_inception(weights: Path, device):
    """torch-fidelity's TF-compatible Inception-v3 (its own bilinear resize to 299 inside): (pool3, logits)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise FlowmapError(
            f"Inception FID features need torch-fidelity (and torchvision), the extra flowmap-convert[fid]; install them with `{FID_INSTALL}`."
        ) from None
    try:
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
        ).to(device)
    except (OSError, RuntimeError) as e:
        raise FlowmapError(
            f"could not load the Inception FID weights {weights} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"download {INCEPTION_URL} again and put it at {cache_dir() / INCEPTION_WEIGHTS}."
        ) from None


# The network behind InceptionFeatures: (weights path, device) -> module mapping uint8 NCHW RGB to (pool3, logits).
# Tests swap in a small locally built network with the same interface (no torchvision, no network).
INCEPTION_NETWORK: dict[str, Callable] = {"factory": _torch_fidelity_inception}


class InceptionFeatures:
    """2048-d pool3 features (and logits for the Inception Score) of the TF-FID Inception-v3: standard FID / IS.

    torch-fidelity's bit-compatible port resizes any uint8 image to 299x299 the way the TensorFlow evaluators do.
    """

    name = "inception"
    dim = 2048

    def __init__(self, device="cpu", batch_size: int = 64):
        weights = fetch_inception_weights()
        self.net = INCEPTION_NETWORK["factory"](weights, device).eval()
        self.dim = int(getattr(self.net, "feature_dim", 2048))  # 2048 for torch-fidelity's network
        self.device = device
        self.batch_size = batch_size

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2048) pool3 features and (N, classes) logits in float64 (grayscale repeated to RGB)."""
        import torch

        from .progress import Progress

        a = _check_images(images)
        feats, logits = [], []
        mode = "auto" if len(a) >= 5000 else "off"  # minutes for 50k images: say how far it is
        with torch.no_grad(), Progress(len(a), "inception features", "images", mode=mode) as bar:
            for i in range(0, len(a), self.batch_size):
                x = torch.from_numpy(a[i : i + self.batch_size]).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)  # grayscale -> RGB, as FID tools do
                f, lg = self.net(x.contiguous().to(self.device))
                feats.append(f.double().cpu().numpy())
                logits.append(lg.double().cpu().numpy())
                bar.advance(len(x))
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        """(N, 2048) pool3 features in float64."""
        return self.features_and_logits(images)[0]

    def output_dim(self, channels: int, image_size: int) -> int:
        """Feature dimension, independent of the image shape."""
        return self.dim


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
    from .outputs import atomic_file  # io imports torch; metrics stays numpy-only at import

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
