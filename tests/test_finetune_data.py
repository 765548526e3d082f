"""Fine-tuning data: REPA moments folders, our shards, image folders + `flowmap encode`, and early user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config


def test_repa_moments_folder_samples_the_posterior(tmp_path):
    from flowmap_convert.finetuning.data import check_dataset, load_dataset

    root = tmp_path / "ds" / "vae-sd"
    (root / "00000").mkdir(parents=True)
    labels = []
    rng = np.random.default_rng(0)
    means = []
    for i in range(5):
        mean = rng.standard_normal((1, 16, 16)).astype(np.float32)
        std = np.full((1, 16, 16), 0.5 if i == 4 else 0.0, np.float32)
        np.save(root / "00000" / f"img-mean-std-{i:08d}.npy", np.concatenate([mean, std]))
        labels.append([f"00000/img-mean-std-{i:08d}.npy", i % 3])
        means.append(mean)
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    ds = load_dataset(str(tmp_path / "ds"))
    check_dataset(ds, tiny_config())
    x, y = ds.get(torch.tensor([0, 2, 4]), torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and y.tolist() == [0, 2, 1]
    assert torch.allclose(x[0], torch.from_numpy(means[0]) * 0.18215)  # std 0: z = mean * 0.18215
    g = torch.Generator().manual_seed(0)
    g.manual_seed(0)
    eps = torch.randn(3, 1, 16, 16, generator=g)
    assert torch.allclose(x[2], (torch.from_numpy(means[4]) + 0.5 * eps[2]) * 0.18215, atol=1e-6)


@pytest.mark.parametrize(
    "latents,labels,match",
    [
        (np.zeros((4, 1, 8, 8)), np.zeros(4), "shape"),
        (np.zeros((4, 1, 16, 16)), np.array([0, 1, 2, 10]), "labels"),
        (np.where(np.arange(4)[:, None, None, None] == 2, np.nan, 0.0) * np.ones((4, 1, 16, 16)), np.zeros(4), "NaN"),
        (np.zeros((0, 1, 16, 16)), np.zeros(0), "empty"),
    ],
)
def test_bad_data_is_a_user_error_before_training(tmp_path, latents, labels, match):
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.data import check_dataset, load_dataset

    np.savez(tmp_path / "d.npz", latents=latents.astype(np.float32), labels=labels.astype(np.int64))
    with pytest.raises(FlowmapError, match=match):
        check_dataset(load_dataset(str(tmp_path / "d.npz")), tiny_config())


@pytest.mark.e2e
def test_cli_bad_data_exits_2_and_writes_nothing(tmp_path):
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    export(FlowMap(tiny_config()), tmp_path / "m")
    np.savez(tmp_path / "d.npz", latents=np.zeros((4, 3, 16, 16), np.float32), labels=np.zeros(4, np.int64))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmap_convert.cli",
            "finetune",
            str(tmp_path / "m"),
            "--data",
            str(tmp_path / "d.npz"),
            "--depth",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "error:" in r.stderr and "shape" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    r = subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", "finetune", str(tmp_path / "m"), "--precision", "fp16"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "fp16" in r.stderr


@pytest.mark.e2e
def test_encode_image_folder_round_trip(tmp_path):
    from PIL import Image

    from flowmap_convert.finetuning.data import check_dataset, load_dataset
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    export(FlowMap(tiny_config()), tmp_path / "m")
    for c, name in enumerate(["a_cls", "b_cls"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24), 40 * (c + 1) + i, np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmap_convert.cli",
            "encode",
            str(tmp_path / "m"),
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "lat"),
            "--shard-size",
            "4",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == [
        ".flowmap-output.json",  # the output marker (flowmap_convert.io)
        "meta.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    ds = load_dataset(str(tmp_path / "lat"))
    check_dataset(ds, tiny_config())
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.latents is None and len(ds.mapped) == 2  # the shards stay on disk, mapped
    x, _ = ds.get(torch.arange(6), torch.Generator())
    assert torch.allclose(x[4, 0, 0, 0], torch.tensor(81 / 127.5 - 1))  # identity encoder: pixels in [-1, 1]
    # the same folder used directly as --data is encoded on the fly to the same latents
    direct = load_dataset(str(tmp_path / "imgs"), FlowMap(tiny_config()).config.latent)
    assert torch.equal(direct.latents, x)


@pytest.mark.e2e
def test_cli_defaults_to_builtin_digits_dry_run(tmp_path):
    """`flowmap finetune --mg-scale 0.6` with no MODEL uses builtin:digits-sit + builtin:digits (dry run: nothing written)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowmap_convert.cli",
            "finetune",
            "--mg-scale",
            "0.6",
            "--dry-run",
            "--batch-size",
            "4",
            "--train",
            "decoder",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "trainable" in r.stdout and "seconds/step" in r.stdout and "nothing written" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_global_shards_give_p_processes_the_micro_batches_of_one_process_with_p_times_the_accumulation():
    from flowmap_convert.finetuning.data import EpochSampler, global_shard

    for step in range(3):
        one = [global_shard(step * 4 + a, 1, 0, 4) for a in range(4)]
        two = [global_shard(step * 2 + a, 2, rank, 2) for rank in range(2) for a in range(2)]
        assert one == two == list(range(step * 4, step * 4 + 4))
    s = EpochSampler(10, 2, seed=3)
    epoch = torch.cat([s.indices(i) for i in range(5)])
    assert sorted(epoch.tolist()) == list(range(10))  # each sample once per epoch
    assert torch.equal(EpochSampler(10, 2, seed=3).indices(7), s.indices(7))  # a pure function of the shard
    assert not torch.equal(torch.cat([s.indices(i) for i in range(5, 10)]), epoch)  # a new order next epoch


