"""flowmap eval: digits FD reproduction, the Inception path on a locally built extractor, references, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flowmap_convert.cli import app
from flowmap_convert.errors import FlowmapError

WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def run_cli(*args):
    r = CliRunner().invoke(app, ["eval", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


def one_error_line(code, err, message):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err


class TinyInception(torch.nn.Module):
    """Stands in for torch-fidelity's Inception: uint8 NCHW RGB in, bilinear resize to 299, (pool features, logits).

    Only 32 features (not 2048), so that a few dozen samples exceed the feature dimension.
    """

    feature_dim = 32

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.feat = torch.nn.Linear(8 * 4 * 4, self.feature_dim)
        self.logits = torch.nn.Linear(self.feature_dim, 1008)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(299, 299), mode="bilinear")
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
        f = torch.tanh(self.feat(h))
        return f, self.logits(f)


@pytest.fixture
def local_inception(tmp_path, monkeypatch):
    """A locally built extractor weights file in $FLOWMAP_CACHE and a factory that loads it (no network)."""
    import flowmap_convert.extractors as extractors

    cache = tmp_path / "cache"
    cache.mkdir()
    torch.manual_seed(0)
    torch.save(TinyInception().state_dict(), cache / WEIGHTS)
    monkeypatch.setenv("FLOWMAP_CACHE", str(cache))
    monkeypatch.setenv("FLOWMAP_OFFLINE", "1")
    loaded = []

    def factory(weights, device):
        net = TinyInception()
        net.load_state_dict(torch.load(weights, weights_only=True))
        loaded.append(weights)
        return net

    monkeypatch.setitem(extractors.INCEPTION_NETWORK, "factory", factory)
    return cache, loaded


def rgb(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.e2e
def test_eval_reproduces_digits_fd_of_evaluate_digits(tmp_path, monkeypatch):
    from flowmap_convert.digits import evaluate_digits

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "e"
    code, stdout, err = run_cli("builtin:digits-sit", "--nfe", "1,2", "-n", "80", "--out", out, "--device", "cpu")
    assert code == 0, err
    report = json.loads((out / "eval.json").read_text())
    assert report["metrics"] == ["digits"] and len(report["model_sha256"]) == 64
    for row in report["results"]:
        images = np.load(out / f"samples-nfe{row['nfe']}" / "samples.npz")["arr_0"]
        labels = json.loads((out / f"samples-nfe{row['nfe']}" / "samples.json").read_text())["classes"]
        ref = evaluate_digits(images, labels)
        assert row["digits_fd"] == pytest.approx(ref["fd"], rel=1e-9) and row["digits_acc"] == pytest.approx(ref["acc"])
        assert row["num_samples"] == 80 and row["reused"] is False
    assert "digits FD" in stdout and (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # a second run reuses the finished samples
    code, _, err = run_cli("builtin:digits-sit", "--nfe", "2", "-n", "80", "--out", out, "--device", "cpu")
    assert code == 0 and json.loads((out / "eval.json").read_text())["results"][0]["reused"] is True, err


@pytest.mark.e2e
def test_inception_path_end_to_end_on_local_weights(tmp_path, local_inception):
    from flowmap_convert.frechet import feature_stats, frechet_distance
    from flowmap_convert.metrics import inception_score, precision_recall

    cache, loaded = local_inception
    samples, real = rgb(40, 8, 1), rgb(50, 8, 2)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    out = tmp_path / "e"
    code, stdout, err = run_cli(
        tmp_path / "s.npz", "--reference", tmp_path / "ref.npz", "--metrics", "fid,is,pr", "--out", out
    )
    assert code == 0, err
    row = json.loads((out / "eval.json").read_text())["results"][0]
    net = TinyInception()
    net.load_state_dict(torch.load(cache / WEIGHTS, weights_only=True))
    with torch.no_grad():
        fs, ls = (t.double().numpy() for t in net(torch.from_numpy(samples).permute(0, 3, 1, 2)))
        fr, _ = (t.double().numpy() for t in net(torch.from_numpy(real).permute(0, 3, 1, 2)))
    assert row["fid"] == pytest.approx(frechet_distance(*feature_stats(fs), *feature_stats(fr)), rel=1e-4)
    assert row["is"] == pytest.approx(inception_score(ls)[0], rel=1e-6)
    p, r = precision_recall(fr.astype(np.float32).astype(np.float64), fs, k=3)
    assert (row["precision"], row["recall"]) == (pytest.approx(p), pytest.approx(r))
    assert "FID" in stdout and loaded == [cache / WEIGHTS]
    # reference statistics are cached by content hash: a second run does not read the reference images again
    assert len(list((cache / "reference").glob("*-inception.npz"))) == 1
    import flowmap_convert.evaluate as ev

    def no_read(*a, **k):
        raise AssertionError("the cached reference must be used")

    real_read = ev.read_images
    ev.read_images = lambda p: real_read(p) if str(p).endswith("s.npz") else no_read()
    try:
        code, _, err = run_cli(
            tmp_path / "s.npz", "--reference", tmp_path / "ref.npz", "--metrics", "fid", "--out", out
        )
    finally:
        ev.read_images = real_read
    assert code == 0, err


@pytest.mark.e2e
def test_png_folder_and_stats_reference(tmp_path, local_inception):
    from flowmap_convert.metrics import save_reference

    d = tmp_path / "pngs"
    d.mkdir()
    for i, img in enumerate(rgb(12, 8, 3)):
        Image.fromarray(img).save(d / f"{i:06d}.png")
    save_reference(tmp_path / "stats.npz", np.zeros(32), np.eye(32))
    code, stdout, err = run_cli(d, "--reference", tmp_path / "stats.npz", "--metrics", "is,pr", "--out", tmp_path / "e")
    assert code == 0, err
    row = json.loads((tmp_path / "e" / "eval.json").read_text())["results"][0]
    assert row["num_samples"] == 12 and row["is"] > 0 and row["precision"] is None  # stats hold no manifold


@pytest.mark.e2e
def test_bad_inputs_one_line_exit_2(tmp_path, local_inception, monkeypatch):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(rgb(1, 8, 0)[0]).save(mixed / "a.png")
    Image.fromarray(rgb(1, 16, 0)[0]).save(mixed / "b.png")
    code, _, err = run_cli(mixed, "--out", tmp_path / "o")
    one_error_line(code, err, "all images must share size and channels")
    chans = tmp_path / "chans"
    chans.mkdir()
    Image.fromarray(rgb(1, 8, 0)[0]).save(chans / "a.png")
    Image.fromarray(rgb(1, 8, 0)[0][..., 0]).save(chans / "b.png")
    code, _, err = run_cli(chans, "--out", tmp_path / "o")
    one_error_line(code, err, "with 1 channel(s) but a.png is 8x8 with 3")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(tmp_path / "empty", "--out", tmp_path / "o")
    one_error_line(code, err, "holds no .png images")
    np.savez(tmp_path / "s.npz", arr_0=rgb(40, 8, 1))
    np.savez(tmp_path / "ref16.npz", arr_0=rgb(40, 16, 2))
    code, _, err = run_cli(
        tmp_path / "s.npz", "--reference", tmp_path / "ref16.npz", "--metrics", "fid", "--out", tmp_path / "o"
    )
    one_error_line(code, err, "use a reference at the samples' resolution")
    np.savez(tmp_path / "few.npz", arr_0=np.zeros((10, 16, 16, 1), np.uint8))  # digits features are 64-d
    code, _, err = run_cli(tmp_path / "few.npz", "--out", tmp_path / "o")
    one_error_line(code, err, "10 samples are fewer than the 64 feature dimensions")
    (tmp_path / "cache" / WEIGHTS).unlink()
    code, _, err = run_cli(
        tmp_path / "s.npz", "--reference", tmp_path / "s.npz", "--metrics", "fid", "--out", tmp_path / "o"
    )
    one_error_line(code, err, f"{WEIGHTS} are not here (offline); download https://github.com/toshas/torch-fidelity")
    code, _, err = run_cli(tmp_path / "s.npz", "--metrics", "fid,bogus", "--out", tmp_path / "o")
    one_error_line(code, err, "unknown --metrics bogus")
    assert not (tmp_path / "o").exists()


def test_eval_out_never_takes_a_users_folder(tmp_path):
    """`flowmap eval MODEL --out DIR` writes only into a new, empty or earlier-eval directory."""
    from flowmap_convert.evaluate import evaluate

    user = tmp_path / "mine"
    user.mkdir()
    (user / "paper.tex").write_text("keep\n")
    with pytest.raises(FlowmapError, match="not a flowmap eval output"):
        evaluate("builtin:digits-sit", nfe=[1], num_samples=100, out=user)
    assert [p.name for p in user.iterdir()] == ["paper.tex"]


def test_eval_out_is_never_the_samples_being_read(tmp_path):
    from flowmap_convert.evaluate import evaluate

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000000.png").write_bytes(b"not read")
    with pytest.raises(FlowmapError, match="is the source being read"):
        evaluate(samples, out=samples)
    assert [p.name for p in samples.iterdir()] == ["000000.png"]
