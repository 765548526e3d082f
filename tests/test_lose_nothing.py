"""Property test (issue 20, "lose nothing, round two"): seeded random hostile inputs in each class the issue lists
(markers and links, leftovers, the push set, resume identity, memory bounds, image modes, eval inputs). Every case
ends in success or one FlowmapError line, leaves the user's files byte-identical and stays within CASE_SECONDS."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowmap_convert.errors import FlowmapError

CASE_SECONDS = 10


def snapshot(root: Path) -> dict:
    """Every entry under root (links as their target text, not followed) -> bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


class Bounded:
    """Times one case; fails it when it runs past CASE_SECONDS."""

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        assert time.perf_counter() - self.t < CASE_SECONDS
        return False


def one_line(e: FlowmapError) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------------- markers, links
MUTATIONS = ("none", "edit", "add", "link", "truncate", "dir-link")


def test_random_edits_of_an_output_decide_whose_it_is(tmp_path):
    """An output flowmap wrote is replaceable until any file in it is edited, added, truncated or made a link."""
    from flowmap_convert.outputs import check_output, mark_output

    rng = random.Random(20)
    outside = tmp_path / "outside.txt"
    outside.write_text("private")
    for case in range(40):
        with Bounded():
            out = tmp_path / f"o{case}"
            out.mkdir()
            names = [f"f{i}.bin" for i in range(rng.randint(1, 5))]
            for n in names:
                (out / n).write_bytes(rng.randbytes(rng.randint(0, 300)))
            mark_output(out, "samples")
            m = rng.choice(MUTATIONS)
            victim = out / rng.choice(names)
            if m == "edit":
                data = bytearray(victim.read_bytes() or b"\0")
                data[rng.randrange(len(data))] ^= 1 + rng.randrange(255)  # same size, other content
                victim.write_bytes(bytes(data))
            elif m == "add":
                (out / f"user{case}.txt").write_text("mine")
            elif m == "link":
                victim.unlink()
                victim.symlink_to(outside)
            elif m == "truncate":
                victim.write_bytes(victim.read_bytes()[:-1] if victim.stat().st_size else b"x")
            elif m == "dir-link":
                (out / "sub").symlink_to(tmp_path, target_is_directory=True)
            before = snapshot(out)
            if m == "none":
                check_output(out, "samples")
            else:
                with pytest.raises(FlowmapError) as e:
                    check_output(out, "samples", force_flag="--force")
                assert "--force" in one_line(e.value)
            assert snapshot(out) == before and outside.read_text() == "private"


def test_leftovers_are_known_by_their_claim_not_their_name(tmp_path):
    """Random leftover-looking names: only the claimed ones of dead processes are removed."""
    from flowmap_convert.outputs import CLAIM_SUFFIX, clean_stale

    rng = random.Random(21)
    for case in range(30):
        with Bounded():
            d = tmp_path / f"d{case}"
            d.mkdir()
            expect_removed, expect_kept = set(), set()
            for i in range(rng.randint(1, 6)):
                pid = rng.choice([999_999_000 + i, os.getpid(), 20240101, 19991231])
                kind = rng.choice(["tmp", "old", "part"])
                name = f".S.{pid}.{rng.choice(['ab', 'backup', 'v1', 'x9'])}{i}.{kind}"
                p = d / name
                p.mkdir() if rng.random() < 0.5 else p.write_bytes(b"data")
                if p.is_dir():
                    (p / "inside.txt").write_text("data")
                claimed = rng.random() < 0.5
                if claimed:
                    (d / (name + CLAIM_SUFFIX)).write_text(json.dumps({"flowmap_leftover": name}))
                dead = not Path(f"/proc/{pid}").exists()
                (expect_removed if claimed and dead else expect_kept).add(name)
            removed = {p.name for p in clean_stale(d, "S")}
            assert removed == expect_removed
            left = {p.name for p in d.iterdir()}
            assert expect_kept <= left and not (expect_removed & left)


def test_atomic_writers_never_write_through_a_link(tmp_path):
    from flowmap_convert.outputs import open_append, write_text_atomic

    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(target)
    for write in (lambda: write_text_atomic(link, "x"), lambda: open_append(link, truncate=True)):
        with pytest.raises(FlowmapError) as e:
            write()
        assert "symbolic link" in one_line(e.value)
    assert target.read_text() == "keep"


