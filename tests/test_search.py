"""Depth search on tiny random models: teacher reference without data, caching, halving, export, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flowmap_convert.errors import FlowmapError
from flowmap_convert.search import default_depths, search_depth

SMALL = dict(features="pixels", reference="teacher", teacher_nfe=2, bootstrap=20, batch_size=64)


@pytest.fixture
def no_dataset(monkeypatch):
    """Any attempt to touch a dataset or the digits module fails the test."""
    import flowmap_convert.digits as digits
    import flowmap_convert.metrics as metrics
    import flowmap_convert.search as search_pkg

    def boom(*a, **k):
        raise AssertionError("the teacher reference must not read a dataset")

    monkeypatch.setattr(metrics, "dataset_reference", boom)
    monkeypatch.setattr(search_pkg, "dataset_reference", boom)  # the search package's own binding of it
    for name in ("_raw_digits", "load_classifier", "reference_stats"):  # the digits data, classifier, statistics
        monkeypatch.setattr(digits, name, boom)


def test_teacher_probe_needs_no_dataset(tiny_model, no_dataset, tmp_path):
    from flowmap_convert.metrics import feature_stats, frechet_distance, get_extractor, paired_mse
    from flowmap_convert.sampling import sample
    from flowmap_convert.search import velocity_model

    n = 24
    report = search_depth(tiny_model, depths=[1, 3, 4], nfe=[1, 2], num_samples=n, out=tmp_path / "s", **SMALL)
    assert report["reference"]["kind"] == "teacher"
    assert {(r["depth"], r["nfe"]) for r in report["results"]} == {(d, k) for d in (1, 3, 4) for k in (1, 2)}
    # independent recomputation of one cell: same noise (seed 0, samples 0..n-1) and labels for both models
    imgs_t, lat_t, _, _ = sample(velocity_model(tiny_model), nfe=2, num_samples=n, seed=0, return_latents=True)
    imgs_f, lat_f, _, _ = sample(tiny_model.with_depth(3), nfe=1, num_samples=n, seed=0, return_latents=True)
    ext = get_extractor("pixels")
    cell = next(r for r in report["results"] if r["depth"] == 3 and r["nfe"] == 1)
    assert cell["mse"] == pytest.approx(float(paired_mse(lat_f.numpy(), lat_t.numpy()).mean()), rel=1e-6)
    fd = frechet_distance(*feature_stats(ext.features(imgs_f)), *feature_stats(ext.features(imgs_t)))
    assert cell["fd"] == pytest.approx(fd, rel=1e-6)
    assert cell["fd_ci"][0] <= cell["fd"] <= cell["fd_ci"][1]
    for k in ("1", "2"):
        rows = [r for r in report["results"] if r["nfe"] == int(k)]
        assert report["best"][k] == min(rows, key=lambda r: r["fd"])["depth"]
    assert json.loads((tmp_path / "s" / "search.json").read_text())["best"] == report["best"]
    png = (tmp_path / "s" / "search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_cached_and_reused(tiny_model, tmp_path):
    out = tmp_path / "s"
    r1 = search_depth(tiny_model, depths=[2, 4], nfe=[1], num_samples=16, out=out, **SMALL)
    assert not any(r["cached"] for r in r1["results"])
    files = sorted(p.name for p in (out / "cache").iterdir())
    assert any(f.startswith("depth2-nfe1-") for f in files) and any(f.startswith("teacher-") for f in files)
    r2 = search_depth(tiny_model, depths=[2, 4], nfe=[1], num_samples=16, out=out, **SMALL)
    assert all(r["cached"] for r in r2["results"])
    assert [r["fd"] for r in r2["results"]] == [r["fd"] for r in r1["results"]]
    r3 = search_depth(tiny_model, depths=[2, 4], nfe=[1], num_samples=16, out=out, seed=1, **SMALL)
    assert not any(r["cached"] for r in r3["results"])  # another seed is another experiment


def test_halving_prunes_and_spends_more_on_survivors(tiny_model):
    report = search_depth(
        tiny_model, depths=[1, 2, 3, 4], nfe=[1], num_samples=32, halving=True, min_halving_samples=8, **SMALL
    )
    rounds = report["halving"]
    assert [r["num_samples"] for r in rounds] == [16, 32]
    kept = rounds[0]["kept"]
    assert len(kept) == 2 and set(kept) <= {1, 2, 3, 4}
    final = {r["depth"]: r["num_samples"] for r in report["results"]}
    assert all(final[d] == 32 for d in kept) and all(final[d] == 16 for d in set(final) - set(kept))
    first = [r for r in report["all_results"] if r["num_samples"] == 16]
    assert kept == sorted(sorted(first, key=lambda r: r["fd"])[i]["depth"] for i in range(2))


def test_write_best_exports_the_chosen_depth(tiny_model, tmp_path):
    from flowmap_convert.model import read_model_dir

    report = search_depth(
        tiny_model, depths=[1, 4], nfe=[1, 2], num_samples=16, write_best=tmp_path / "best", best_for_nfe=2, **SMALL
    )
    m = read_model_dir(tmp_path / "best")
    assert m.config.depth == report["best"]["2"] == report["best_depth"]
    assert m.config.conditioning == "decoupled"


def test_bad_inputs_are_user_errors(tiny_model):
    with pytest.raises(FlowmapError, match="out of range"):
        search_depth(tiny_model, depths=[5], num_samples=8, **SMALL)
    with pytest.raises(FlowmapError, match="positive"):
        search_depth(tiny_model, nfe=[0], num_samples=8, **SMALL)
    with pytest.raises(FlowmapError, match="at least 2 samples"):
        search_depth(tiny_model, num_samples=1, **SMALL)
    with pytest.raises(FlowmapError, match="`best_for_nfe`"):
        search_depth(tiny_model, nfe=[1], best_for_nfe=4, num_samples=8, **SMALL)
    with pytest.raises(FlowmapError, match="mse"):
        search_depth(tiny_model, num_samples=8, metric="mse", features="pixels", reference=str(__file__))


def test_default_depths():
    assert default_depths(6) == [1, 2, 3, 4, 5, 6]
    assert default_depths(28) == [16, 18, 20, 22, 24]


# ------------------------------------------------------------------------------------------------ CLI
def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", "search-depth", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, message",
    [
        (["--depths", "0,2"], "depth 0 is out of range"),
        (["--depth-range", "3:9"], "depth 5 is out of range"),
        (["--nfe", "1,0"], "--nfe values must be positive"),
        (["--num-samples", "1"], "at least 2 samples"),
        (["--reference", "REF"], "dimension 3"),
    ],
)
def test_cli_bad_input_exit_2_one_line(tiny_dir, tmp_path, args, message):
    np.savez(tmp_path / "ref3.npz", mu=np.zeros(3), sigma=np.eye(3))  # pixel features are 64-d: mismatch
    args = [str(tmp_path / "ref3.npz") if a == "REF" else a for a in args]
    p = cli(tiny_dir, "--features", "pixels", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.e2e
def test_cli_warns_when_fewer_samples_than_feature_dims(tiny_dir, tmp_path):
    out = tmp_path / "o"
    p = cli(
        tiny_dir,
        "--features",
        "pixels",
        "--reference",
        "teacher",
        "--teacher-nfe",
        "2",
        "--depths",
        "2,4",
        "--nfe",
        "1",
        "-n",
        "8",
        "--bootstrap",
        "0",
        "--out",
        str(out),
        "--write-best",
        str(tmp_path / "best"),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "fewer than the 64 feature dimensions" in p.stderr
    assert "best depth at 1 NFE" in p.stdout
    report = json.loads((out / "search.json").read_text())
    assert (
        report["num_samples"] == 8 and (out / "search.png").is_file() and (tmp_path / "best" / "config.json").is_file()
    )


def test_digits_default_probe_matches_digits_fd(tiny_model):
    """features/reference 'auto' on a 1x16x16 pixel model = the digits classifier against the real digits."""
    from flowmap_convert.digits import digits_fd
    from flowmap_convert.sampling import sample

    report = search_depth(tiny_model, depths=[3], nfe=[1], num_samples=80, bootstrap=0)
    assert report["features"] == "digits" and report["reference"]["kind"] == "dataset"
    imgs = sample(tiny_model.with_depth(3), nfe=1, num_samples=80, seed=0)
    assert report["results"][0]["fd"] == pytest.approx(digits_fd(imgs), rel=1e-6)


def test_write_best_records_the_search_for_default_depth(tiny_model, tmp_path):
    from flowmap_convert.api import convert

    report = search_depth(tiny_model, depths=[1, 3], nfe=[1, 2], num_samples=16, write_best=tmp_path / "b", **SMALL)
    best = convert(str(tmp_path / "b"))
    prov = best.config.provenance["search"]
    assert prov["best_depth"] == report["best_depth"] and prov["nfe"] == [1, 2] and prov["metric"] == "fd"
    from flowmap_convert.config import default_depth

    assert default_depth(best.config.replace(conditioning="velocity", depth=None)) == report["best_depth"]


@pytest.mark.e2e
def test_piped_search_prints_progress_lines(tiny_dir, tmp_path):
    p = cli(
        tiny_dir,
        *("--features", "pixels", "--reference", "teacher", "--teacher-nfe", "2", "--depths", "2,4", "--nfe", "1"),
        *("-n", "8", "--bootstrap", "0", "--out", str(tmp_path / "o")),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("search-depth:")]
    assert line and "3/3 probes" in line[-1] and "probes/s" in line[-1] and "ETA" in line[-1], p.stderr


def test_log_axis_ticks_are_plain_1_2_5():
    from flowmap_convert.plots import linear_ticks, log_ticks, tick_label

    ticks = log_ticks(9.44, 729)
    assert ticks == [10, 20, 50, 100, 200, 500] and [tick_label(t) for t in ticks][:2] == ["10", "20"]
    assert log_ticks(0.03, 4) == [0.05, 0.1, 0.2, 0.5, 1, 2]
    assert len(log_ticks(1e-3, 1e6)) <= 8
    assert linear_ticks(0.97, 0.995) == [0.97, 0.98, 0.99] and linear_ticks(-3, 7) == [-2, 0, 2, 4, 6]


def test_search_out_never_takes_a_users_folder(tmp_path):
    """A search writes only into a new, empty or earlier-search directory; a user's folder is refused up front."""
    from flowmap_convert.search import search_depth

    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep\n")
    with pytest.raises(FlowmapError, match="not a depth search"):
        search_depth("builtin:digits-sit", depths=[5], nfe=[1], num_samples=16, out=user, device="cpu")
    assert [p.name for p in user.iterdir()] == ["todo.txt"]
