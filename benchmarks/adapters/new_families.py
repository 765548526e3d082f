"""Real-size evidence for the LightningDiT and REPA-E families: random weights at the released architectures.

For each model: save a random checkpoint with the official key set, run `flowmap convert` on it (a fresh process,
timed), then load the export and draw one 1-step sample decoded by a random VAE at the release's real architecture
(VA-VAE / E2E-VAE f16d32, E2E-SDVAE f8d4), timing load, the network step and the decode. Files go under --work and are
deleted after each model. Usage:

    PYTHONPATH=. python benchmarks/adapters/new_families.py --work /tmp/fm-newfam --out benchmarks/results/new_families-cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from flowmap_convert.config import ModelConfig
from flowmap_convert.ldm_vae import AutoencoderKL
from flowmap_convert.model import FlowMap

XL = {"hidden_size": 1152, "num_blocks": 28, "num_heads": 16, "mlp_ratio": 4.0, "num_classes": 1000}
VAE_F16D32 = {"base": 128, "widths": [128, 128, 256, 256, 512], "blocks": 2, "attn": [False] * 4 + [True], "z": 32}
VAE_F8D4 = {"base": 128, "widths": [128, 256, 512, 512], "blocks": 2, "attn": [False] * 4, "z": 4}


def release(arch: str, input_size: int, in_channels: int, patch_size: int, vae: dict, name: str) -> dict:
    """One row: a LightningDiT (reversed time; RMSNorm, SwiGLU, RoPE) or a REPA-E SiT (canonical time, latent BatchNorm)."""
    lightning = arch == "lightningdit"
    return dict(
        arch=arch,
        input_size=input_size,
        in_channels=in_channels,
        patch_size=patch_size,
        time_convention="reversed" if lightning else "canonical",
        extra={"rmsnorm": True, "swiglu": True, "rope": True, "wo_shift": False} if lightning else {},
        vae=vae,
        bn=not lightning,
        name=name,
    )


MODELS = {
    "LightningDiT-XL/1 (hustvl/lightningdit-xl-imagenet256-800ep) + VA-VAE f16d32": release(
        "lightningdit", 16, 32, 1, VAE_F16D32, "lightningdit-xl-imagenet256-800ep.pt"
    ),
    "REPA-E SiT-XL/1 (REPA-E/sit-ldm-e2e-vavae) + E2E-VAVAE f16d32": release(
        "dit", 16, 32, 1, VAE_F16D32, "sit-ldm-e2e-vavae-4000000.pt"
    ),
    "REPA-E SiT-XL/2 (REPA-E/sit-repae-sdvae) + E2E-SDVAE f8d4": release(
        "dit", 32, 4, 2, VAE_F8D4, "sit-repae-sdvae-0400000.pt"
    ),
}


def random_checkpoint(spec: dict) -> dict:
    """The source's state dict: our module's keys are the official ones; every tensor drawn at random."""
    cfg = ModelConfig(
        arch=spec["arch"],
        input_size=spec["input_size"],
        in_channels=spec["in_channels"],
        patch_size=spec["patch_size"],
        class_embed_rows=1001,
        time_convention=spec["time_convention"],
        extra=spec["extra"],
        **XL,
    )
    from flowmap_convert.ddt import VisionRope
    from flowmap_convert.layers import sincos_pos_embed_2d

    with torch.device("meta"):  # shapes only: no 2.7 GB of initialisation next to the checkpoint
        shapes = {k: v.shape for k, v in FlowMap(cfg).net.state_dict().items()}
    grid = spec["input_size"] // spec["patch_size"]
    rope = VisionRope(XL["hidden_size"] // XL["num_heads"], grid)
    fixed = {
        "pos_embed": torch.from_numpy(sincos_pos_embed_2d(XL["hidden_size"], grid)).float()[None],
        "feat_rope.freqs_cos": rope.freqs_cos,
        "feat_rope.freqs_sin": rope.freqs_sin,
    }
    g = torch.Generator().manual_seed(0)
    norms = ("norm1.weight", "norm2.weight", "norm_final.weight", "q_norm.weight", "k_norm.weight")
    sd = {}
    for k, shape in shapes.items():
        sd[k] = fixed[k] if k in fixed else torch.randn(shape, generator=g) * 0.02 + (1.0 if k.endswith(norms) else 0.0)
    if spec["bn"]:
        c = spec["in_channels"]
        sd["bn.running_mean"] = torch.randn(c, generator=g) * 0.3
        sd["bn.running_var"] = torch.rand(c, generator=g) * 4 + 0.5
        sd["bn.num_batches_tracked"] = torch.tensor(400_000, dtype=torch.int64)
    return sd


def random_vae(arch: dict) -> dict:
    """A random AutoencoderKL: the encoder's stem is `base` wide, the decoder starts at the deepest width."""
    net = AutoencoderKL({**arch, "base": arch["widths"][-1]}, arch)
    return {k: v for k, v in net.state_dict().items()}