# ---------------------------------------------------------------------------------------------------- push set
def test_random_directories_push_exactly_the_marked_files(tmp_path):
    from flowmap_convert.hub import upload_plan
    from flowmap_convert.outputs import mark_output

    rng = random.Random(22)
    secret = tmp_path / "id_rsa"
    secret.write_text("KEY")
    for case in range(25):
        with Bounded():
            d = tmp_path / f"m{case}"
            d.mkdir()
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(rng.randbytes(64))
            (d / "README.md").write_text("card PATH_OR_REPO")
            mark_output(d, "model")
            extra = rng.choice(["none", "secret", "link", "hidden", "subdir", "edited-card", "edited-weights"])
            if extra == "secret":
                (d / "secrets.env").write_text("TOKEN=1")
            elif extra == "link":
                (d / "id_rsa").symlink_to(secret)
            elif extra == "hidden":
                (d / ".env").write_text("TOKEN=1")
            elif extra == "subdir":
                (d / "checkpoints").mkdir()
                (d / "checkpoints" / "a.pt").write_bytes(b"x")
            elif extra == "edited-card":
                (d / "README.md").write_text("# mine")
            elif extra == "edited-weights":
                (d / "model.safetensors").write_bytes(rng.randbytes(64))
            if extra in ("secret", "link", "edited-weights"):
                with pytest.raises(FlowmapError) as e:
                    upload_plan(d)
                one_line(e.value)
                continue
            plan = upload_plan(d)
            assert sorted(p.name for p in plan.files) == ["README.md", "config.json", "model.safetensors"]
            assert plan.card == ("yours" if extra == "edited-card" else "flowmap")


# ---------------------------------------------------------------------------------------------------- resume identity
def test_any_changed_setting_is_named_with_both_values():
    from flowmap_convert.export_samples import run_difference

    rng = random.Random(23)
    base = {
        "settings": {"nfe": 4, "sampler": "euler", "shift": 1.0, "cfg_scale": 1.5, "seed": 0, "classes": [1, 2]},
        "batch_size": 64,
        "num_samples": 1000,
        "chunk_size": 100,
        "model": "m",
        "model_sha256": "a" * 64,
    }
    assert run_difference(base, json.loads(json.dumps(base))) is None
    assert run_difference(base, {**base, "model": "moved/elsewhere"}) is None  # the path is not the identity
    flat = [("settings", k) for k in base["settings"]] + [(k, None) for k in base if k not in ("settings", "model")]
    for _ in range(40):
        outer, inner = rng.choice(flat)
        new = json.loads(json.dumps(base))
        old_value = new[outer][inner] if inner else new[outer]
        value = rng.choice([7, 0.5, "other", None, [3], "b" * 64])
        if value == old_value:
            continue
        if inner:
            new[outer][inner] = value
        else:
            new[outer] = value
        key, was, now = run_difference(base, new)
        assert key == (f"{outer}.{inner}" if inner else outer) and was == old_value and now == value


