"""Rehearse the real job at real size on the CPU: SiT-XL/2 in REPA's release format, random weights, end to end.

Stages (each a `flowmap` subprocess, timed, its peak RSS read by getrusage(RUSAGE_CHILDREN) in a one-stage wrapper):
make the REPA state dict (.pt, projectors included) and a REPA `vae-sd` moments folder ([8, 32, 32] .npy +
dataset.json), convert at depth 20, search-depth over 2 depths, finetune 3 steps at batch 2 with a checkpoint
every step, SIGKILL after the first checkpoint, --resume and export, sample 4 images at 1 NFE through the real
SD-VAE architecture (diffusers AutoencoderKL with sd-vae-ft-ema's configuration, random weights, from an offline Hub
cache), and score them. Writes benchmarks/results/rehearse-xl.json and .md.

    python benchmarks/rehearsal/rehearse_xl.py [--hidden 1152] [--blocks 28] [--work DIR]
    python benchmarks/rehearsal/rehearse_xl.py --family rae --fid-python fid-venv/bin/python

The scoring needs torch-fidelity's Inception, which needs torchvision, which PyPI ships only as a CUDA build that
fails to import next to the CPU torch. `--fid-python` names the interpreter of a second environment that has
`torch==2.14.1 torchvision==0.29.1 torch-fidelity` and this checkout (`pip install -e .`); the eval stage then runs
`flowmap eval --metrics is,pr` there (the Inception score from its logits, precision / recall from its 2048-d pool3
features; FID needs at least 2048 samples, hours of XL sampling on a CPU), with torch-fidelity's Inception-v3 at
random weights saved to a local file (the real weights are a download). Without it the samples are scored with the
`pixels` extractor.

--hidden / --blocks shrink the model where the machine cannot hold the real one (the report says which size ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the repo's own random state dicts in the official key layouts

from dit_reference import make_sd  # noqa: E402
from hubcache import add_repo, dir_files  # noqa: E402

from flowmap_convert.finetuning.memory import AnonPeak  # noqa: E402

FLOWMAP = [sys.executable, "-m", "flowmap_convert.cli"]
# The fine-tuner through its Python API in a child process: the CLI always writes sample grids at export (2 x 20
# samples decoded by the SD-VAE: minutes on a CPU at 256 px), the API can leave them out (grid=False).
FINETUNE = r"""
import json, sys
from flowmap_convert.finetuning import finetune
from flowmap_convert.finetuning.memory import format_breakdown
kw = json.loads(sys.argv[1])
r = finetune(kw.pop("model"), grid=False, **kw)
if kw.get("dry_run"):
    print("\n".join(format_breakdown(r["memory"], r["parameters"], r["batch_size"], r["device"])))
    print("DRYRUN " + json.dumps(r))
