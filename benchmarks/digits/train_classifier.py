"""Train the digits classifier behind "digits FD" and write flowmap_convert/builtin/digits-classifier/.

Trains on the stratified 80% train split of `builtin:digits` (seed 0), reports the held-out accuracy on the other
20%, and writes config.json (architecture, recipe, accuracy), model.safetensors and reference_stats.npz (feature
mean/covariance of all 1797 real digits, keyed by the weights' sha256).

    python benchmarks/digits/train_classifier.py            # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowmap_convert.digits import (
    CLASSIFIER_DIR,
    DigitsClassifier,
    classifier_config,
    load_digits_tensor,
    write_reference_stats,
)


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the shipped classifier."""

    seed: int = 0  # torch seed and train/test split seed
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak, cosine decay to 0
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation in pixels (augmentation, so sampled digits off by a pixel still classify)
    noise_std: float = 0.05  # additive Gaussian noise augmentation in [-1, 1] units


def augment(x: torch.Tensor, r: ClassifierRecipe, g: torch.Generator) -> torch.Tensor:
    """Random integer shifts (pad with background -1, crop back) plus light Gaussian noise."""
    s = r.max_shift
    if s:
        pad = F.pad(x, (s, s, s, s), value=-1.0)
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
        x = pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    return x + r.noise_std * torch.randn(x.shape, generator=g)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correct argmax predictions (eval mode)."""
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def train(r: ClassifierRecipe) -> tuple[DigitsClassifier, dict]:
    """Train on the train split; returns the model and a log of held-out accuracy."""
    torch.manual_seed(r.seed)
    g = torch.Generator().manual_seed(r.seed)
    xtr, ytr = load_digits_tensor("train", r.seed)
    xte, yte = load_digits_tensor("test", r.seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    steps_per_epoch = (len(xtr) + r.batch_size - 1) // r.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=r.epochs * steps_per_epoch, pct_start=0.1)
    t0 = time.time()
    for epoch in range(r.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), r.batch_size):
            idx = perm[i : i + r.batch_size]
            loss = F.cross_entropy(model(augment(xtr[idx], r, g)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 5 == 0 or epoch == r.epochs - 1:
            print(
                f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out acc {accuracy(model, xte, yte):.4f}  ({time.time() - t0:.0f} s)",
                flush=True,
            )
    log = {
        "heldout_accuracy": accuracy(model, xte, yte),
        "train_accuracy": accuracy(model, xtr, ytr),
        "n_train": len(xtr),
        "n_test": len(xte),
        "train_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
    return model.eval(), log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CLASSIFIER_DIR, help="output directory (default: the shipped location)")
    ap.add_argument("--epochs", type=int, default=ClassifierRecipe.epochs)
    args = ap.parse_args()
    recipe = ClassifierRecipe(epochs=args.epochs)
    model, log = train(recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    cfg = {
        "architecture": classifier_config(model),
        "input": "1x16x16 float in [-1, 1] (builtin:digits: sklearn digits, bilinear 8->16, align_corners=False, x / 8 - 1)",
        "features": "64-d penultimate activations after ReLU (DigitsClassifier.features)",
        "recipe": asdict(recipe),
        "results": log,
        "command": "python benchmarks/digits/train_classifier.py",
    }
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    stats = write_reference_stats(args.out)
    print(
        f"held-out accuracy {log['heldout_accuracy']:.4f} on {log['n_test']} images; wrote {args.out} and {stats.name}"
    )


if __name__ == "__main__":
    main()
