"""The builtin digits benchmark: `builtin:digits` data, a small CNN classifier and "digits FD".

Data: scikit-learn's digits (1797 8x8 images, integer values 0..16, UCI optdigits test set) upsampled to 16x16
with bilinear interpolation (`F.interpolate(..., mode="bilinear", align_corners=False)`, which only forms convex
combinations, so values stay in [0, 16]) and scaled to [-1, 1] by x / 8 - 1.

Metric: "digits FD" is the Fréchet distance between the 64-d penultimate features (after the ReLU) of
`DigitsClassifier` on generated images and on all 1797 real images; "acc" is the share of samples the classifier
assigns to their conditioning class. Both are digits-scale stand-ins for FID and Inception-classifier accuracy.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import FlowmapError
from .frechet import feature_stats, frechet_distance
from .io import sha256_file

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
CLASSIFIER_DIR = BUILTIN_DIR / "digits-classifier"
REF_STATS_NAME = "reference_stats.npz"
DATASETS = ("digits",)  # names accepted as builtin:NAME datasets
TEST_FRACTION = 0.2  # held-out share per class for the train/test split
IMAGE_SIZE = 16


# ---------------------------------------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as (1797, 8, 8) float32 in 0..16 and int64 labels (read once per process)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FlowmapError(
            "the builtin digits data needs scikit-learn; install it with `pip install scikit-learn` (or the `test` extra)."
        ) from None
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def upsample_digits(images8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) values in 0..16 -> (N, 1, 16, 16) in [-1, 1] (bilinear, align_corners=False, then x / 8 - 1)."""
    x = torch.as_tensor(images8, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x / 8.0 - 1.0  # [0, 16] -> [-1, 1]


def split_indices(
    labels: np.ndarray, seed: int = 0, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified train/test split: per class, a seeded permutation, the first round(f * n_c) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_tensor(split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float images (N, 1, 16, 16) in [-1, 1] and long labels; split is all | train | test (80/20 by class)."""
    if split not in ("all", "train", "test"):
        raise FlowmapError(f"unknown digits split {split!r}; use all, train or test.")
    images8, labels = _raw_digits()
    if split != "all":
        train, test = split_indices(labels, seed)
        keep = train if split == "train" else test
        images8, labels = images8[keep], labels[keep]
    return upsample_digits(torch.from_numpy(images8)), torch.from_numpy(labels).long()


def builtin_dataset(name: str, split: str = "all", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve `builtin:NAME` (or `NAME`) to (images in [-1, 1] NCHW, labels); today only `digits`."""
    key = name.split(":", 1)[1] if name.startswith("builtin:") else name
    if key == "digits":
        return load_digits_tensor(split, seed)
    raise FlowmapError(f"unknown builtin dataset {name!r}; available: {', '.join('builtin:' + d for d in DATASETS)}.")


# ---------------------------------------------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """Small CNN for 1x16x16 digits: two conv stages, a 64-d penultimate layer (the FD features), 10 logits."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
        self.fc = nn.Linear(2 * w * 16, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim), after the ReLU: what digits FD compares."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (and features when asked) for images in [-1, 1], (N, 1, 16, 16)."""
        f = self.features(x)
        logits = self.head(self.drop(f))
        return (logits, f) if return_features else logits


def classifier_config(model: DigitsClassifier) -> dict:
    """The constructor arguments of a classifier, as stored in config.json."""
    return {
        "width": model.conv[0].out_channels,
        "feature_dim": model.fc.out_features,
        "num_classes": model.head.out_features,
        "dropout": model.drop.p,
    }


@lru_cache(maxsize=1)
def load_classifier(directory: str | None = None) -> DigitsClassifier:
    """The shipped digits classifier (eval mode, fp32, CPU) from config.json + model.safetensors."""
    from safetensors.torch import load_file

    d = Path(directory) if directory else CLASSIFIER_DIR
    try:
        cfg = json.loads((d / "config.json").read_text())
        sd = load_file(str(d / "model.safetensors"))
    except FileNotFoundError:
        raise FlowmapError(
            f"the digits classifier is missing from {d}; regenerate it with `python benchmarks/digits/train_classifier.py`."
        ) from None
    model = DigitsClassifier(**cfg["architecture"])
    model.load_state_dict(sd, strict=True)
    return model.eval()


def as_model_input(images) -> torch.Tensor:
    """uint8 NHWC arrays (as `fm.sample` returns) or float NCHW tensors in [-1, 1] -> float (N, 1, 16, 16)."""
    if (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        or isinstance(images, torch.Tensor)
        and images.dtype == torch.uint8
    ):
        x = torch.as_tensor(np.asarray(images)).float()
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2)
        x = (x - 128.0) / 127.5  # inverse of sample.to_uint8: 127.5 x + 128
    else:
        x = torch.as_tensor(images).float()
        if x.ndim == 3:
            x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise FlowmapError(
            f"digits metrics need 1x16x16 images (uint8 NHWC or float NCHW), got shape {tuple(x.shape)}; sample a digits model."
        )
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def digits_features(
    images, batch_size: int = 500, classifier: DigitsClassifier | None = None, return_logits: bool = False
):
    """64-d penultimate classifier features (N, 64) as float64 numpy (and logits when asked)."""
    clf = classifier if classifier is not None else load_classifier()
    x = as_model_input(images)
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        lg, f = clf(x[i : i + batch_size], return_features=True)
        feats.append(f.double())
        logits.append(lg)
    f = torch.cat(feats).numpy()
    return (f, torch.cat(logits)) if return_logits else f


def _weights_sha(directory: Path) -> str:
    return sha256_file(directory / "model.safetensors")


def compute_reference_stats(directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier features of all 1797 real digits (needs scikit-learn)."""
    images, _ = load_digits_tensor("all")
    return feature_stats(digits_features(images, classifier=load_classifier(directory)))


@lru_cache(maxsize=1)
def reference_stats() -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the real digits' features: the shipped cache if it matches the weights, else computed."""
    path = CLASSIFIER_DIR / REF_STATS_NAME
    if path.is_file():
        data = np.load(path)
        if str(data["weights_sha256"]) == _weights_sha(CLASSIFIER_DIR):
            return data["mu"], data["sigma"]
    return compute_reference_stats()


def write_reference_stats(directory: str | Path) -> Path:
    """Cache the real-data feature statistics next to the classifier weights, keyed by their sha256."""
    directory = Path(directory)
    mu, sigma = compute_reference_stats(str(directory))
    out = directory / REF_STATS_NAME
    np.savez(out, mu=mu, sigma=sigma, weights_sha256=np.array(_weights_sha(directory)))
    return out


def digits_fd(images, reference: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Fréchet distance of the images' classifier features to the reference (default: all real digits)."""
    mu, sigma = reference if reference is not None else reference_stats()
    return frechet_distance(*feature_stats(digits_features(images)), mu, sigma)


def evaluate_digits(images, labels) -> dict:
    """{"fd": digits FD against all real digits, "acc": share classified as their conditioning label, "n": count}."""
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    feats, logits = digits_features(images, return_logits=True)
    if len(labels) != len(feats):
        raise FlowmapError(f"got {len(feats)} images but {len(labels)} labels; pass one conditioning label per image.")
    mu, sigma = reference_stats()
    fd = frechet_distance(*feature_stats(feats), mu, sigma)
    acc = (logits.argmax(-1) == labels).float().mean().item()
    return {"fd": float(fd), "acc": float(acc), "n": int(len(feats))}
