"""Train the builtin base model `builtin:digits-sit`: a small class-conditional SiT on 16x16 digits.

Plain flow matching in flowmap's canonical time (t = 1 noise): x_t = (1 - t) x0 + t eps, target v = eps - x0,
t ~ logit-normal(0, 1), 10% of labels dropped to the null class 10 (for classifier-free guidance), AdamW with a
linear warm-up and cosine decay, EMA of the weights (the EMA weights are shipped). A fixed step count (not wall
time) makes the run reproducible; the recipe and measured speed land in config.json's `training` field.

    python benchmarks/digits/train_base.py                       # the shipped model (fixed 1800 steps)
    python benchmarks/digits/train_base.py --steps 300 --out /tmp/digits-quick
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowmap_convert import __version__
from flowmap_convert.config import LatentSpace, ModelConfig
from flowmap_convert.digits import BUILTIN_DIR, load_digits_tensor
from flowmap_convert.io import export
from flowmap_convert.model import FlowMap

DEFAULT_OUT = BUILTIN_DIR / "digits-sit"


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the shipped base model (architecture + optimisation)."""

    hidden_size: int = 96  # 0.84M parameters: 3.4 MB in fp32, under the 5 MB package budget
    num_blocks: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: int = 2  # 8x8 = 64 tokens
    steps: int = 1800
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak (high for a small model: converges within the step budget)
    warmup_steps: int = 200  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # with warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k))
    label_dropout: float = 0.1  # share of labels replaced by the null class
    t_sampling: str = "logit-normal"  # logit-normal(mean, std) or uniform
    t_mean: float = 0.0
    t_std: float = 1.0
    seed: int = 0
    threads: int = 1  # one intra-op thread: on shared cores, 2 spinning OpenMP threads ran up to 20x slower


def model_config(r: BaseRecipe) -> ModelConfig:
    """The flowmap config of the base SiT for a recipe."""
    return ModelConfig(
        arch="dit",
        conditioning="velocity",
        time_convention="canonical",
        input_size=16,
        in_channels=1,
        patch_size=r.patch_size,
        hidden_size=r.hidden_size,
        num_blocks=r.num_blocks,
        num_heads=r.num_heads,
        mlp_ratio=r.mlp_ratio,
        num_classes=10,
        class_embed_rows=11,
        latent=LatentSpace(kind="identity", channels=1, size=16, image_channels=1, image_size=16),
    )


def sample_t(r: BaseRecipe, n: int, g: torch.Generator) -> torch.Tensor:
    """Training times in (0, 1): logit-normal (SD3) or uniform."""
    if r.t_sampling == "uniform":
        return torch.rand(n, generator=g)
    return torch.sigmoid(r.t_mean + r.t_std * torch.randn(n, generator=g))


def lr_at(r: BaseRecipe, step: int) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio * lr."""
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    p = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train(r: BaseRecipe, log_every: int = 100) -> tuple[FlowMap, FlowMap, dict]:
    """Run the fixed-step flow-matching schedule; returns (raw model, EMA model, log)."""
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    g = torch.Generator().manual_seed(r.seed)
    x_all, y_all = load_digits_tensor("all")
    model = FlowMap(model_config(r)).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=r.betas, weight_decay=r.weight_decay)
    n = len(x_all)
    perm, pos = torch.randperm(n, generator=g), 0
    losses, t0, recent = [], time.time(), []
    for step in range(r.steps):
        if pos + r.batch_size > n:  # epoch-wise shuffling, seeded
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + r.batch_size]
        pos += r.batch_size
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=g) < r.label_dropout] = 10  # null class for CFG
        eps = torch.randn(x0.shape, generator=g)
        t = sample_t(r, len(x0), g)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps  # canonical path: t = 1 is noise
        loss = ((model(x_t, t, None, y) - (eps - x0)) ** 2).mean()  # flow matching: v = eps - x0
        for grp in opt.param_groups:
            grp["lr"] = lr_at(r, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        decay = min(r.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)  # ema = decay * ema + (1 - decay) * model
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == r.steps:
            el = time.time() - t0
            losses.append({"step": step + 1, "loss": sum(recent) / len(recent), "seconds": round(el, 1)})
            print(
                f"step {step + 1:5d}/{r.steps}  loss {losses[-1]['loss']:.4f}  lr {lr_at(r, step):.2e}  {(step + 1) / el:.2f} steps/s  {el / 60:.1f} min",
                flush=True,
            )
            recent = []
    wall = time.time() - t0
    log = {
        "final_loss": losses[-1]["loss"],
        "loss_curve": losses,
        "wall_seconds": round(wall, 1),
        "steps_per_second": round(r.steps / wall, 3),
        "machine": f"{platform.machine()} cpu, torch {torch.__version__}, {r.threads} threads (cores shared with other jobs)",
    }
    return model.eval(), ema, log


def parse_overrides(items: list[str]) -> dict:
    """`FIELD=VALUE` strings -> typed BaseRecipe overrides (types taken from the defaults)."""
    defaults, out = asdict(BaseRecipe()), {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in defaults or key == "betas":
            raise SystemExit(f"unknown or unsupported recipe field {key!r}; choose from {sorted(defaults)}")
        out[key] = type(defaults[key])(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=BaseRecipe.steps, help="optimizer steps (the shipped model: default)")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="exported model directory (default: the shipped builtin)"
    )
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which weights to export")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a BaseRecipe field, e.g. --set batch_size=64 (repeatable)",
    )
    args = ap.parse_args()
    recipe = BaseRecipe(steps=args.steps, **parse_overrides(args.set))
    raw, ema, log = train(recipe)
    model = ema if args.weights == "ema" else raw
    training = {
        "objective": "flow matching, x_t = (1 - t) x0 + t eps, target eps - x0, MSE",
        "data": "builtin:digits (all 1797 sklearn digits, bilinear 8->16, align_corners=False, [-1, 1])",
        "weights": args.weights,
        "recipe": asdict(recipe),
        "command": " ".join(
            ["python benchmarks/digits/train_base.py", f"--steps {args.steps}", *(f"--set {o}" for o in args.set)]
        ),
        **{k: v for k, v in log.items() if k != "loss_curve"},
    }
    prov = {"source": "builtin:digits-sit", "family": "flowmap", "flowmap_version": __version__}
    model.config = model.config.replace(provenance=prov, training=training)
    export(model, args.out)
    args.out.chmod(0o755)  # mkdtemp makes 0700 directories; package data should be world-readable
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.out} ({model.num_parameters():,} parameters, {size / 1e6:.2f} MB weights)")


if __name__ == "__main__":
    main()
