"""The fine-tuner's DataLoader: worker processes read ahead, yet every micro-batch (data, posterior noise and the
generator the objective continues with) is the one the loop would draw itself, whatever the workers, jumps or
rollbacks; a fine-tune with workers trains on exactly the numbers of one without."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config


def moments_folder(root, n=12):
    """A REPA-layout vae-sd folder (posterior moments: the draw consumes the micro-batch's generator)."""
    from flowmap_convert.finetuning.data import load_dataset

    d = root / "vae-sd" / "00000"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        m = np.concatenate([rng.standard_normal((1, 16, 16)), np.full((1, 16, 16), 0.3)]).astype(np.float32)
        np.save(d / f"img-mean-std-{i:08d}.npy", m)
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 10])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return load_dataset(str(root))


def direct(ds, sampler, seed, micro, world, rank, accum, rollbacks):
    """What the training loop drew before the loader: the shard's data, then the objective's next numbers."""
    from flowmap_convert.finetuning.checkpoint import step_generator
    from flowmap_convert.finetuning.data import global_shard

    shard = global_shard(micro, world, rank, accum)
    gen = step_generator(seed, shard, rollbacks)
    x0, y = ds.get(sampler.indices(shard), gen)
    return x0, y, torch.randn(3, generator=gen)


def moments_shards(root, n=12):
    """`flowmap encode`'s SD-VAE layout: safetensors shards of moments (mapped from disk when read)."""
    from safetensors.torch import save_file

    from flowmap_convert.finetuning.data import load_dataset

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(0, n, 5):
        m = min(5, n - k)
        moments = torch.cat([torch.randn(m, 1, 16, 16, generator=g), torch.full((m, 1, 16, 16), 0.3)], dim=1)
        tensors = {"moments": moments, "labels": torch.arange(k, k + m) % 10, "scale": torch.tensor([0.5])}
        save_file(tensors | {"bias": torch.tensor([0.1])}, str(root / f"shard-{k:05d}.safetensors"))
    ds = load_dataset(str(root))
    assert ds.mapped is not None and ds.posterior
    return ds


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("layout", [moments_folder, moments_shards])
def test_stream_gives_each_micro_batch_the_loop_would_draw_across_jumps_and_rollbacks(tmp_path, workers, layout):
    from flowmap_convert.finetuning.data import EpochSampler
    from flowmap_convert.finetuning.loader import BatchStream

    ds = layout(tmp_path / "data")
    sampler = EpochSampler(len(ds), 4, seed=5)
    for world, rank, accum in [(1, 0, 1), (2, 1, 2)]:
        stream = BatchStream(ds, sampler, 5, world, rank, accum, workers=workers, pin=False)
        plan = [(m, 0) for m in range(5)] + [(2, 0), (3, 0), (3, 1), (4, 1), (9, 1)]  # resume jump, rollback, skip
        for micro, rollbacks in plan:
            x0, y, gen = stream.get(micro, rollbacks)
            rx, ry, rnext = direct(ds, sampler, 5, micro, world, rank, accum, rollbacks)
            assert torch.equal(x0, rx) and torch.equal(y, ry), (world, micro, rollbacks)
            assert torch.equal(torch.randn(3, generator=gen), rnext)  # the objective continues the same stream
        stream.close()


def test_a_bad_row_drawn_in_a_worker_is_the_one_line_error(tmp_path):
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.data import EpochSampler, LatentDataset
    from flowmap_convert.finetuning.loader import BatchStream

    x = torch.zeros(4, 1, 16, 16)
    x[2] = float("nan")
    ds = LatentDataset(x, torch.zeros(4), name="bad")
    stream = BatchStream(ds, EpochSampler(4, 4, 0), 0, 1, 0, 1, workers=1, pin=False)
    with pytest.raises(FlowmapError, match="non-finite latents"):
        stream.get(0, 0)


def test_default_workers_leave_a_two_core_cpu_to_the_model(monkeypatch, tmp_path):
    from flowmap_convert.finetuning import loader
    from flowmap_convert.finetuning.data import LatentDataset

    mem = LatentDataset(torch.zeros(2, 1, 16, 16), torch.zeros(2))
    lazy = moments_folder(tmp_path, n=2)
    monkeypatch.setattr(loader, "available_cores", lambda: 2)
    assert loader.default_workers(torch.device("cpu"), lazy) == 0
    monkeypatch.setattr(loader, "available_cores", lambda: 16)
    assert loader.default_workers(torch.device("cpu"), mem) == 0
    assert loader.default_workers(torch.device("cpu"), lazy) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader.default_workers(torch.device("cuda"), mem) == 1  # 16 cores / 8 GPUs, one left for the loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader.default_workers(torch.device("cuda"), mem) == loader.MAX_WORKERS


def test_finetune_with_two_workers_trains_on_the_numbers_of_one_without(tmp_path):
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning import finetune
    from flowmap_convert.model import FlowMap

    moments_folder(tmp_path / "data")
    runs = {}
    for w in (0, 2):
        torch.manual_seed(0)
        model = randomize(FlowMap(tiny_config(num_blocks=2))).with_depth(1)
        finetune(
            model,
            data=str(tmp_path / "data"),
            steps=3,
            batch_size=4,
            lr=1e-3,
            mg_scale=0.5,
            out=tmp_path / f"w{w}",
            progress=False,
            grid=False,
            workers=w,
        )
        runs[w] = [json.loads(x)["loss"] for x in (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()]
    assert len(runs[0]) == 3 and runs[0] == runs[2]
    with pytest.raises(FlowmapError, match="`workers`"):
        finetune(FlowMap(tiny_config()), data=str(tmp_path / "data"), out=tmp_path / "x", workers=-1)
