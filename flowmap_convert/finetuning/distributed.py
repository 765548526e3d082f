"""Distributed set-up: the Accelerator, the DDP-wrapped loss module, replica checks and scalar means over processes.

Why the loss, not the model, is what DDP wraps: DDP's gradient all-reduce (bucketed, overlapped with the backward)
only fires for a backward whose graph came out of DDP.forward, while torch.func.jvp must never see the DDP wrapper.
`LossModule` holds the FlowMap as its submodule and computes the whole objective in its forward, calling the
UNWRAPPED FlowMap (plain calls and torch.func.jvp alike). Wrapping LossModule in DDP therefore gives both: the JVP
runs on the plain module, and every trainable parameter's gradient is reduced by DDP's hooks during the backward.
DDP also starts every replica from rank 0's weights (it broadcasts them when it wraps the module).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

import torch
from torch import nn

from ..errors import FlowmapError


class LossModule(nn.Module):
    """forward(x0, y, gen) -> (loss, metrics): the objective on the model it holds (what DDP wraps)."""

    def __init__(self, model: nn.Module, objective, ctx):
        super().__init__()
        self.model = model  # registered: DDP sees (and reduces) exactly the FlowMap's parameters
        self.objective, self.ctx = objective, ctx  # ctx.calls holds the same, unwrapped FlowMap

    def forward(self, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        return self.objective(self.ctx, x0, y, gen)


def make_accelerator(device: torch.device, log_with, out):
    """An Accelerator on `device` (the CPU when asked; under torchrun / accelerate launch, one process per rank)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    return Accelerator(
        cpu=device.type == "cpu",
        log_with=log_with,
        project_dir=str(out),
        kwargs_handlers=[ddp],
        step_scheduler_with_optimizer=False,
    )


def wrap(acc, loss_module: LossModule) -> nn.Module:
    """accelerator.prepare(loss_module): DDP over several processes, the module itself on one."""
    return acc.prepare_model(loss_module)


def sync_context(acc, wrapped: nn.Module, last_micro: bool):
    """No gradient all-reduce while accumulating micro-batches; DDP reduces on the last one."""
    return nullcontext() if last_micro or acc.num_processes == 1 else acc.no_sync(wrapped)


def weights_digest(model: nn.Module) -> str:
    """sha256 of every weight of this replica (bit-exact comparison across processes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas(model: nn.Module, world: int, step: int) -> str | None:
    """All processes must hold bit-identical weights: the shared digest, or a FlowmapError; None on one process."""
    if world == 1:
        return None
    import torch.distributed as dist

    digests = [None] * world
    dist.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise FlowmapError(
            f"the {world} replicas hold different weights after step {step}; this is a bug, please report it."
        )
    return digests[0]


def mean_over_ranks(values: list[float], world: int, device) -> list[float]:
    """Mean of a few scalars over processes (NaN anywhere stays NaN)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
        t /= world
    return t.tolist()
