"""Sampling: settings checks before any work, non-finite stop, disk full, resume, two processes, grid, defaults."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowmap_convert.cli import app
from flowmap_convert.errors import FlowmapError
from flowmap_convert.export_samples import grid_columns, partial_dir, run_sampling
from flowmap_convert.sampling import SampleSettings, sample


def run_cli(*args):
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--shift", "nan"], "--shift must be a finite number"),
        (["--shift", "inf"], "--shift must be a finite number"),
        (["--shift", "1e-300"], "--shift must be in"),
        (["--guidance-interval", "0.8,0.2"], "--guidance-interval must have start <= end"),
        (["--guidance-interval", "nan,1"], "--guidance-interval item 1 must be a finite"),
        (["--guidance-interval", "0.1"], "--guidance-interval takes 2 numbers"),
        (["--classes", ",,,"], "--classes lists no class"),
        (["--classes", "3,99"], "class 99 is out of range"),
        (["--classes", "1,-2"], "--classes item 2 must be an integer >= 0"),
        (["--seed", str(2**63)], "--seed must be an integer in [0, 9223372036854775807]"),
        (["--device", "bogus"], "unknown --device 'bogus'"),
        (["--device", "meta"], "--device meta is not supported"),
        (["--num-samples", "0"], "--num-samples must be an integer in [1,"),
        (["--batch-size", "0"], "--batch-size must be an integer in [1,"),
        (["--nfe", "0"], "--nfe must be an integer in [1,"),
        (["--gamma", "1"], "--gamma must be in [0, 1)"),
        (["--threads", "0"], "--threads must be an integer in [1, 4096]"),
        (["--chunk-size", "0"], "--chunk-size must be an integer in [1,"),
    ],
)
def test_sample_bad_numbers_one_line_exit_2(tiny_dir, tmp_path, args, message):
    out = tmp_path / "o"
    code, err = run_cli("sample", tiny_dir, "--device", "cpu", "--out", str(out), *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists() and not partial_dir(out).exists()


def test_nonfinite_output_stops_with_one_line(tiny_model):
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FlowmapError, match=r"non-finite values at step 1 \(t = 1 -> 0\).*`allow_nonfinite`"):
        sample(tiny_model, nfe=1, num_samples=2)


def test_settings_object_and_keywords_agree(tiny_model):
    a = sample(tiny_model, nfe=2, classes=[1, 2], seed=3)
    b = sample(tiny_model, num_samples=2, settings=SampleSettings(nfe=2, classes=(1, 2), seed=3, batch_size=1))
    assert a.shape == (2, 16, 16, 1) and np.array_equal(a, b)  # batching never changes the images


def test_disk_full_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import flowmap_convert.export_samples as es

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(es, "save_npz", full)
    out = tmp_path / "o"
    with pytest.raises(FlowmapError, match="No space left on device.*free some disk space"):
        run_sampling(tiny_model, SampleSettings(), 6, out, npz=True, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.") and p.suffix == ".tmp"] == []


def test_interrupted_run_resumes_to_the_same_bytes(tiny_model, tmp_path):
    s = SampleSettings(nfe=2, seed=5, batch_size=4)
    ref = run_sampling(tiny_model, s, 23, tmp_path / "ref", npz=True, chunk_size=5, progress=False)
    drawn = []

    def stop_after_two(k):
        drawn.append(k)
        if len(drawn) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sampling(tiny_model, s, 23, out, npz=True, chunk_size=5, progress=False, on_chunk=stop_after_two)
    assert not out.exists() and sorted(p.name for p in partial_dir(out).glob("chunk-*")) == [
        "chunk-000000.npz",
        "chunk-000001.npz",
    ]
    again = []
    run_sampling(tiny_model, s, 23, out, npz=True, chunk_size=5, progress=False, on_chunk=again.append)
    assert again == [2, 3, 4]  # finished chunks are not drawn again
    assert (out / "samples.npz").read_bytes() == (ref / "samples.npz").read_bytes()
    assert (out / "samples.json").read_bytes() == (ref / "samples.json").read_bytes()
    assert not partial_dir(out).exists()
    # a partial run with other settings is never mixed in
    drawn.clear()
    with pytest.raises(KeyboardInterrupt):
        run_sampling(tiny_model, s, 23, tmp_path / "x", chunk_size=5, progress=False, on_chunk=stop_after_two)
    with pytest.raises(FlowmapError, match=r"unfinished run with settings.seed 5 \(this one: 6\); rerun it unchanged"):
        run_sampling(tiny_model, SampleSettings(nfe=2, seed=6, batch_size=4), 23, tmp_path / "x", chunk_size=5)
    with pytest.raises(FlowmapError, match=r"with batch_size 4 \(this one: 8\)"):  # a pixel may move one grey level
        run_sampling(tiny_model, SampleSettings(nfe=2, seed=5, batch_size=8), 23, tmp_path / "x", chunk_size=5)


def test_a_resume_continues_only_the_same_model(tiny_model, tmp_path):
    """The run is keyed by the model's content: a model re-converted at the same path is refused, not mixed in."""
    import copy

    s = SampleSettings(nfe=1, seed=1, batch_size=4)

    def stop(k):
        raise KeyboardInterrupt

    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        run_sampling(tiny_model, s, 10, out, chunk_size=5, progress=False, on_chunk=stop, meta={"model": "m"})
    other = copy.deepcopy(tiny_model)  # the same architecture, one weight changed
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    with pytest.raises(FlowmapError, match=r"of another model \(model sha256 [0-9a-f]{12}\.\.\., this one"):
        run_sampling(other, s, 10, out, chunk_size=5, progress=False, meta={"model": "m"})
    chunk = partial_dir(out) / "chunk-000000.npz"  # a damaged chunk (a disk error, a kill mid-copy) is drawn again
    chunk.write_bytes(chunk.read_bytes()[:100])
    drawn = []
    run_sampling(tiny_model, s, 10, out, chunk_size=5, progress=False, on_chunk=drawn.append, meta={"model": "m"})
    assert drawn == [0, 1] and not partial_dir(out).exists()


