"""`flowmap encode` at scale: SD-VAE posterior moments in shards, ADM's centre crop, streaming, resume after a kill,
and 2 gloo processes under torchrun writing the very bytes one process writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_vae
from PIL import Image

SIZES = [(40, 30), (16, 16), (70, 20), (33, 64), (18, 17), (100, 100), (25, 40)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    """A tiny model in a tiny random SD-VAE's latent space (16 px images, 4x8x8 latents), and an image folder."""
    from flowmap_convert.config import LatentSpace
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    root = tmp_path_factory.mktemp("enc")
    vae = tiny_vae()
    vae.save_pretrained(root / "sdvae" / "vae")
    latent = LatentSpace(
        kind="sd-vae",
        channels=4,
        size=8,
        image_channels=3,
        image_size=16,
        repo=str(root / "sdvae"),
        scale=0.18215,
        extra={"subfolder": "vae"},
    )
    torch.manual_seed(0)
    export(FlowMap(tiny_config(in_channels=4, input_size=8, latent=latent)), root / "m")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        d = root / "imgs" / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root, vae, latent


def encode_args(root, out, shard_size=2, batch_size=2):
    return [
        "-m",
        "flowmap_convert.cli",
        "encode",
        str(root / "imgs"),
        "--model",
        str(root / "m"),
        "--out",
        str(out),
        "--shard-size",
        str(shard_size),
        "--batch-size",
        str(batch_size),
    ]


def tree_bytes(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_two_gloo_processes_encode_the_bytes_one_process_writes(vae_model, tmp_path):
    root, _, _ = vae_model
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, *encode_args(root, tmp_path / "one")], capture_output=True, text=True, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    r2 = subprocess.run(
        [sys.executable, *launch, *encode_args(root, tmp_path / "two")], capture_output=True, text=True, env=env
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("encoded 7 images in 3 classes") == 1  # one rank reports, one rank writes
    one, two = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert sorted(one) == [".flowmap-output.json", "meta.json"] + [f"shard-{k:05d}.safetensors" for k in range(4)]
    assert one == two  # shards 0 and 2 from rank 0, 1 and 3 from rank 1: the same bytes
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial directory left behind


def test_sd_vae_shards_hold_the_posterior_and_training_draws_a_fresh_sample(vae_model, tmp_path):
    from safetensors.torch import load_file

    from flowmap_convert.encode import encode_folder
    from flowmap_convert.finetuning.data import check_dataset, list_image_folder, load_dataset, load_images
    from flowmap_convert.model import read_model_dir

    root, vae, latent = vae_model
    encode_folder(root / "imgs", str(root / "m"), tmp_path / "lat", shard_size=3, batch_size=2, progress=False)
    files, labels, _ = list_image_folder(root / "imgs")
    shard = load_file(str(tmp_path / "lat" / "shard-00001.safetensors"))
    assert set(shard) == {"moments", "labels", "scale", "bias"}
    assert shard["moments"].shape == (3, 8, 8, 8) and shard["labels"].tolist() == labels[3:6]
    assert float(shard["scale"][0]) == 0.18215 and float(shard["bias"][0]) == 0.0
    with torch.no_grad():
        post = vae.encode(load_images(files[3:6], 16, 3)).latent_dist
    assert torch.allclose(shard["moments"][:, :4], post.mean, atol=1e-5)
    assert torch.allclose(shard["moments"][:, 4:], post.std, atol=1e-5)

    ds = load_dataset(str(tmp_path / "lat"))
    check_dataset(ds, read_model_dir(root / "m").config)
    assert ds.posterior and len(ds) == 7 and ds.sample_shape == (4, 8, 8)
    idx = torch.tensor([3, 4])
    a, ya = ds.get(idx, torch.Generator().manual_seed(1))
    b, _ = ds.get(idx, torch.Generator().manual_seed(2))
    assert ya.tolist() == labels[3:5] and not torch.equal(a, b)  # a fresh sample at each draw
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, (post.mean[:2] + post.std[:2] * eps) * 0.18215, atol=1e-5)


def test_adm_centre_crop_halves_resizes_the_short_side_and_cuts_the_centre():
    from flowmap_convert.finetuning.data import adm_center_crop

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8))
    got = np.asarray(adm_center_crop(img, 64))
    # ADM: 600x400 -> box-halved while the short side >= 128 (300x200, 150x100) -> bicubic to 96x64 -> centre 64x64
    ref = img.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got, np.asarray(ref)[:, 16:80])
    tall = Image.fromarray(rng.integers(0, 256, (50, 30, 3), dtype=np.uint8))  # upscaled: 30x50 -> 16x27, rows 5..20
    assert np.array_equal(np.asarray(adm_center_crop(tall, 16)), np.asarray(tall.resize((16, 27), Image.BICUBIC))[5:21])


def test_encode_streams_one_batch_at_a_time_and_resumes_after_a_kill(vae_model, tmp_path, monkeypatch):
    import flowmap_convert.encode as encode_mod
    from flowmap_convert.encode import encode_folder
    from flowmap_convert.errors import FlowmapError

    root, _, latent = vae_model
    encode_folder(root / "imgs", str(root / "m"), tmp_path / "ref", shard_size=2, batch_size=2, progress=False)

    seen = []
    real = encode_mod.load_images  # finetuning.data's reader, as encode imports it
    monkeypatch.setattr(encode_mod, "load_images", lambda f, s, c: seen.append(len(f)) or real(f, s, c))

    def killed(k):
        if k == 1:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        encode_folder(root / "imgs", str(root / "m"), out, shard_size=2, batch_size=2, progress=False, on_shard=killed)
    assert not out.exists() and max(seen) <= 2  # never more than one batch of images in memory
    part = tmp_path / ".run.partial"
    assert sorted(p.name for p in part.iterdir()) == ["run.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(FlowmapError, match="other settings"):  # another shard size is another run
        encode_folder(root / "imgs", str(root / "m"), out, shard_size=3, batch_size=2, progress=False)
    done = []
    seen.clear()
    encode_folder(root / "imgs", str(root / "m"), out, shard_size=2, batch_size=2, progress=False, on_shard=done.append)
    assert done == [2, 3] and sum(seen) == 3  # shards 0 and 1 were not encoded again
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref") and not part.exists()


def test_encode_refuses_bad_numbers_before_any_work(vae_model, tmp_path):
    from flowmap_convert.encode import encode_folder
    from flowmap_convert.errors import FlowmapError

    root, _, _ = vae_model
    with pytest.raises(FlowmapError, match="`shard_size`"):
        encode_folder(root / "imgs", str(root / "m"), tmp_path / "x", shard_size=0)
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()