def repa_folder(root, n, per_dir=1000):
    """n empty moments files in REPA's layout (sub-folders of per_dir) and their dataset.json."""
    labels = []
    for i in range(n):
        sub = f"{i // per_dir:05d}"
        if i % per_dir == 0:
            (root / sub).mkdir(parents=True)
        open(root / sub / f"img-mean-std-{i:08d}.npy", "wb").close()
        labels.append([f"{sub}/img-mean-std-{i:08d}.npy", i % 7])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))


def test_repa_folder_is_listed_once_in_sorted_order_with_its_labels(tmp_path):
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.data import list_npy, read_moments_folder

    root = tmp_path / "ds" / "vae-sd"
    repa_folder(root, 2500, per_dir=600)
    (root / "00001" / "notes.txt").write_text("not a moments file")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.npy").write_bytes(b"")
    (root / "link").symlink_to(tmp_path / "elsewhere")  # like rglob: a linked directory is not entered
    files = list_npy(root)
    assert files == sorted(str(p.relative_to(root)) for p in root.rglob("*.npy")) and len(files) == 2500
    ds = read_moments_folder(tmp_path / "ds")
    assert len(ds) == 2500 and ds.labels[:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert ds.file(601) == root / "00001" / "img-mean-std-00000601.npy"
    (root / "dataset.json").write_text(json.dumps({"labels": [["00000/img-mean-std-00000000.npy", 1]]}))
    with pytest.raises(FlowmapError, match="2499 moments files have no label"):
        read_moments_folder(tmp_path / "ds")
    (root / "dataset.json").write_text(json.dumps({"labels": [[1, 2, 3]]}))
    with pytest.raises(FlowmapError, match="dataset.json"):
        read_moments_folder(tmp_path / "ds")


@pytest.mark.slow
def test_listing_200k_moments_files_takes_seconds(tmp_path):
    """ImageNet's 1.28M files in REPA's layout, at 1/6 scale (benchmarks/results/moments_listing-cpu.json)."""
    import time

    from flowmap_convert.finetuning.data import read_moments_folder

    repa_folder(tmp_path / "vae-sd", 200_000)
    t = time.perf_counter()
    ds = read_moments_folder(tmp_path)
    took = time.perf_counter() - t
    assert len(ds) == 200_000 and ds.file(199_999).name == "img-mean-std-00199999.npy"
    assert took < 20, f"listing 200k files took {took:.1f} s"  # 3.6 s measured on 2 shared cores; rglob took 14 s


def test_safetensors_shards_are_mapped_and_read_like_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.data import check_dataset, load_dataset

    g = torch.Generator().manual_seed(0)
    d = tmp_path / "lat"
    d.mkdir()
    for k, n in enumerate([5, 3, 4]):
        save_file(
            {"latents": torch.randn(n, 1, 16, 16, generator=g), "labels": torch.arange(n) + k},
            str(d / f"shard-{k:05d}.safetensors"),
        )
    ds = load_dataset(str(d))
    check_dataset(ds, tiny_config())
    whole = [load_file(str(d / f"shard-{k:05d}.safetensors")) for k in range(3)]
    ref = torch.cat([w["latents"] for w in whole])
    assert ds.mapped is not None and len(ds) == 12
    assert torch.equal(ds.labels, torch.cat([w["labels"] for w in whole]))
    idx = torch.tensor([11, 0, 5, 4, 8, 7])  # across shard boundaries, in any order
    assert torch.equal(ds.get(idx, torch.Generator())[0], ref[idx])

    bad = torch.randn(2, 1, 16, 16)
    bad[1, 0, 3, 3] = float("nan")
    save_file({"latents": bad, "labels": torch.zeros(2, dtype=torch.long)}, str(d / "shard-00003.safetensors"))
    with pytest.raises(FlowmapError, match="NaN"):
        check_dataset(load_dataset(str(d)), tiny_config())
    (d / "shard-00003.safetensors").write_bytes((d / "shard-00000.safetensors").read_bytes()[:300])  # truncated
    with pytest.raises(FlowmapError, match="not a readable dataset shard"):
        load_dataset(str(d))