def run_one(label: str, spec: dict, work: Path) -> dict:
    from flowmap_convert.api import load
    from flowmap_convert.decoders import get_decoder
    from flowmap_convert.sampling import sample

    work.mkdir(parents=True, exist_ok=True)
    src = work / spec["name"]
    sd = random_checkpoint(spec)
    params = sum(v.numel() for k, v in sd.items() if not k.startswith("bn.") and "feat_rope" not in k)
    t0 = time.perf_counter()
    torch.save({"ema": sd}, src)
    save_s = time.perf_counter() - t0
    del sd
    out = work / "export"
    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", "convert", str(src), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    convert_s = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    src_mib = src.stat().st_size / 2**20
    src.unlink()
    vdir = work / "vae"
    vdir.mkdir(exist_ok=True)
    vae_sd = random_vae(spec["vae"])
    vae_params = sum(v.numel() for v in vae_sd.values())
    torch.save({"state_dict": vae_sd}, vdir / "vae.pt")
    c = spec["in_channels"]
    g = torch.Generator().manual_seed(1)
    torch.save(
        {"mean": torch.randn(1, c, 1, 1, generator=g), "std": torch.rand(1, c, 1, 1, generator=g) + 0.5},
        vdir / "latents_stats.pt",
    )
    t0 = time.perf_counter()
    model = load(str(out))
    load_s = time.perf_counter() - t0
    lat = model.config.latent
    extra = {**lat.extra, "checkpoint": "vae.pt"}
    if "channel_mean" not in extra:
        extra["stats"] = "latents_stats.pt"
    local = dataclasses.replace(lat, repo=str(vdir), extra=extra)  # the release's VAE architecture, random weights
    t0 = time.perf_counter()
    decoder = get_decoder(local)
    vae_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, z, _, _ = sample(model, nfe=1, classes=[207], seed=0, decoder=_NoDecode(), return_latents=True)
    step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        img = decoder.decode(z)
    decode_s = time.perf_counter() - t0
    cfg = model.config
    row = {
        "model": label,
        "family": cfg.provenance.get("family"),
        "params": params,
        "vae_params": vae_params,
        "src_mib": src_mib,
        "depth": cfg.depth,
        "latent": tuple(z.shape),
        "image": tuple(img.shape),
        "finite": bool(torch.isfinite(img).all()),
        "shift": cfg.sampling.get("shift"),
        "save_s": save_s,
        "convert_s": convert_s,
        "load_s": load_s,
        "vae_load_s": vae_load_s,
        "step_s": step_s,
        "decode_s": decode_s,
    }
    del model, decoder
    shutil.rmtree(work)
    return row


class _NoDecode:
    """Keeps latents as they are: the VAE decode is timed on its own."""

    def decode(self, z):
        return z[:, :3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fm-newfam")
    ap.add_argument("--out", default="benchmarks/results/new_families-cpu.md")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for label, spec in MODELS.items():
        print(f"{label} ...", file=sys.stderr, flush=True)
        rows.append(run_one(label, spec, Path(a.work)))
        print(rows[-1], file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    lines = [
        "# LightningDiT and REPA-E at real size, random weights (CPU)",
        "",
        f"Command: `PYTHONPATH=. python benchmarks/adapters/new_families.py --work {a.work} --out {a.out}`",
        "",
        f"Machine: shared {os.cpu_count()}-core {platform.machine()} VM, torch {torch.__version__}, {a.threads} threads, "
        f"load average {load:.1f} at the end (other engineers' jobs share the cores).",
        "",
        "Each checkpoint holds the official key set (written by flowmap's modules, values drawn at random; REPA-E adds",
        "`bn.running_mean/var` and an int64 `bn.num_batches_tracked`) saved as `{'ema': ...}`. `convert` is a fresh",
        "`flowmap convert FILE --out DIR` process (detection, strict load, default depth, export), imports included.",
        "The 1-step sample runs the exported model at its default settings (`nfe 1`); the VAE is a random one at the",
        "release's architecture (f16d32: widths 128-128-256-256-512, attention at the last level; f8d4: 128-256-512-512),",
        "read from a local directory instead of the Hub. Times are wall-clock seconds.",
        "",
        "| model | family | params | checkpoint | default depth | latent | image | finite | shift | convert | load export | 1-step sample | VAE load / decode |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['family']} | {r['params'] / 1e6:.1f}M (VAE {r['vae_params'] / 1e6:.1f}M) | "
            f"{r['src_mib']:.0f} MiB | {r['depth']} | {list(r['latent'])} | {list(r['image'])} | {r['finite']} | "
            f"{r['shift']:.3f} | {r['convert_s']:.1f} s | {r['load_s']:.1f} s | {r['step_s']:.2f} s | "
            f"{r['vae_load_s']:.1f} / {r['decode_s']:.1f} s |"
        )
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
