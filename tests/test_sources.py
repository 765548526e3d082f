"""Source resolution against a local Hub cache in the real layout and a loopback HTTP server (no network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
import torch
from dit_reference import make_sd, ref_forward
from flowmap_convert.adapters import LoadOptions, load_source
from flowmap_convert.adapters.sources import resolve

from flowmap_convert.errors import FlowmapError

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs=("main",)):
    """Write one commit of `repo` in huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<path> -> blob, refs/<name>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache with two repos; returns (cache dir, state dicts by name)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "flowmap-cache"))
    sds = {
        name: make_sd(seed=i, logvar=name.startswith("dmf"))
        for i, name in enumerate(["v1", "v2", "repa256", "repa512", "dmf"])
    }
    add_snapshot(
        cache,
        "acme/tiny-sit",
        COMMIT_A,
        {"model.pt": pt_bytes(sds["v1"]), "weights/ema.pt": pt_bytes(sds["v1"])},
        refs=("v1.0",),
    )
    add_snapshot(
        cache,
        "acme/tiny-sit",
        COMMIT_B,
        {"model.pt": pt_bytes(sds["v2"]), "weights/ema.pt": pt_bytes(sds["v2"])},
        refs=("main",),
    )
    add_snapshot(
        cache,
        "kyungmnlee/DMF",
        COMMIT_A,
        {
            "sit_xl_2_repa_512.pt": pt_bytes(sds["repa512"]),
            "sit_xl_2_repa_256.pt": pt_bytes(sds["repa256"]),
            "dmf_xl_2_256.pt": pt_bytes(sds["dmf"]),
            "imgnet256.pkl": b"stats",
        },
    )
    return cache, sds


def velocity_matches(model, sd):
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    return (model.velocity(x, t, y) - ref_forward(sd, x, t, y, heads=4)).abs().max().item() <= 1e-5


def test_hub_repo_revision_filename_and_path_inside(hub):
    cache, sds = hub
    res = resolve("acme/tiny-sit", filename="model.pt")
    assert res.info["revision"] == COMMIT_B and res.info["file"] == "model.pt"
    assert res.info["sha256"] == hashlib.sha256(res.path.read_bytes()).hexdigest()
    res = resolve("acme/tiny-sit", revision="v1.0", filename="model.pt")
    assert res.info["revision"] == COMMIT_A and res.info["ref"] == "v1.0"
    res = resolve("acme/tiny-sit/weights/ema.pt", revision=COMMIT_A)
    assert res.info["file"] == "weights/ema.pt" and res.info["revision"] == COMMIT_A
    model, info = load_source("acme/tiny-sit/weights/ema.pt", revision="v1.0", num_heads=4)
    assert info["revision"] == COMMIT_A and velocity_matches(model, sds["v1"])
    model, info = load_source("acme/tiny-sit", filename="model.pt", num_heads=4)
    assert velocity_matches(model, sds["v2"])


def test_hub_errors_are_user_errors(hub):
    with pytest.raises(FlowmapError, match="holds 2 weight files.*`filename`"):
        resolve("acme/tiny-sit")
    with pytest.raises(FlowmapError, match="not in the local Hub cache.*HF_HUB_OFFLINE"):
        resolve("acme/tiny-sit", filename="missing.pt")
    with pytest.raises(FlowmapError, match="not in the local Hub cache"):
        resolve("acme/tiny-sit", revision="v9", filename="model.pt")
    with pytest.raises(FlowmapError, match="not in the local Hub cache.*offline"):
        resolve("nobody/nothing")
    with pytest.raises(FlowmapError, match="give the file once"):
        resolve("acme/tiny-sit/model.pt", filename="other.pt")
    with pytest.raises(FlowmapError, match="no such file"):
        resolve("./nope/missing.pt")
    with pytest.raises(FlowmapError, match="cannot understand"):
        resolve("not a source")
    with pytest.raises(FlowmapError, match="apply to Hub repos"):
        resolve("builtin:anything", revision="main")


def test_alias_repa_picks_the_256_file_from_the_dmf_repo(hub, capsys):
    _, sds = hub
    model, info = load_source("sihyun-yu/REPA", num_heads=4)
    err = capsys.readouterr().err
    assert "sihyun-yu/REPA -> kyungmnlee/DMF/sit_xl_2_repa_256.pt" in err
    assert info["file"] == "sit_xl_2_repa_256.pt" and info["revision"] == COMMIT_A and info["family"] == "repa"
    assert velocity_matches(model, sds["repa256"])
    model, info = load_source("kyungmnlee/DMF", num_heads=4)
    assert info["family"] == "dmf" and info["file"] == "dmf_xl_2_256.pt"
    assert velocity_matches(model, sds["dmf"])


def test_alias_offline_with_nothing_cached_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "fc"))
    with pytest.raises(FlowmapError, match="sihyun-yu/REPA: its Hub copy is not in the local Hub cache.*offline"):
        load_source("sihyun-yu/REPA")
    with pytest.raises(FlowmapError, match="Google Drive"):
        load_source("sony/mf-rae")