"""
SD_VAE_FT_EMA = dict(  # stabilityai/sd-vae-ft-ema config.json (the SD 1.x KL-f8 autoencoder)
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


def repa_state_dict(hidden: int, blocks: int) -> dict:
    """SiT-XL/2 at 256 px (32x32x4 latents) with REPA's projector MLP (hidden -> 2048 -> 2048 -> 768)."""
    sd = make_sd(hidden=hidden, blocks=blocks, channels=4, patch=2, size=32, classes=1000, std=0.02)
    g = torch.Generator().manual_seed(1)
    for name, shape in (("0", (2048, hidden)), ("2", (2048, 2048)), ("4", (768, 2048))):
        sd[f"projectors.0.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
        sd[f"projectors.0.{name}.bias"] = torch.zeros(shape[0])
    return sd


def moments_dataset(root: Path, n: int = 16) -> Path:
    """REPA's preprocessing layout: vae-sd/img-mean-std-XXXXXXXX.npy with cat(mean, std) [8, 32, 32], dataset.json."""
    d = root / "vae-sd"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        name = f"img-mean-std-{i:08d}.npy"
        mean = rng.standard_normal((4, 32, 32)).astype(np.float32) * 5
        std = np.full((4, 32, 32), 0.05, np.float32)
        np.save(d / name, np.concatenate([mean, std]))
        labels.append([name, int(rng.integers(0, 1000))])
    (d / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def sd_vae_cache(cache: Path, work: Path) -> None:
    """stabilityai/sd-vae-ft-ema in an offline Hub cache: the real architecture, random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_FT_EMA)
    vae.save_pretrained(work / "sd-vae")
    add_repo(cache, "stabilityai/sd-vae-ft-ema", dir_files(work / "sd-vae"))
    shutil.rmtree(work / "sd-vae")


RAE_REPO = "nyu-visionx/RAE-collections"
RAE_STAGE2 = "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt"
RAE_DECODER = "decoders/dinov2/wReg_base/ViTXL_n08/model.pt"
RAE_STATS = "stats/dinov2/wReg_base/imagenet1k/stat.pt"
HEADS = {384: 6, 768: 12, 1152: 16, 2048: 16}  # the standard ViT / DiT head counts (head dim 64, 72 or 128)


def rae_cache(cache: Path, enc: int, dec: int, enc_blocks: int) -> int:
    """RAE-collections in an offline Hub cache: DiT^DH (encoder width `enc`, `enc_blocks` blocks; decoder head of 2
    blocks of width `dec`; 768 x 16 x 16 DINOv2-B latents, 1000 classes) and the ViT-XL pixel decoder at its real
    size (1152 wide, 28 layers, MLP 4096, patch 16). Returns the DiT^DH parameter count."""
    import test_decoders as TD  # the repo's RAE key layouts, at the sizes set here
    import test_rae_family as TR
    from hubcache import torch_bytes

    TR.C, TR.K, TR.DE, TR.DD, TR.NE, TR.ND, TR.HE, TR.HD = 768, 1000, enc, dec, enc_blocks, 2, HEADS[enc], HEADS[dec]
    sd = TR.ddt_state_dict(seed=11, side=16)
    for k, v in sd.items():  # std 0.15 -> 0.02 for the matrices, so 30 random blocks keep activations finite
        if v.dim() >= 2 and "rope" not in k and "pos_embed" not in k:
            v.mul_(0.02 / 0.15)
    params = sum(v.numel() for k, v in sd.items() if "rope" not in k)
    TD.DIM, TD.LAYERS, TD.HEADS, TD.INTER, TD.PATCH = 1152, 28, 16, 4096, 16
    dec_sd = TD.rae_decoder_sd(seed=12, in_dim=768, patches=256)
    for k, v in dec_sd.items():
        if v.dim() >= 2 and "pos_embed" not in k and "cls_token" not in k:
            v.mul_(0.02 / 0.2)
    stats = {"mean": torch.zeros(768, 16, 16), "var": torch.ones(768, 16, 16)}
    add_repo(
        cache,
        RAE_REPO,
        {
            RAE_STAGE2: torch_bytes({"ema": sd, "step": 1}),
            RAE_DECODER: torch_bytes(dec_sd),
            RAE_STATS: torch_bytes(stats),
        },
    )
    return params


def rae_dataset(root: Path, n: int = 16) -> Path:
    """An RAE latent dataset in our shard format: normalised DINOv2-B features (16, 768, 16, 16) and labels."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file(
        {"latents": torch.randn(n, 768, 16, 16, generator=g), "labels": torch.randint(0, 1000, (n,), generator=g)},
        str(root / "shard-00000.safetensors"),
    )
    return root


WRAPPER = (  # oom_score_adj 1000: on a shared machine the kernel's OOM killer takes this run before anyone else's
    "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
    "open('/proc/self/oom_score_adj', 'w').write('1000'); "
    "rc = subprocess.call(sys.argv[2:]); "
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024; "
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, 'peak_rss': peak}))"
)