# ---------------------------------------------------------------------------------------------------- memory bounds
def _npz_declaring(path: Path, shape, dtype="<f8", name="arr_0") -> Path:
    """An .npz whose member's header declares `shape` but holds no data (a 1 KB file declaring petabytes)."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.npy", npy)
    return path


def test_declared_sizes_are_multiplied_out_before_allocating(tmp_path, monkeypatch):
    from flowmap_convert.budget import check_npz
    from flowmap_convert.config import ModelConfig
    from flowmap_convert.evaluate import Reference, read_images
    from flowmap_convert.runtime import available_cores, choose_threads

    monkeypatch.setenv("FLOWMAP_MEMORY_GB", "8")
    rng = random.Random(24)
    for case in range(20):
        with Bounded():
            shape = [rng.choice([10**3, 10**6, 2**31, 2**40]) for _ in range(rng.randint(2, 4))]
            p = _npz_declaring(tmp_path / f"b{case}.npz", shape)
            assert p.stat().st_size < 2048
            for read in (lambda p=p: check_npz(p), lambda p=p: read_images(p), lambda p=p: Reference(str(p))):
                with pytest.raises(FlowmapError) as e:
                    read()
                assert "declares" in one_line(e.value) or "more than" in str(e.value)
    with pytest.raises(FlowmapError, match=r"more than the 7.45 GiB of memory here"):
        ModelConfig(input_size=4096, patch_size=1, hidden_size=1152, num_heads=16, in_channels=4)
    ModelConfig(input_size=32, patch_size=2, hidden_size=1152, num_heads=16, num_blocks=28)  # DiT-XL/2 fits
    cores = available_cores()
    assert choose_threads(100_000) == (cores, f"--threads 100000, capped at the {cores} cores present")
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert choose_threads(None)[0] == cores


def test_finetune_batch_beyond_memory_is_one_line_before_any_allocation(monkeypatch):
    from flowmap_convert.finetuning import finetune

    with pytest.raises(FlowmapError, match=r"fine-tuning batch of 100,000,000 samples .* more than"):
        finetune(batch_size=100_000_000, steps=1, dry_run=True, threads=1, grid=False)


# ---------------------------------------------------------------------------------------------------- image modes
def _png_bomb(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header declares side x side pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def test_every_image_mode_reads_as_a_viewer_shows_it(tmp_path):
    from flowmap_convert.images import read_image

    rng = np.random.default_rng(25)
    for _case in range(12):
        with Bounded():
            grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            # palette: indices are a permutation of grey levels; the pixels must be the palette's levels
            levels = rng.permutation(256).astype(np.uint8)
            idx = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            pal = Image.fromarray(idx, "P")
            pal.putpalette(np.repeat(levels, 3).tolist())
            pal.save(tmp_path / "p.png")
            assert np.array_equal(read_image(tmp_path / "p.png")[..., 0], levels[idx])
            assert read_image(tmp_path / "p.png").shape == (8, 8, 1)
            Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit greyscale
            assert np.array_equal(read_image(tmp_path / "g16.png")[..., 0], grey)
            Image.fromarray(np.dstack([grey, 255 - grey]), "LA").save(tmp_path / "la.png")
            assert np.array_equal(read_image(tmp_path / "la.png")[..., 0], grey)
            Image.fromarray(np.dstack([rgb, grey]), "RGBA").save(tmp_path / "rgba.png")
            assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
            Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.tiff")
            assert read_image(tmp_path / "c.tiff").shape == (8, 8, 3)
            assert read_image(tmp_path / "g16.png", 3).shape == (8, 8, 3)


def test_damaged_images_are_one_line_in_every_reader(tmp_path):
    from flowmap_convert.evaluate import read_images
    from flowmap_convert.finetuning.data import load_images
    from flowmap_convert.images import read_image

    rng = random.Random(26)
    good = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good, "PNG")
    good = good.getvalue()
    kinds = {
        "empty": b"",
        "text": b"this is not an image\n",
        "truncated": good[: rng.randint(20, len(good) - 13)],
        "flipped": good[:33] + bytes(rng.randrange(256) for _ in range(len(good) - 33)),
    }
    for name, data in kinds.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "a.png").write_bytes(good)
        (folder / "b.png").write_bytes(data)
        for read in (
            lambda folder=folder: read_image(folder / "b.png"),
            lambda folder=folder: read_images(folder),
            lambda folder=folder: load_images([folder / "b.png"], 16, 1),
        ):
            with Bounded(), pytest.raises(FlowmapError) as e:
                read()
            assert "b.png" in one_line(e.value)
    bomb = _png_bomb(tmp_path / "bomb.png")
    with Bounded(), pytest.raises(FlowmapError, match="decompression bomb|more than"):
        read_image(bomb)


# ---------------------------------------------------------------------------------------------------- eval inputs
def test_hostile_references_and_samples_are_one_line(tmp_path):
    from flowmap_convert.evaluate import read_images, strict_json
    from flowmap_convert.metrics import load_reference

    d = 4
    np.savez(tmp_path / "nan.npz", mu=np.full(d, np.nan), sigma=np.eye(d))
    np.savez(tmp_path / "inf.npz", mu=np.zeros(d), sigma=np.full((d, d), np.inf))
    np.savez(tmp_path / "obj.npz", mu=np.array([1, "a"], dtype=object), sigma=np.eye(d), allow_pickle=True)
    for name in ("nan", "inf", "obj"):
        with pytest.raises(FlowmapError) as e:
            load_reference(tmp_path / f"{name}.npz")
        one_line(e.value)
    images = np.zeros((5, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "short.npz", arr_0=images, arr_1=np.arange(3))
    np.savez(tmp_path / "strings.npz", arr_0=images, arr_1=np.array(["a"] * 5))
    for name in ("short", "strings"):
        with pytest.raises(FlowmapError, match="arr_1 must hold one integer class label per image"):
            read_images(tmp_path / f"{name}.npz")
    np.save(tmp_path / "samples.npy", images)
    assert read_images(tmp_path / "samples.npy")[0].shape == (5, 8, 8, 1)
    report = strict_json({"fd": float("nan"), "rows": [{"x": float("inf"), "y": np.float32(1.5)}]})
    assert json.loads(json.dumps(report, allow_nan=False)) == {"fd": None, "rows": [{"x": None, "y": 1.5}]}


@pytest.mark.skipif(sys.platform != "linux", reason="flock semantics checked on Linux")
def test_output_lock_is_released_when_the_holder_dies(tmp_path):
    import subprocess

    from flowmap_convert.outputs import output_lock

    out = tmp_path / "o"
    code = f"from flowmap_convert.outputs import output_lock\nwith output_lock({str(out)!r}):\n    print('ready', flush=True)\n    input()\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(FlowmapError, match="being written by another flowmap process"):
            with output_lock(out):
                pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with output_lock(out):
        pass


def test_a_hostile_source_name_cannot_break_the_card():
    """A backtick or HTML in a source file name stays inside one code span (the card push uploads is intact)."""
    from conftest import tiny_config

    from flowmap_convert.card import model_card

    rng = random.Random(27)
    pieces = ["`", "``", "<script>alert(1)</script>", "|", "\n", "a", "<img src=x>", "*", "]("]
    for _ in range(20):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        cfg = tiny_config().replace(provenance={"source": name, "file": name, "family": name, "description": name})
        card = model_card(cfg)
        title = card.splitlines()[5]
        assert title.startswith("# Flow map from `")
        body = title[len("# Flow map from ") :]
        run = len(body) - len(body.lstrip("`"))
        assert body.endswith("`" * run) and "`" * run not in body[run:-run], body  # the span closes only at the end
        for line in card.splitlines():
            if line.startswith("| family"):
                assert "<script>" not in line and "<img" not in line, line
        assert card.count("\n| source | ") == 1 and len([x for x in card.splitlines() if x.startswith("| file")]) == 1
