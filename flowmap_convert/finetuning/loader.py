"""Training batches read ahead by DataLoader worker processes while the model computes.

The data stay a pure function of the step. Item s of `ShardBatches` is global shard s (data.global_shard): the
samples `EpochSampler.indices(s)`, drawn (REPA moments: the posterior sample) with the micro-batch's own generator
`checkpoint.step_generator(seed, s, rollbacks)`; the item carries that generator's state after the draw, and the
objective continues from it, so every random number is the one the loop drew when it read the data itself. The
loader's sampler walks this process's shards from the current micro-batch on; a jump (resume, dry run) or a
rollback (new random numbers) restarts the workers at the new position. With 0 workers the same items are made in
the training process.
"""

from __future__ import annotations

import os

import torch

from ..errors import FlowmapError
from ..runtime import available_cores
from ..vocabulary import register_flags
from .checkpoint import step_generator
from .data import EpochSampler, LatentDataset, global_shard

MAX_WORKERS = 8
register_flags({"workers": "--workers"})


def default_workers(device: torch.device, data: LatentDataset) -> int:
    """Worker processes when none are asked for.

    CUDA: the cores of this process's share of the node (LOCAL_WORLD_SIZE processes) less one for the training
    loop, 1 to 8. CPU: the model needs the cores, so 0 on up to 2 cores or for data held in memory, else 1 to read a
    lazy REPA folder ahead.
    """
    cores = available_cores()
    if device.type == "cuda":
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        return max(1, min(MAX_WORKERS, cores // local - 1))
    return 1 if cores > 2 and data.latents is None else 0


class ShardBatches(torch.utils.data.Dataset):
    """Map-style dataset over (global shard, rollbacks) keys: the micro-batch and its generator state after the draw."""

    def __init__(self, data: LatentDataset, sampler: EpochSampler, seed: int):
        self.data, self.sampler, self.seed = data, sampler, seed

    def __getitem__(self, key):
        shard, rollbacks = key
        gen = step_generator(self.seed, shard, rollbacks)
        try:
            x0, y = self.data.get(self.sampler.indices(shard), gen)
        except FlowmapError as e:  # handed to the training process as a value: raised there as the one-line error
            return shard, e
        return shard, x0, y, gen.get_state()


class _Keys:
    """This process's (global shard, rollbacks) keys from micro-batch `start` on, without end."""

    def __init__(self, start: int, world: int, rank: int, grad_accum: int, rollbacks: int):
        self.start, self.world, self.rank, self.grad_accum, self.rollbacks = start, world, rank, grad_accum, rollbacks

    def __iter__(self):
        m = self.start
        while True:
            yield global_shard(m, self.world, self.rank, self.grad_accum), self.rollbacks
            m += 1


class BatchStream:
    """`get(micro, rollbacks) -> (x0, y, gen)`: this process's micro-batch `micro`, read ahead by `workers` processes."""

    def __init__(self, data, sampler, seed: int, world: int, rank: int, grad_accum: int, workers: int, pin: bool):
        self.items = ShardBatches(data, sampler, seed)
        self.world, self.rank, self.grad_accum = world, rank, grad_accum
        self.workers, self.pin = workers, pin
        self._it, self._at = None, None  # the running iterator and the (micro, rollbacks) it yields next

    def _start(self, micro: int, rollbacks: int) -> None:
        self.close()
        keys = _Keys(micro, self.world, self.rank, self.grad_accum, rollbacks)
        loader = torch.utils.data.DataLoader(
            self.items,
            batch_size=None,  # each item already is a micro-batch
            sampler=keys,
            num_workers=self.workers,
            pin_memory=self.pin,
            prefetch_factor=2 if self.workers else None,
        )
        self._it = iter(loader)

    def get(self, micro: int, rollbacks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """The data and the generator (positioned after the data's draws) of micro-batch `micro`."""
        if self._it is None or self._at != (micro, rollbacks):
            self._start(micro, rollbacks)
        item = next(self._it)
        self._at = (micro + 1, rollbacks)
        want = global_shard(micro, self.world, self.rank, self.grad_accum)
        if isinstance(item[1], FlowmapError):
            self.close()
            raise item[1]
        shard, x0, y, state = item
        if int(shard) != want:  # the stream is keyed by position; a mismatch would silently train on other data
            raise RuntimeError(f"data stream out of step: shard {int(shard)} arrived for shard {want}")
        gen = torch.Generator()
        gen.set_state(state)
        return x0, y, gen

    def close(self) -> None:
        """Stop the worker processes (a new get() starts them again)."""
        it, self._it, self._at = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