def stage(
    name: str, args: list[str], work: Path, env: dict, log, kill_after=None, api: dict | None = None, python=None
) -> dict:
    """Run one flowmap command (or, with `api`, finetune() with those keywords) in a wrapper that reports its wall
    time and peak RSS; optionally SIGKILL it once `kill_after` (a path) exists. `python`: another interpreter."""
    stat = work / f".{name.split()[0]}-{len(list(work.glob('.*.json')))}.json"
    if api is not None:
        args = ["-c", FINETUNE, json.dumps(api)]
        cmd = [sys.executable, "-c", WRAPPER, str(stat), sys.executable, *args]
        log.write(f"\n$ finetune({json.dumps(api)})\n")
    else:
        cmd = [sys.executable, "-c", WRAPPER, str(stat), *([python, *FLOWMAP[1:]] if python else FLOWMAP), *args]
        log.write(f"\n$ flowmap {' '.join(args)}\n")
    log.flush()
    p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=work, start_new_session=True)
    killed = False
    # the anonymous resident memory of the wrapper and the run (what they allocated; the peak RSS also counts the
    # file-backed pages of libraries and of a memory-mapped checkpoint)
    with AnonPeak(p.pid, interval=0.1, children=True) as anon:
        if kill_after is not None:
            while p.poll() is None and not Path(kill_after).exists():
                time.sleep(0.5)
            if p.poll() is None:  # SIGKILL the run itself (the wrapper's child), so the wrapper still reports its peak
                kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                for kid in kids:
                    os.kill(int(kid), signal.SIGKILL)
                killed = bool(kids)
        p.wait()
    res = json.loads(stat.read_text())
    res["peak_anon"] = anon.peak
    res["killed"] = killed
    res["stage"] = name
    print(
        f"{name}: rc {res['rc']}, {res['wall_s']:.1f} s, peak RSS {fmt_bytes(res['peak_rss'])}, "
        f"anonymous {fmt_bytes(res['peak_anon'])}",
        flush=True,
    )
    if res["rc"] != 0 and not (killed and res["rc"] == -signal.SIGKILL):
        raise SystemExit(f"stage {name} failed (rc {res['rc']}); see {log.name}")
    return res


INCEPTION_RANDOM = r"""
import sys, torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
load = torch.nn.Module.load_state_dict
torch.nn.Module.load_state_dict = lambda self, *a, **k: None  # build the network, keep its random initialisation
real_load = torch.load
torch.load = lambda *a, **k: {}
try:
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=sys.argv[1] + ".none")
finally:
    torch.nn.Module.load_state_dict, torch.load = load, real_load
torch.manual_seed(0)
for m in net.modules():  # a fresh random initialisation, the same on every run
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        torch.nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
torch.save(net.state_dict(), sys.argv[1])
print(sum(v.numel() for v in net.state_dict().values()))
"""