# --------------------------------------------------------------------------------------------- URLs
@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback HTTP server over a temp dir; plain http allowed for 127.0.0.1 through FLOWMAP_ALLOW_HTTP."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "fc"))
    monkeypatch.setenv("FLOWMAP_ALLOW_HTTP", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_download_cache_and_sha256(server, tmp_path, monkeypatch):
    root, base = server
    sd = make_sd(seed=20)
    data = pt_bytes(sd)
    (root / "ckpt.pt").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    model, info = load_source(f"{base}/ckpt.pt", sha256=digest, num_heads=4)
    assert info["sha256"] == digest and velocity_matches(model, sd)
    cached = [p for p in (tmp_path / "fc" / "url").iterdir() if p.suffix == ".pt"]
    assert len(cached) == 1 and cached[0].read_bytes() == data
    (root / "ckpt.pt").unlink()  # served no more: the cache answers, also offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(f"{base}/ckpt.pt").path == cached[0]


def test_url_sha256_mismatch_removes_the_download(server, tmp_path):
    root, base = server
    (root / "bad.pt").write_bytes(pt_bytes(make_sd(seed=21)))
    with pytest.raises(FlowmapError, match="not the expected"):
        resolve(f"{base}/bad.pt", sha256="0" * 64)
    assert not any((tmp_path / "fc" / "url").iterdir())  # neither the file nor a .part is left
    with pytest.raises(FlowmapError, match="answered 404"):
        resolve(f"{base}/absent.pt")


def test_plain_http_is_refused_without_the_test_switch(monkeypatch):
    monkeypatch.delenv("FLOWMAP_ALLOW_HTTP", raising=False)
    with pytest.raises(FlowmapError, match="use an https"):
        resolve("http://127.0.0.1:1/x.pt")
    with pytest.raises(FlowmapError, match="use an https"):
        resolve("ftp://example.org/x.pt")


def test_a_family_can_claim_a_directory_layout_locally_and_on_the_hub(hub, tmp_path, monkeypatch):
    """The hook the diffusers-style families use: claims_layout (Hub file list) + claims_dir/build_dir (local dir)."""
    from safetensors.torch import load_file, save_file

    from flowmap_convert import adapters

    seen = {}

    class FakeDiffusers(adapters.Family):
        def detect(self, sd):
            return False

        def claims_layout(self, files):
            return ["transformer/*", "model_index.json"] if "model_index.json" in files else None

        def claims_dir(self, path):
            return (path / "model_index.json").is_file() and (path / "transformer").is_dir()

        def build_dir(self, path, options):
            seen["path"] = path
            sd = load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
            return adapters.FAMILIES["repa"].build(sd, LoadOptions(num_heads=4)), "plain"

    monkeypatch.setitem(adapters.FAMILIES, "fake-diffusers", FakeDiffusers())
    monkeypatch.setattr(adapters, "DETECTION_ORDER", (*adapters.DETECTION_ORDER, "fake-diffusers"))
    sd = make_sd(seed=40)
    local = tmp_path / "pipe"
    (local / "transformer").mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    save_file(sd, str(local / "transformer" / "diffusion_pytorch_model.safetensors"))
    model, info = load_source(str(local))
    assert info["family"] == "fake-diffusers" and velocity_matches(model, sd)
    save_file(sd, str(tmp_path / "w.safetensors"))
    add_snapshot(
        hub[0],
        "acme/pipe",
        COMMIT_A,
        {
            "model_index.json": b"{}",
            "transformer/diffusion_pytorch_model.safetensors": (tmp_path / "w.safetensors").read_bytes(),
            "vae/diffusion_pytorch_model.safetensors": b"not needed",
        },
    )
    model, info = load_source("acme/pipe")
    assert info["family"] == "fake-diffusers" and info["revision"] == COMMIT_A and velocity_matches(model, sd)
    assert COMMIT_A in str(seen["path"])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("RepositoryNotFoundError", "does not exist or is private"),
        ("GatedRepoError", "is gated"),
        ("RevisionNotFoundError", "has no revision 'v9'"),
        ("RemoteEntryNotFoundError", "has no file 'x.pt'"),
        ("LocalEntryNotFoundError", "not in the local Hub cache"),
    ],
)
def test_hub_exceptions_become_one_sentence_fixes(name, expected, monkeypatch):
    from huggingface_hub import errors as he

    from flowmap_convert.downloads import hub_error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = getattr(he, name)
    exc = cls.__new__(cls)  # the HTTP errors need a live response to construct; only the type matters here
    Exception.__init__(exc, "boom")
    msg = str(hub_error(exc, "acme/repo", "v9", "x.pt"))
    assert expected in msg and msg.endswith(".") and "\n" not in msg


def test_connection_errors_read_as_network_problems():
    from flowmap_convert.downloads import hub_error

    assert "cannot reach the Hugging Face Hub" in str(hub_error(ConnectionError("down"), "acme/repo", None, None))


def test_alias_family_must_match_the_weights(hub, monkeypatch):
    cache, sds = hub
    add_snapshot(
        cache,
        "kyungmnlee/DMF",
        COMMIT_B,
        {"dmf_xl_2_256.pt": pt_bytes(make_sd(seed=41, learn_sigma=True))},
        refs=("other",),
    )
    with pytest.raises(FlowmapError, match="does not look like a dmf checkpoint.*sit"):
        load_source("kyungmnlee/DMF", revision="other", num_heads=4)


def test_an_exported_flowmap_on_the_hub_loads_with_its_depth(hub, tmp_path):
    import flowmap_convert as fm
    from flowmap_convert.io import export

    cache, sds = hub
    out = export(
        fm.convert(str(resolve("acme/tiny-sit", filename="model.pt").path), depth=2, num_heads=4), tmp_path / "exp"
    )
    add_snapshot(cache, "acme/exported", COMMIT_A, {p.name: p.read_bytes() for p in out.iterdir()})
    model, info = load_source("acme/exported")
    assert info["family"] == "flowmap" and model.config.depth == 2 and velocity_matches(model, sds["v2"])
