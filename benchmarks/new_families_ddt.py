"""DDT-XL/2 22en6de at real size with random weights: `flowmap convert MCG-NJU/DDT` + a 1-step `flowmap sample`.

Builds, in a temporary directory (about 3 GB, deleted at the end), an offline Hugging Face cache holding
  MCG-NJU/DDT-XL-22en6de-R256/model.ckpt   a Lightning checkpoint (state_dict["ema_denoiser.*"]) of a random
                                           DDT-XL/2 (hidden 1152, 16 heads, 28 blocks, 22 encoder blocks)
  stabilityai/sd-vae-ft-ema                a random AutoencoderKL with SD-VAE's architecture
then times the two CLI commands in subprocesses (HF_HUB_OFFLINE=1) and writes a markdown report.

  .venv/bin/python benchmarks/new_families_ddt.py --out benchmarks/results/new_families-ddt-cpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the repo's own random state dicts
from mcg_ddt_reference import random_ddt_sd  # noqa: E402

REPO = "MCG-NJU/DDT-XL-22en6de-R256"
COMMIT = "0" * 40


def random_ddt_xl(seed: int = 0) -> dict:
    """A DDT-XL/2 22en6de state dict with the official keys and shapes (random N(0, 0.02) values, norms at 1)."""
    return random_ddt_sd(1152, 16, 28, channels=4, patch=2, classes=1000, seed=seed, std=0.02, unit_norms=True)


def put_file(cache: Path, repo: str, rel: str, src: Path) -> None:
    """Move `src` into a huggingface_hub cache layout (blob by sha256, snapshot symlink, refs/main)."""
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    base = cache / f"models--{repo.replace('/', '--')}"
    blob = base / "blobs" / h.hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), blob)
    link = base / "snapshots" / COMMIT / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)


def run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/new_families-ddt-cpu.md"))
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the temporary directory (default: /tmp)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    tmp = Path(tempfile.mkdtemp(prefix="flowmap-ddt-", dir=args.tmp))
    try:
        cache = tmp / "hub"
        t0 = time.perf_counter()
        sd = random_ddt_xl()
        n_params = sum(v.numel() for v in sd.values())
        ckpt = {"epoch": 0, "global_step": 0, "state_dict": {"ema_denoiser." + k: v for k, v in sd.items()}}
        torch.save(ckpt, tmp / "model.ckpt")
        ckpt_bytes = (tmp / "model.ckpt").stat().st_size
        del sd, ckpt
        put_file(cache, REPO, "model.ckpt", tmp / "model.ckpt")
        from diffusers import AutoencoderKL  # SD-VAE's architecture (stabilityai/sd-vae-ft-ema config.json)

        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=256,
        )
        vae.save_pretrained(tmp / "vae")
        del vae
        for f in (tmp / "vae").iterdir():
            put_file(cache, "stabilityai/sd-vae-ft-ema", f.name, f)
        setup_s = time.perf_counter() - t0

        load_before = os.getloadavg()[0]
        env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        exe = [sys.executable, "-m", "flowmap_convert.cli"]
        convert_cmd = [*exe, "convert", "MCG-NJU/DDT", "--out", str(tmp / "ddt-fm")]
        conv_s, conv = run(convert_cmd, env)
        rss_convert = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        cfg = json.loads((tmp / "ddt-fm" / "config.json").read_text())
        export_bytes = (tmp / "ddt-fm" / "model.safetensors").stat().st_size
        sample_cmd = [*exe, "sample", str(tmp / "ddt-fm"), "--nfe", "1", "-n", "2", "--classes", "207,360"]
        sample_cmd += ["--batch-size", "2", "--npz", "--out", str(tmp / "samples")]
        samp_s, samp = run(sample_cmd, env)
        rss_all = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        arr = np.load(tmp / "samples" / "samples.npz")["arr_0"]
        pngs = sorted(p.name for p in (tmp / "samples").glob("*.png"))
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    show = lambda cmd: " ".join(c if not c.startswith(str(tmp)) else "$TMP" + c[len(str(tmp)) :] for c in cmd[1:])  # noqa: E731
    notes = [ln for ln in conv.stderr.splitlines() if ln.startswith("flowmap:")]
    lines = [
        "# DDT-XL/2 22en6de at real size (random weights): convert + 1-step sample on CPU",
        "",
        "Produced by `.venv/bin/python benchmarks/new_families_ddt.py --out benchmarks/results/new_families-ddt-cpu.md`",
        f"on {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}; the script builds",
        "an offline Hub cache ($TMP/hub, deleted afterwards) with a Lightning checkpoint of a random DDT-XL/2 at",
        f"`{REPO}/model.ckpt` and a random SD-VAE with its real architecture, then runs (HF_HUB_OFFLINE=1):",
        "",
        "```",
        f"python {show(convert_cmd)}",
        f"python {show(sample_cmd)}",
        "```",
        "",
        "| what | value |",
        "|---|---|",
        f"| parameters (official keys) | {n_params:,} |",
        f"| Lightning checkpoint | {ckpt_bytes / 1e9:.2f} GB (ema_denoiser.* only) |",
        f"| exported model.safetensors | {export_bytes / 1e9:.2f} GB |",
        f"| config | arch {cfg['arch']}, {cfg['num_blocks']} blocks, {cfg['num_heads']} heads, hidden {cfg['hidden_size']}, "
        f"patch {cfg['patch_size']}, latent {cfg['in_channels']}x{cfg['input_size']}x{cfg['input_size']}, "
        f"depth {cfg['depth']} (encoder_blocks {cfg['extra']['encoder_blocks']}), time {cfg['time_convention']} |",
        f"| sampling defaults | {json.dumps(cfg['sampling'])} |",
        f"| `flowmap convert` wall time | {conv_s:.1f} s |",
        f"| `flowmap sample --nfe 1` (2 images, CFG {cfg['sampling']['cfg_scale']}, SD-VAE decode) wall time | {samp_s:.1f} s |",
        f"| samples.npz | shape {tuple(arr.shape)}, {arr.dtype}; {len(pngs)} PNGs |",
        f"| peak RSS of a child process (convert / convert or sample) | {rss_convert:.2f} / {rss_all:.2f} GB |",
        f"| setup (random weights, checkpoint, VAE, cache) | {setup_s:.1f} s |",
        f"| 1-minute load average before convert / after sample | {load_before:.1f} / {load_after:.1f} |",
        "",
        "Convert's notes on stderr:",
        "",
        "```",
        *[n.replace(str(tmp), "$TMP") for n in notes],
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
