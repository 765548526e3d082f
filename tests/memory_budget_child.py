"""Child process of test_memory_budget: one fine-tuning run on a mid-size model, its memory as JSON on stdout.

    memory_budget_child.py TRAIN OBJECTIVE            a dry run (2 steps)
    memory_budget_child.py TRAIN OBJECTIVE DIR start  1 step, checkpoint and export into DIR
    memory_budget_child.py TRAIN OBJECTIVE DIR resume --resume DIR for one more step, and export

Run alone so that its peak (resource.getrusage's RSS, and the anonymous resident memory sampled by
flowmap_convert.finetuning.memory.AnonPeak) belongs to this run only.
"""

import json
import resource
import sys

import torch

from flowmap_convert.config import LatentSpace, ModelConfig
from flowmap_convert.finetuning import finetune
from flowmap_convert.finetuning.memory import AnonPeak, anon_bytes, current_bytes
from flowmap_convert.model import FlowMap


def warm_up() -> None:
    """Import what the first optimizer step and jvp import (about 150 MB of RSS), so it counts before the model."""
    import accelerate  # noqa: F401
    from torch.func import jvp

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p])
    x = torch.ones(4, requires_grad=True)
    jvp(lambda a: (a * p).sin(), (x,), (torch.ones(4),))[1].sum().backward()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    opt.step()


def main(train: str, objective: str, out: str | None = None, phase: str = "dry") -> None:
    torch.set_num_threads(1)
    warm_up()
    cfg = ModelConfig(
        input_size=8,  # 4 x 8 x 8 latents, patch 2: 16 tokens, so the activations are small next to the states
        in_channels=4,
        patch_size=2,
        hidden_size=512,
        num_blocks=10,
        num_heads=8,
        mlp_ratio=4.0,
        num_classes=10,
        class_embed_rows=11,
        latent=LatentSpace(kind="identity", channels=4, size=8, image_channels=4, image_size=8),
    )
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    before, before_anon = current_bytes(torch.device("cpu")), anon_bytes()
    torch.manual_seed(0)  # the same model in the run that starts and the one that resumes
    model = FlowMap(cfg).with_depth(6)
    run = {
        "dry": {"steps": 10, "out": "unused", "dry_run": True, "dry_run_steps": 2},
        "start": {"steps": 1, "out": out, "checkpoint_every": 1},
        "resume": {"steps": 2, "out": out, "checkpoint_every": 1, "resume": True},
    }[phase]
    with AnonPeak() as anon:
        rep = finetune(
            model,
            data=data,
            objective=objective,
            train=train,
            batch_size=2,
            mg_scale=0.0,
            label_dropout=0.0,
            progress=False,
            grid=False,
            **run,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = rep["parameters"] if isinstance(rep, dict) else {"trainable": trainable}
    print(
        json.dumps(
            {
                "before_model": before,
                "peak": peak,
                "before_anon": before_anon,
                "peak_anon": anon.peak,
                "parameters": params,
                "memory": rep.get("memory") if isinstance(rep, dict) else None,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3], *sys.argv[3:5])