def inception_eval(python: str, work: Path, env: dict, log, imgs: np.ndarray, threads: list, checks: dict) -> dict:
    """`flowmap eval --metrics is,pr` on the samples in the environment of `python` (torch-fidelity), with the
    Inception-v3 at random weights in $FLOWMAP_CACHE and 8 uniform-noise PNGs as the reference."""
    from PIL import Image

    from flowmap_convert.extractors import INCEPTION_WEIGHTS

    fid_cache = work / "fid-cache"
    fid_cache.mkdir(exist_ok=True)
    weights = fid_cache / INCEPTION_WEIGHTS
    out = subprocess.run([python, "-c", INCEPTION_RANDOM, str(weights)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"could not build torch-fidelity's Inception with {python}: {out.stderr.strip()[-500:]}")
    checks["inception_parameters"] = int(out.stdout.split()[-1])
    ref = work / "fid-reference"
    ref.mkdir(exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (8, *imgs.shape[1:]), dtype=np.uint8)
    for i, im in enumerate(noise):
        Image.fromarray(im).save(ref / f"{i:03d}.png")
    fid_env = dict(env, FLOWMAP_CACHE=str(fid_cache))
    args = ["eval", "samples", "--reference", "fid-reference", "--metrics", "is,pr", "--device", "cpu"]
    row = stage(
        "eval (torch-fidelity Inception)", [*args, "--out", "eval", *threads], work, fid_env, log, python=python
    )
    res = json.loads(next((work / "eval").rglob("eval.json")).read_text())
    checks["eval"] = res
    scores = res["results"][0]  # eval.json: one result per NFE; a folder of samples has one
    got = {k: scores.get(k) for k in ("is", "precision", "recall")}
    checks["eval_finite"] = all(v is not None and bool(np.isfinite(v)) for v in got.values())
    return {**row, **got}


def pixels_eval(imgs: np.ndarray) -> dict:
    """The samples scored with the `pixels` extractor against uniform noise (the eval plumbing, not quality)."""
    t = time.perf_counter()
    from flowmap_convert.extractors import get_extractor
    from flowmap_convert.frechet import frechet_distance

    feats = get_extractor("pixels").features(imgs)
    ref = get_extractor("pixels").features(np.random.default_rng(0).integers(0, 256, imgs.shape, dtype=np.uint8))
    fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
    return {
        "stage": "eval (pixels extractor, see notes)",
        "rc": 0,
        "wall_s": time.perf_counter() - t,
        "peak_rss": None,
        "fd": fd,
    }


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["repa", "rae"], default="repa", help="SiT-XL/2 (REPA) or DiT^DH-XL (RAE)")
    ap.add_argument("--hidden", type=int, default=1152, help="SiT width / DiT^DH encoder width")
    ap.add_argument("--dec-hidden", type=int, default=2048, help="RAE: DiT^DH decoder-head width")
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--depth", type=int, default=20, help="REPA: split depth (the recipe's 20 for XL/2)")
    ap.add_argument("--work", type=Path, default=Path("rehearse-xl-work"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rehearse-xl")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on a shared 2-core machine 2 threads ran 50x slower)"
    )
    ap.add_argument(
        "--train",
        default="all",
        choices=["all", "decoder"],
        help="what the fine-tune trains (decoder: the blocks after the split; the rest frozen and shared)",
    )
    ap.add_argument(
        "--stages",
        default=None,
        help="MF-RAE stages to run (e.g. mfd; default: the recipe's). A CMT step at the recipe's 64 pairs per "
        "trajectory is 128 student rows at batch 2: its activations alone outgrow a 24 GB machine at XL",
    )
    ap.add_argument(
        "--fid-python",
        default=None,
        help="the python of an environment with torch-fidelity (see above): score with its Inception at random weights",
    )
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out: search-depth, dry-run")
    ap.add_argument(
        "--dry-run-only", action="store_true", help="inputs, convert and the dry run only (the memory breakdown)"
    )
    a = ap.parse_args()
    work = a.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cache = work / "hub"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    rows, checks = [], {}
    log = open(work / "rehearse.log", "w")
    t0 = time.perf_counter()
    if a.family == "repa":
        sd = repa_state_dict(a.hidden, a.blocks)
        params = sum(v.numel() for k, v in sd.items() if not k.startswith("projectors"))
        torch.save(sd, work / "last.pt")  # REPA's release: a plain state dict (SiT weights and projectors)
        del sd
        moments_dataset(work / "data")
        sd_vae_cache(cache, work)
        source, convert = ["last.pt"], ["--depth", str(a.depth)]
    else:
        params = rae_cache(cache, a.hidden, a.dec_hidden, a.blocks)
        rae_dataset(work / "data")
        source, convert = [RAE_REPO, "--filename", RAE_STAGE2], []  # depth: all encoder blocks (RAE's own split)
        a.skip += ",search-depth"  # DiT^DH splits at its encoder/decoder boundary: no depth to search
    rows.append({"stage": "make inputs", "rc": 0, "wall_s": time.perf_counter() - t0, "peak_rss": None})
    T = ["--threads", str(a.threads)]
    rows.append(stage("convert", ["convert", *source, *convert, "--out", "xl-dmf"], work, env, log))
    cfg = json.loads((work / "xl-dmf" / "config.json").read_text())
    want = (4, 32) if a.family == "repa" else (768, 16)
    checks["converted_latent"] = [cfg.get("in_channels"), cfg.get("input_size")]
    checks["convert_ok"] = (cfg.get("in_channels"), cfg.get("input_size")) == want
    lo, hi = a.depth - 2, a.depth
    skip = set(filter(None, a.skip.split(",")))
    # what the dry run and the real run share: 3 steps at batch 2 with guidance 0.6 on the converted model
    ft_common = dict(
        model="xl-dmf",
        data="data",
        train=a.train,
        **({"stages": a.stages} if a.stages else {}),
        steps=3,
        batch_size=2,
        mg_scale=0.6,
        threads=a.threads,
    )
    if "dry-run" not in skip:
        ft_dry = dict(ft_common, dry_run=True, dry_run_steps=1)
        rows.append(stage("finetune --dry-run (1 step)", [], work, env, log, api=ft_dry))
        text = (work / "rehearse.log").read_text()
        checks["dry_run"] = json.loads(text.rsplit("DRYRUN ", 1)[1].splitlines()[0])
    if a.dry_run_only:
        write_report(a, params, rows, checks, t0)
        return
    if "search-depth" not in skip:
        rows.append(
            stage(
                "search-depth",
                [
                    "search-depth",
                    *source,
                    "--depths",
                    f"{lo},{hi}",
                    "--nfe",
                    "1",
                    "-n",
                    "4",
                    "--features",
                    "pixels",
                    "--reference",
                    "teacher",
                    "--teacher-nfe",
                    "2",
                    "--bootstrap",
                    "0",
                    "--batch-size",
                    "4",
                    "--out",
                    "search",
                    *T,
                ],
                work,
                env,
                log,
            )
        )
    ft = dict(ft_common, checkpoint_every=1, out="ft", progress=False, log_every=1)
    kill = work / "ft/checkpoints/latest.pt"
    rows.append(stage("finetune (SIGKILL after step 1)", [], work, env, log, kill_after=kill, api=ft))
    rows.append(stage("finetune --resume + export", [], work, env, log, api={**ft, "resume": True}))
    rows.append(
        stage(
            "sample (SD-VAE)" if a.family == "repa" else "sample (RAE ViT-XL decoder)",
            ["sample", "ft", "--nfe", "1", "-n", "4", "--npz", "--batch-size", "4", "--out", "samples", *T],
            work,
            env,
            log,
        )
    )
    npz = next((work / "samples").rglob("*.npz"))
    imgs = np.load(npz)["arr_0"]
    checks["sample_shape"] = list(imgs.shape)
    checks["sample_ok"] = imgs.shape == (4, 256, 256, 3) and imgs.dtype == np.uint8
    row = None
    if a.fid_python:
        try:
            row = inception_eval(a.fid_python, work, env, log, imgs, T, checks)
        except (SystemExit, OSError, ValueError, StopIteration) as e:  # the report still gets written, saying why
            checks["inception_eval_error"] = str(e) or type(e).__name__
    rows.append(row or pixels_eval(imgs))
    ck = torch.load(work / "ft/checkpoints/latest.pt", map_location="cpu", weights_only=True, mmap=True)
    checks["final_step"] = int(ck["step"])
    checks["exported"] = (work / "ft/model.safetensors").is_file() and (work / "ft/raw/model.safetensors").is_file()
    write_report(a, params, rows, checks, t0)


def write_report(a, params: int, rows: list, checks: dict, t0: float) -> None:
    """benchmarks/results/<out>.json and .md: per stage wall, peak RSS and bytes per parameter; the checks."""
    for r in rows:
        r["bytes_per_param"] = None if r["peak_rss"] is None else r["peak_rss"] / params
        r["anon_bytes_per_param"] = None if r.get("peak_anon") is None else r["peak_anon"] / params
    model = (
        f"SiT-XL/2 layout, hidden {a.hidden}, {a.blocks} blocks, depth {a.depth}, REPA release format"
        if a.family == "repa"
        else f"RAE DiT^DH layout, encoder {a.blocks} x {a.hidden}, decoder 2 x {a.dec_hidden}, ViT-XL pixel decoder"
    )
    model += f"; fine-tune --train {a.train}" + (f", stages {a.stages}" if a.stages else "")
    report = {
        "model": model,
        "parameters": params,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} threads, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM (shared), torch {torch.__version__}",
        "command": " ".join(["python benchmarks/rehearsal/rehearse_xl.py", *sys.argv[1:]]),
        "stages": rows,
        "checks": checks,
        "total_s": time.perf_counter() - t0,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Rehearsal: {report['model']}",
        "",
        f"{params:,} parameters; {report['machine']}",
        "",
        f"`{report['command']}`",
        "",
        "| stage | wall (s) | peak RSS | bytes/param | peak anonymous | bytes/param |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpp = "-" if r["bytes_per_param"] is None else f"{r['bytes_per_param']:.1f}"
        apc = "-" if r.get("anon_bytes_per_param") is None else f"{r['anon_bytes_per_param']:.1f}"
        lines.append(
            f"| {r['stage']} | {r['wall_s']:.1f} | {fmt_bytes(r['peak_rss'])} | {bpp} | "
            f"{fmt_bytes(r.get('peak_anon'))} | {apc} |"
        )
    dry = checks.get("dry_run")
    if dry:
        from flowmap_convert.finetuning.memory import format_breakdown

        p = dry["parameters"]
        lines += [
            "",
            f"Dry run (1 step, batch {dry['batch_size']}, --mg-scale 0.6): {p['total']:,} parameters, peak RSS "
            f"{dry['peak_memory_bytes'] / 2**20:,.0f} MiB = {dry['peak_memory_bytes'] / p['trainable']:.1f} bytes per "
            f"trainable parameter ({(dry['peak_memory_bytes'] - dry['memory']['baseline']) / p['trainable']:.1f} "
            f"besides the runtime), {dry['seconds_per_step']:.0f} s/step:",
            "",
            "```",
            *format_breakdown(dry["memory"], p, dry["batch_size"], dry["device"]),
            "```",
        ]
    if "eval" in checks:
        lines += [
            "",
            "eval: `flowmap eval --metrics is,pr` in a second environment (torch 2.14.1, torchvision 0.29.1,",
            f"torch-fidelity) with torch-fidelity's Inception-v3 ({checks['inception_parameters']:,} parameters) at",
            "random weights saved to a local file, 8 uniform-noise PNGs as the reference: the real network on",
            "real-size images (299 px resize, logits, 2048-d pool3 features), so the values check the plumbing, not",
            "quality. FID is refused below 2048 samples (its 2048 x 2048 covariance), hours of XL sampling here.",
        ]
    elif "sample_shape" in checks:
        lines += [
            "",
            "eval: torch-fidelity is not installed here and torchvision fails to import with this CPU torch, so the",
            "Inception network could not be built; the 4 samples were scored with flowmap's `pixels` extractor (Frechet",
            "distance to 4 uniform-noise images), which checks the eval plumbing on real-size images, not quality.",
            "(`--fid-python` runs the real Inception from a second environment.)",
        ]
    lines += [
        "",
        f"checks: {json.dumps({k: v for k, v in checks.items() if k not in ('dry_run', 'eval')})}",
    ]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
