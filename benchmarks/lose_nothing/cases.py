"""Run issue 20's hostile cases against the CLI and write the evidence table (benchmarks/results/lose_nothing_cases.md).

Each case runs `python -m flowmap_convert.cli ...` in a fresh directory holding canary files (files the user owns);
the table records the exit code, the first line flowmap printed to stderr (the error, or the note that matters) and
whether every canary file is byte-identical afterwards. Usage: python benchmarks/lose_nothing/cases.py [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ROOT / "flowmap_convert" / "builtin"
ROWS: list[tuple] = []


def flowmap(args, cwd, env=None, limit_fsize=None, timeout=600):
    def pre():
        if limit_fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    e = {k: v for k, v in e.items() if v is not None}
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", *map(str, args)],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=pre,
    )
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t


def digest(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def first_line(stderr: str) -> str:
    lines = [
        ln for ln in stderr.splitlines() if ln.startswith(("error:", "Traceback", "stopped by", "flowmap: uploading"))
    ]
    line = lines[0] if lines else (stderr.strip().splitlines() or [""])[-1]
    return line.replace("|", "\\|")[:220]


ONLY: list[str] = []  # --only: rerun the cases whose name holds one of these, replacing their rows


def wanted(name: str) -> bool:
    return not ONLY or any(o in name for o in ONLY)


def record(item, name, before, code, stderr, canaries_ok, secs, extra=""):
    ROWS.append((item, name, before, code, first_line(stderr) + (f" {extra}" if extra else ""), canaries_ok, secs))
    print(f"[{item}] {name}: exit {code} ({secs:.1f}s) canaries {'ok' if canaries_ok else 'CHANGED'}", flush=True)


def case(item, name, before, args, setup=None, env=None, limit_fsize=None, check=None):
    if not wanted(name):
        return
    work = Path(tempfile.mkdtemp(prefix="ln-"))
    user = work / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's notes\n")
    if setup:
        setup(work, user)
    snap = digest(user)
    code, out, err, secs = flowmap(args(work) if callable(args) else args, work, env, limit_fsize)
    extra = check(work, code, out, err) if check else ""
    record(item, name, before, code, err, digest(user) == snap, secs, extra or "")
    shutil.rmtree(work, ignore_errors=True)


def setup_cli(args, cwd=None):
    """`flowmap ARGS` as a case's setup step, the way the user ran it before (one thread, output dropped)."""
    subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def model_copy(dest: Path, name="digits-sit"):
    shutil.copytree(BUILTIN / name, dest)
    if name == "digits-sit":  # as `flowmap convert` leaves it: with its marker
        setup_cli(["convert", "builtin:" + name, "--out", dest, "--force"])
    return dest


