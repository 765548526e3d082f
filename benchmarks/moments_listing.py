"""How long the fine-tuner takes to list a REPA `vae-sd` folder (issue 24, item 3).

Builds N empty `img-mean-std-XXXXXXXX.npy` files in REPA's layout (sub-folders of 1000) with their dataset.json in
a temporary directory, then times, in a fresh pass each:
  - `finetuning.data.list_npy` (the one directory walk the fine-tuner does, once per run),
  - `finetuning.data.read_moments_folder` (walk + dataset.json + labels + the dataset object),
  - for comparison, the Path.rglob walk used before.
Writes benchmarks/results/moments_listing-cpu.json (and prints it).

    .venv/bin/python benchmarks/moments_listing.py --files 200000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from flowmap_convert.finetuning.data import list_npy, read_moments_folder


def build(root: Path, n: int) -> None:
    """N empty moments files in 1000-file sub-folders, and a dataset.json labelling them."""
    labels = []
    for i in range(n):
        sub = f"{i // 1000:05d}"
        if i % 1000 == 0:
            (root / sub).mkdir(parents=True)
        name = f"{sub}/img-mean-std-{i:08d}.npy"
        open(root / name, "wb").close()
        labels.append([name, i % 1000])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "moments_listing-cpu.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vae-sd"
        _, build_s = timed(lambda: build(root, args.files))
        files, list_s = timed(lambda: list_npy(root))
        ds, read_s = timed(lambda: read_moments_folder(root))
        old, rglob_s = timed(lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*.npy")))
        assert files == old and len(ds) == args.files
    report = {
        "files": args.files,
        "layout": "REPA vae-sd: sub-folders of 1000 empty img-mean-std-XXXXXXXX.npy + dataset.json",
        "list_npy_s": list_s,
        "read_moments_folder_s": read_s,
        "previous_rglob_listing_s": rglob_s,
        "build_fixture_s": build_s,
        "extrapolated_imagenet_1_28M_read_s": round(read_s * 1_281_167 / args.files, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible (shared with other jobs), "
        f"{platform.python_implementation()} {platform.python_version()}, temporary directory {tempfile.gettempdir()}",
        "command": f".venv/bin/python benchmarks/moments_listing.py --files {args.files}",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
