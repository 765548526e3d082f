"""Feature extractors for the Fréchet distances (FID, FD-DINOv2, digits FD): a registry of name -> factory.

Each built extractor has `.name`, `.dim` and `.features(images_uint8_nhwc) -> (N, D) float64` (Inception also
`.logits`). Heavy networks (Inception-v3, DINOv2) are imported lazily so the core install never needs torchvision
or transformers; weights that cannot be downloaded offline fail with one line naming the file, its URL and where
to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import digits
from .errors import FlowmapError
from .outputs import atomic_file
from .progress import Progress

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF FID graph
FID_INSTALL = "pip install torch==2.14.1 torchvision==0.29.1 torch-fidelity"


def cache_dir() -> Path:
    """$FLOWMAP_CACHE, else ~/.cache/flowmap (weights, reference statistics); one line when it is not a directory."""
    path = Path(os.environ.get("FLOWMAP_CACHE") or Path.home() / ".cache" / "flowmap")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "FLOWMAP_CACHE" if os.environ.get("FLOWMAP_CACHE") else "the cache"
        raise FlowmapError(f"{what} {path} is (or lies under) a file, {probe}; point FLOWMAP_CACHE at a directory.")
    return path


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
    with atomic_file(dest) as tmp:  # a failed write of the cache is a write error; a failed download is not
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(tmp), progress=False)
        except Exception as e:  # URLError, HTTPError, socket errors: all mean "could not download"
            raise missing_weights_error(
                f"a network failure: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
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
            raise FlowmapError("`features` auto needs a model to choose from; name an extractor instead.")
        name = auto_features(config)
    if name not in EXTRACTORS:
        raise FlowmapError(f"unknown feature extractor {name!r}; choose one of auto, {', '.join(EXTRACTORS)}.")
    return EXTRACTORS[name](device=device)