def npz_declaring(path: Path, shape, dtype="<f8", name="arr_0"):
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lose_nothing_cases.md"))
    ap.add_argument("--only", action="append", default=[], help="rerun the cases whose name holds this text")
    a = ap.parse_args()
    ONLY.extend(a.only)
    t_all = time.perf_counter()

    # 1. push leaks -----------------------------------------------------------------------------------------
    def leak(work, user):
        (user / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\n")
        model_copy(work / "M")
        (work / "M" / "secrets.env").write_text("TOKEN=1\n")
        (work / "M" / "id_rsa").symlink_to(user / "id_rsa")

    hub = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"}  # nothing listens: any request would fail
    case(
        1,
        "push M with secrets.env and a link to ~/.ssh/id_rsa",
        "uploaded both, key contents included",
        ["push", "M", "me/test"],
        leak,
        hub,
    )

    def leak_no_link(work, user):
        leak(work, user)
        (work / "M" / "id_rsa").unlink()

    case(1, "push M with a user's secrets.env", "uploaded it", ["push", "M", "me/test"], leak_no_link, hub)

    # 2. edited files ---------------------------------------------------------------------------------------
    def edited(work, user):
        model_copy(work / "M")
        (work / "M" / "README.md").write_text("# my card\n")
        shutil.copy(work / "M" / "README.md", user / "README.copy")

    def readme_kept(work, code, out, err):
        return "(README.md kept)" if (work / "M" / "README.md").read_text() == "# my card\n" else "(README.md LOST)"

    case(
        2,
        "convert builtin:digits-sit --out M, M/README.md edited",
        "replaced the user's README.md",
        ["convert", "builtin:digits-sit", "--out", "M"],
        edited,
        check=readme_kept,
    )

    def run_dir(work, user):
        setup_cli(["finetune", "--steps", "2", "--batch-size", "4", "--out", work / "R"])
        (work / "R" / "README.md").write_text("# my card\n")

    def run_readme(work, code, out, err):
        return "(README.md kept)" if (work / "R" / "README.md").read_text() == "# my card\n" else "(README.md LOST)"

    case(
        2,
        "finetune --resume --steps 4 into a run dir whose README.md the user edited",
        "replaced it",
        ["finetune", "--steps", "4", "--batch-size", "4", "--out", "R", "--resume"],
        run_dir,
        check=run_readme,
    )

    # 3. leftovers ------------------------------------------------------------------------------------------
    def lookalikes(work, user):
        (work / ".S.20240101.backup.old").mkdir()
        (work / ".S.20240101.backup.old" / "data.txt").write_text("backup")
        (work / ".S.19991231.v1.tmp").write_text("mine")

    def kept(work, code, out, err):
        ok = (work / ".S.20240101.backup.old" / "data.txt").exists() and (work / ".S.19991231.v1.tmp").exists()
        return "(both look-alikes kept)" if ok else "(look-alikes DELETED)"

    case(
        3,
        "sample --out S beside .S.20240101.backup.old/ and .S.19991231.v1.tmp",
        "deleted both",
        ["sample", "builtin:digits-sit", "-n", "2", "--out", "S"],
        lookalikes,
        check=kept,
    )

    # 4. links ----------------------------------------------------------------------------------------------
    def linked(work, user):
        run_dir(work, user)
        (work / "R" / "README.md").unlink()
        (work / "R" / "metrics.jsonl").unlink()
        (user / "elsewhere.jsonl").write_text("precious\n")
        (work / "R" / "metrics.jsonl").symlink_to(user / "elsewhere.jsonl")

    case(
        4,
        "finetune --resume into a run dir whose metrics.jsonl links elsewhere",
        "truncated and rewrote the target",
        ["finetune", "--steps", "4", "--batch-size", "4", "--out", "R", "--resume"],
        linked,
    )

    # 5. resume identity ------------------------------------------------------------------------------------
    def half_sampled(work, user):
        model_copy(work / "M")
        code = (
            "from flowmap_convert.api import load\nfrom flowmap_convert.export_samples import run_sampling, model_identity\n"
            "from flowmap_convert.sampling import SampleSettings\n"
            "m = load('M')\ns = SampleSettings(nfe=1, device='cpu')\n"
            "def stop(k):\n    raise KeyboardInterrupt\n"
            "try:\n    run_sampling(m, s, 20, 'S', chunk_size=5, on_chunk=stop, progress=False,"
            " meta={'model': 'M', 'model_sha256': model_identity(m, 'M')})\nexcept KeyboardInterrupt:\n    pass\n"
        )
        subprocess.run([sys.executable, "-c", code], cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"})
        setup_cli(["convert", "builtin:digits-sit", "--depth", "2", "--out", "M"], cwd=work)

    case(
        5,
        "sample M -n 20 stopped after a chunk, M re-converted, same command rerun",
        "exit 0, samples from two models mixed",
        ["sample", "M", "-n", "20", "--chunk-size", "5", "--nfe", "1", "--out", "S"],
        half_sampled,
    )

    def half_batch(work, user):
        code = (
            "from flowmap_convert.api import load\nfrom flowmap_convert.export_samples import run_sampling, model_identity\n"
            "from flowmap_convert.sampling import SampleSettings\nfrom flowmap_convert.cli import default_sample_model\n"
            "m, name = default_sample_model()\n"
            "def stop(k):\n    raise KeyboardInterrupt\n"
            "try:\n    run_sampling(m, SampleSettings(nfe=1, device='cpu', batch_size=4).resolve(m), 20, 'S', chunk_size=5,"
            " on_chunk=stop, progress=False, meta={'model': name, 'model_sha256': model_identity(m, name)})\n"
            "except KeyboardInterrupt:\n    pass\n"
        )
        subprocess.run([sys.executable, "-c", code], cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"})

    case(
        5,
        "sample resumed with another --batch-size",
        "3 PNGs changed by one grey level, silently",
        ["sample", "-n", "20", "--chunk-size", "5", "--nfe", "1", "--batch-size", "8", "--out", "S"],
        half_batch,
    )

    def damaged_chunk(work, user):
        half_batch(work, user)
        chunk = work / ".S.partial" / "chunk-000000.npz"
        chunk.write_bytes(chunk.read_bytes()[:200])

    case(
        9,
        "sample resumed over a damaged chunk in .S.partial",
        "traceback",
        ["sample", "-n", "20", "--chunk-size", "5", "--nfe", "1", "--batch-size", "4", "--out", "S"],
        damaged_chunk,
        check=lambda w, c, o, e: f"({len(list((w / 'S').glob('0*.png')))} PNGs written)",
    )

    # concurrency -------------------------------------------------------------------------------------------
    def two_writers(item, name, argv):
        if not wanted(name):
            return
        work = Path(tempfile.mkdtemp(prefix="ln-"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        first = subprocess.Popen(
            [sys.executable, "-m", "flowmap_convert.cli", *argv], cwd=work, env=env, stderr=subprocess.PIPE, text=True
        )
        lock = work / f".{argv[argv.index('--out') + 1]}.flowmap-lock"
        for _ in range(600):
            if lock.exists():
                break
            time.sleep(0.05)
        code, out, err, secs = flowmap(argv, work)
        first.communicate(timeout=600)
        record(
            item,
            name,
            "both exit 0, each other's files mixed",
            code,
            err,
            True,
            secs,
            f"(first writer exit {first.returncode})",
        )
        shutil.rmtree(work, ignore_errors=True)

    two_writers(
        5, "two finetune into one new --out at once", ["finetune", "--steps", "20", "--batch-size", "4", "--out", "R"]
    )
    two_writers(5, "two sample into one --out at once", ["sample", "builtin:digits-sit", "-n", "3000", "--out", "S"])

    # 6. Ctrl-C ---------------------------------------------------------------------------------------------
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wanted("finetune (default 200 steps"):
        work = Path(tempfile.mkdtemp(prefix="ln-"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "flowmap_convert.cli", "finetune", "--out", "R"]
        p = subprocess.Popen(argv, cwd=work, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(1200):
            m = work / "R" / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        t = time.perf_counter()
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=300)[1]
        record(
            6,
            "finetune (default 200 steps, --checkpoint-every 500) + Ctrl-C after 3 steps",
            "nothing saved, 'interrupted', --resume: no checkpoint",
            p.returncode,
            err,
            True,
            time.perf_counter() - t,
        )
        code, out, err2, secs = flowmap(["finetune", "--out", "R", "--resume", "--steps", "6"], work)
        record(
            6,
            "... then finetune --resume --steps 6",
            "no checkpoint to resume from",
            code,
            err2 if code else "resumed: " + next((ln for ln in err2.splitlines() if ln.startswith("resumed")), ""),
            True,
            secs,
        )
        shutil.rmtree(work, ignore_errors=True)

    # 7. memory bombs ---------------------------------------------------------------------------------------
    def big_config(work, user):
        model_copy(work / "M")
        cfg = json.loads((work / "M" / "config.json").read_text())
        cfg.update(input_size=4096, patch_size=1, hidden_size=1152, num_heads=16)
        (work / "M" / "config.json").write_text(json.dumps(cfg))

    case(
        7,
        "sample M, config.json input_size 4096 / patch_size 1",
        "~12 GB position table built",
        ["sample", "M", "-n", "2", "--out", "S"],
        big_config,
    )
    case(
        7, "convert M, the same config.json", "~12 GB position table built", ["convert", "M", "--out", "C"], big_config
    )
    case(
        7,
        "finetune --batch-size 100000000 --dry-run",
        "std::bad_alloc",
        ["finetune", "--batch-size", "100000000", "--dry-run"],
    )
    case(
        7,
        "eval a 1 KB npz declaring 175 PiB",
        "allocation attempt",
        ["eval", "bomb.npz", "--out", "E"],
        lambda w, u: npz_declaring(w / "bomb.npz", (2**40, 2**17, 1), "|u1"),
    )

    def big_image(work, user):
        model_copy(work / "M")
        cfg = json.loads((work / "M" / "config.json").read_text())
        cfg["latent"]["image_size"] = 60000
        (work / "M" / "config.json").write_text(json.dumps(cfg))
        (work / "imgs" / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(work / "imgs" / "a" / "0.png")

    case(
        7,
        "encode with latent.image_size 60000",
        "allocation attempt",
        ["encode", "imgs", "--model", "M", "--out", "Z"],
        big_image,
    )
    case(
        7,
        "sample --threads 100000",
        "segfault (exit -11), .S.partial left",
        ["sample", "builtin:digits-sit", "-n", "2", "--threads", "100000", "--out", "S"],
        check=lambda w, c, o, e: "(" + next((ln for ln in e.splitlines() if "CPU threads" in ln), "") + ")",
    )
    case(
        7,
        "sample with OMP_NUM_THREADS=100000",
        "segfault (exit -11)",
        ["sample", "builtin:digits-sit", "-n", "2", "--out", "S"],
        env={"OMP_NUM_THREADS": "100000"},
        check=lambda w, c, o, e: "(" + next((ln for ln in e.splitlines() if "CPU threads" in ln), "") + ")",
    )

    # 8. silently wrong numbers -----------------------------------------------------------------------------
    if wanted("eval 200 digits"):
        work = Path(tempfile.mkdtemp(prefix="ln-"))
        flowmap(["sample", "builtin:digits-dmf", "-n", "200", "--nfe", "1", "--out", "S"], work)
        grey, pal = work / "grey", work / "pal"
        grey.mkdir()
        pal.mkdir()
        for f in sorted((work / "S").glob("0*.png")):
            im = Image.open(f)
            im.save(grey / f.name)
            im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(pal / f.name)
        shutil.copy(work / "S" / "samples.json", grey / "samples.json")
        shutil.copy(work / "S" / "samples.json", pal / "samples.json")
        fds = {}
        for d in (grey, pal):
            code, out, err, secs = flowmap(["eval", d.name, "--out", f"E-{d.name}"], work)
            fds[d.name] = (
                json.loads((work / f"E-{d.name}" / "eval.json").read_text())["results"][0]["digits_fd"]
                if code == 0
                else None
            )
            record(
                8,
                f"eval 200 digits samples as {'palette' if d == pal else 'greyscale'} PNGs",
                "palette: FD 475.9 vs 39.7 greyscale" if d == pal else "(reference row)",
                code,
                err,
                True,
                secs,
                f"(digits FD {fds[d.name]:.4f})" if fds[d.name] is not None else "",
            )
        shutil.rmtree(work, ignore_errors=True)

    def ref(name, **arrays):
        def setup(work, user):
            model_copy(work / "S0", "digits-dmf")
            np.savez(work / name, **arrays) if not name.endswith(".npy") else np.save(work / name, arrays["arr_0"])
            imgs = np.zeros((80, 16, 16, 1), np.uint8)
            np.savez(work / "samples.npz", arr_0=imgs)

        return setup

    d = 64
    case(
        8,
        "eval --reference with a NaN mu",
        "FD NaN, bare NaN in eval.json",
        ["eval", "samples.npz", "--metrics", "digits", "--reference", "nan.npz", "--out", "E"],
        ref("nan.npz", mu=np.full(d, np.nan), sigma=np.eye(d)),
    )
    case(
        9,
        "eval --reference with inf in sigma",
        "traceback",
        ["eval", "samples.npz", "--metrics", "digits", "--reference", "inf.npz", "--out", "E"],
        ref("inf.npz", mu=np.zeros(d), sigma=np.full((d, d), np.inf)),
    )
    case(
        9,
        "eval --reference holding object arrays",
        "traceback",
        ["eval", "samples.npz", "--metrics", "digits", "--reference", "obj.npz", "--out", "E"],
        ref("obj.npz", mu=np.array([1, "a"], dtype=object), sigma=np.eye(2)),
    )

    def labels(arr1):
        def setup(work, user):
            np.savez(work / "s.npz", arr_0=np.zeros((80, 16, 16, 1), np.uint8), arr_1=arr1)

        return setup

    case(
        8,
        "eval an npz whose arr_1 holds string labels",
        "digits_acc 0.0",
        ["eval", "s.npz", "--out", "E"],
        labels(np.array(["3"] * 80)),
    )
    case(
        9,
        "eval an npz whose arr_1 has the wrong length",
        "traceback",
        ["eval", "s.npz", "--out", "E"],
        labels(np.arange(7)),
    )

    def npy_ref(work, user):
        np.save(work / "ref.npy", np.zeros((80, 16, 16, 1), np.uint8))
        np.savez(work / "s.npz", arr_0=np.zeros((80, 16, 16, 1), np.uint8))

    case(
        9,
        "eval --reference ref.npy (images)",
        "traceback",
        ["eval", "s.npz", "--metrics", "fid", "--reference", "ref.npy", "--out", "E"],
        npy_ref,
    )

    def folder_with(data):
        def setup(work, user):
            (work / "F").mkdir()
            for i in range(3):
                Image.fromarray(np.zeros((16, 16), np.uint8)).save(work / "F" / f"{i}.png")
            (work / "F" / "bad.png").write_bytes(data(work))

        return setup

    good = (BUILTIN / "digits-sit" / "README.md").read_bytes()
    case(9, "eval a folder holding a 0-byte .png", "traceback", ["eval", "F", "--out", "E"], folder_with(lambda w: b""))
    case(
        9,
        "eval a folder holding a truncated .png",
        "traceback",
        ["eval", "F", "--out", "E"],
        folder_with(lambda w: (w / "F" / "0.png").read_bytes()[:40]),
    )
    case(
        9,
        "eval a folder holding a text file named .png",
        "traceback",
        ["eval", "F", "--out", "E"],
        folder_with(lambda w: good[:200]),
    )

    def bomb(w):
        import struct
        import zlib

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b"")
        )

    case(
        9, "eval a folder holding a 20000x20000 bomb .png", "traceback", ["eval", "F", "--out", "E"], folder_with(bomb)
    )

    def imgs(work, user):
        (work / "imgs" / "a").mkdir(parents=True)
        for i in range(40):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)).save(
                work / "imgs" / "a" / f"{i}.png"
            )

    case(
        9,
        "encode --device tpu9",
        "traceback",
        ["encode", "imgs", "--model", "builtin:digits-sit", "--device", "tpu9", "--out", "Z"],
        imgs,
    )
    case(
        9,
        "encode with a full disk (file-size limit 3 KB)",
        "traceback",
        ["encode", "imgs", "--model", "builtin:digits-sit", "--out", "Z"],
        imgs,
        limit_fsize=3000,
        check=lambda w, c, o, e: "(nothing left: " + str(sorted(p.name for p in w.iterdir() if p.name != "user")) + ")",
    )
    case(
        9,
        "FLOWMAP_MAX_DOWNLOAD_GB=1e300 convert https://...",
        "traceback (OverflowError)",
        ["convert", "https://example.com/m.safetensors", "--out", "C"],
        env={"FLOWMAP_MAX_DOWNLOAD_GB": "1e300"},
    )
    case(
        9,
        "finetune with a full disk during the checkpoint save (file-size limit 400 KB)",
        "traceback",
        ["finetune", "--steps", "2", "--batch-size", "4", "--out", "R"],
        limit_fsize=400_000,
        check=lambda w, c, o, e: (
            "(checkpoints/: " + str(sorted(p.name for p in (w / "R" / "checkpoints").iterdir())) + ")"
        ),
    )

    # 10. messages ------------------------------------------------------------------------------------------
    if wanted("eval stopped by SIGINT"):
        work = Path(tempfile.mkdtemp(prefix="ln-"))
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flowmap_convert.cli",
                "eval",
                "builtin:digits-dmf",
                "-n",
                "3000",
                "--chunk-size",
                "100",
                "--out",
                "E",
            ],
            cwd=work,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(1200):
            if list(work.glob("E/.samples-nfe1.partial/chunk-*.npz")):
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=300)
        code, out, err, secs = flowmap(["eval", "builtin:digits-dmf", "-n", "3000", "--out", "E"], work)
        record(
            10,
            "eval stopped by SIGINT, then rerun",
            "'holds files flowmap did not write'",
            code,
            err if code else "resumed and scored: " + out.strip().splitlines()[-1],
            True,
            secs,
        )
        shutil.rmtree(work, ignore_errors=True)
    case(
        10,
        "sample --out .",
        "refused only after all the work",
        ["sample", "builtin:digits-sit", "-n", "2", "--out", "."],
    )
    case(10, "convert --out .", "refused only after all the work", ["convert", "builtin:digits-sit", "--out", "."])
    case(
        10,
        "eval --metrics fid with FLOWMAP_CACHE a file",
        "'choose a writable --out directory'",
        ["eval", "builtin:digits-sit", "-n", "100", "--metrics", "fid", "--out", "E"],
        env={"FLOWMAP_CACHE": "/etc/hostname"},
    )

    def killed_save(work, user):
        run_dir(work, user)
        (work / "R" / "README.md").unlink()
        dead = work / "R" / "checkpoints" / ".latest.pt.999999999.ab12.tmp"
        dead.write_bytes(b"half")
        (dead.parent / (dead.name + ".flowmap")).write_text(json.dumps({"flowmap_leftover": dead.name}))

    case(
        10,
        "finetune --resume after a checkpoint save killed half-way",
        "'.latest.pt.<pid>.tmp' left forever",
        ["finetune", "--steps", "4", "--batch-size", "4", "--out", "R", "--resume"],
        killed_save,
        check=lambda w, c, o, e: (
            "(checkpoints/: " + str(sorted(p.name for p in (w / "R" / "checkpoints").iterdir())) + ")"
        ),
    )

    total = time.perf_counter() - t_all
    old_rows = []
    if ONLY and Path(a.out).is_file():  # keep the other cases' rows from the last full run
        names = {r[1] for r in ROWS}
        for line in Path(a.out).read_text().splitlines():
            cells = line.split(" | ")
            if line.startswith("| ") and not line.startswith("| item") and len(cells) > 2 and cells[1] not in names:
                old_rows.append(line)
    lines = [
        "# Issue 20 cases: before and after",
        "",
        f"Produced by `python benchmarks/lose_nothing/cases.py` ({platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_version()}, CPU only, offline; {total:.0f} s). 'before' is what the issue reported;"
        " 'after' is this run: exit code, the first line flowmap printed to stderr (an error, or the note that"
        " matters), and whether every file the user owned is byte-identical afterwards.",
        "",
        "| item | case | before | exit | first line (after) | user files identical | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    new_rows = [
        f"| {item} | {name} | {before} | {code} | {line} | {'yes' if ok else 'NO'} | {secs:.1f} |"
        for item, name, before, code, line, ok, secs in ROWS
    ]
    lines += sorted(old_rows + new_rows, key=lambda r: int(r.split(" | ")[0].strip("| ")))
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out} ({len(ROWS)} cases, {total:.0f} s)")


if __name__ == "__main__":
    main()