def test_a_second_writer_is_refused_at_once(tiny_model, tmp_path):
    from flowmap_convert.outputs import output_lock

    out = tmp_path / "s"
    code = (
        "import sys, time\n"
        "from flowmap_convert.outputs import output_lock\n"
        f"with output_lock({str(out)!r}):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(FlowmapError, match="is being written by another flowmap process"):
            run_sampling(tiny_model, SampleSettings(nfe=1), 2, out, progress=False)
        assert not out.exists() and not partial_dir(out).exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with output_lock(out):  # the holder died: its lock went with it
        with output_lock(out):  # re-entrant within one process
            pass
    run_sampling(tiny_model, SampleSettings(nfe=1), 2, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no lock file left behind


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_gloo_processes_write_the_one_process_bytes(tiny_dir, tmp_path):
    common = ["sample", tiny_dir, "-n", "13", "--chunk-size", "3", "--batch-size", "2", "--npz", "--no-png"]
    common += ["--device", "cpu", "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWMAP_DIST_BACKEND": "gloo"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    p = subprocess.run(
        [*launch, str(_free_port()), "-m", "flowmap_convert.cli", *common, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("wrote 13 samples") == 1
    # piped (not a terminal): each rank prints a plain final line with the count, the rate and the ETA
    for r in (0, 1):
        line = next(ln for ln in p.stderr.splitlines() if ln.startswith(f"sample (rank {r}/2):"))
        assert "images (100%)" in line and "images/s" in line and "ETA 0:00:00" in line, p.stderr
    code, err = run_cli(*common, "--out", str(tmp_path / "one"))
    assert code == 0, err
    for name in ("samples.npz", "samples.json", "grid.png"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_grid_has_one_column_per_class():
    assert grid_columns([3, 5, 7] * 4, 12) == 3
    assert grid_columns(list(range(10)) * 10, 100) == 10
    assert grid_columns([1, 1, 2, 9], 4) == 2  # not a cycle: square-ish


@pytest.mark.e2e
def test_default_model_and_velocity_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, err = run_cli("sample", "-n", "4", "--out", str(tmp_path / "d"), "--device", "cpu")
    assert code == 0, err
    assert "CPU threads: 1" in err and "warning" not in err  # the default is a flow map
    import json

    meta = json.loads((tmp_path / "d" / "samples.json").read_text())
    assert meta["model"].startswith("builtin:digits-")
    code, err = run_cli("sample", "builtin:digits-sit", "-n", "2", "--nfe", "2", "--out", str(tmp_path / "v"))
    assert code == 0 and "base velocity model" in err and "flowmap finetune" in err, err


def test_a_reconverted_model_with_the_same_weights_file_is_another_run(tmp_path, tiny_model):
    """A re-conversion at another depth keeps model.safetensors byte-identical but changes the model."""
    from flowmap_convert.export_samples import model_identity
    from flowmap_convert.io import export

    a = export(tiny_model.with_depth(1), tmp_path / "m")
    first = model_identity(tiny_model.with_depth(1), a)
    b = export(tiny_model.with_depth(2), tmp_path / "m2")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert model_identity(tiny_model.with_depth(2), b) != first
    assert model_identity(tiny_model.with_depth(1), a) == first  # cached, and stable
