"""Issue 13: --out never destroys what flowmap did not write, bounded work from untrusted input, bounded downloads,
non-finite / wrongly typed weights and damaged config.json files end in one line (exit 2), never a traceback."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from dit_reference import make_sd
from safetensors.torch import save_file
from typer.testing import CliRunner

from flowmap_convert.cli import app
from flowmap_convert.errors import FlowmapError

BUILTIN = "builtin:digits-sit"


def invoke(*args):
    """The CLI in-process; returns the click Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, pattern: str) -> None:
    """Exit 2, the last stderr line is the only `error:` line and matches `pattern`, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, lines
    assert re.search(pattern, " ".join(result.stderr.split())), result.stderr
    assert "Traceback" not in result.output


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted builtin model, exported once for the module."""
    out = tmp_path_factory.mktemp("m") / "m"
    r = invoke("convert", BUILTIN, "--out", out)
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------------------------------------------- 1. --out
@pytest.mark.e2e
def test_convert_into_a_user_project_keeps_its_files_and_force_replaces(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text("{}")
    (proj / "notes.txt").write_text("keep")
    one_line_error(invoke("convert", BUILTIN, "--out", proj), r"proj exists and is not a flowmap output.*--force")
    assert snapshot(proj) == {"config.json": b"{}", "notes.txt": b"keep"}
    r = invoke("convert", BUILTIN, "--out", proj, "--force")
    assert r.exit_code == 0, r.output
    assert not (proj / "notes.txt").exists() and (proj / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proj.")]  # no temp or aside dir left


@pytest.mark.e2e
def test_commands_without_force_do_not_suggest_it(tmp_path):
    """sample and encode have no --force: refusing a user's folder names only another --out."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("keep")
    r = invoke("sample", BUILTIN, "--nfe", "1", "-n", "2", "--out", proj)
    one_line_error(r, r"proj exists and is not a flowmap output.*choose another --out")
    assert "--force" not in r.stderr
    assert snapshot(proj) == {"notes.txt": b"keep"}


@pytest.mark.e2e
def test_own_output_is_replaced_but_not_after_the_user_adds_a_file(tmp_path, model_dir):
    out = tmp_path / "out"
    assert invoke("convert", BUILTIN, "--out", out, "--depth", "2").exit_code == 0
    marker = json.loads((out / ".flowmap-output.json").read_text())
    assert marker["kind"] == "model" and marker["files"] == ["README.md", "config.json", "model.safetensors"]
    assert invoke("convert", BUILTIN, "--out", out, "--depth", "3").exit_code == 0
    assert json.loads((out / "config.json").read_text())["depth"] == 3
    (out / "mine.txt").write_text("mine")
    one_line_error(invoke("convert", BUILTIN, "--out", out), r"holds files flowmap did not write \(mine.txt\)")
    assert (out / "mine.txt").read_text() == "mine"
    samples = tmp_path / "s"  # a samples output is not a model output
    samples.mkdir()
    (samples / ".flowmap-output.json").write_text(json.dumps({"kind": "samples", "files": []}))
    one_line_error(invoke("convert", BUILTIN, "--out", samples), r"is a flowmap samples output, not a model output")


@pytest.mark.e2e
def test_a_model_without_a_marker_is_replaced_only_with_force(tmp_path, model_dir):
    legacy = tmp_path / "legacy"
    shutil.copytree(model_dir, legacy)
    (legacy / ".flowmap-output.json").unlink()
    before = snapshot(legacy)
    one_line_error(invoke("convert", BUILTIN, "--out", legacy, "--depth", "2"), r"is not a flowmap output.*--force")
    assert snapshot(legacy) == before
    assert invoke("convert", BUILTIN, "--out", legacy, "--depth", "2", "--force").exit_code == 0


def test_a_card_the_user_edited_is_theirs(tmp_path):
    """The marker records each file's sha256: an edited README.md is the user's (refused without --force)."""
    out = tmp_path / "out"
    assert invoke("convert", BUILTIN, "--out", out, "--depth", "2").exit_code == 0
    marker = json.loads((out / ".flowmap-output.json").read_text())
    assert set(marker["hashes"]) == {"README.md", "config.json", "model.safetensors"}
    (out / "README.md").write_text("# my own card\n")
    before = snapshot(out)
    one_line_error(invoke("convert", BUILTIN, "--out", out), r"changed since flowmap wrote them \(README.md\).*--force")
    assert snapshot(out) == before
    (out / "README.md").unlink()
    (out / "README.md").symlink_to(out / "config.json")  # a link where a file was: not ours either
    one_line_error(invoke("convert", BUILTIN, "--out", out), r"holds (symbolic links|files changed).*README.md")


@pytest.mark.e2e
def test_sample_and_convert_never_replace_the_source_they_read(tmp_path, model_dir):
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    before = snapshot(m)
    one_line_error(invoke("sample", m, "--out", m), r"is the source being read")
    one_line_error(invoke("convert", m, "--out", m, "--force"), r"is the source being read")
    train = tmp_path / "train"  # a directory holding the training checkpoint: convert train --out train
    train.mkdir()
    torch.save({"ema": make_sd(seed=1), "args": argparse.Namespace(model="SiT-B/2")}, train / "ckpt.pt")
    ckpt = snapshot(train)
    one_line_error(invoke("convert", train, "--out", train, "--force"), r"is the source being read")
    one_line_error(invoke("convert", train / "ckpt.pt", "--out", train, "--force"), r"is the source being read")
    assert snapshot(m) == before and snapshot(train) == ckpt


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["model", "empty", "dangling"])
def test_out_as_a_symlink_is_refused(tmp_path, model_dir, target):
    dest = {"model": model_dir, "empty": tmp_path / "empty", "dangling": tmp_path / "nowhere"}[target]
    if target == "empty":
        dest.mkdir()
    link = tmp_path / "link"
    link.symlink_to(dest)
    before = snapshot(model_dir)
    one_line_error(invoke("convert", BUILTIN, "--out", link, "--force"), r"is a symbolic link")
    assert link.is_symlink() and snapshot(model_dir) == before


@pytest.mark.e2e
def test_read_only_model_dir_is_refused(tmp_path, model_dir):
    ro = tmp_path / "ro"
    shutil.copytree(model_dir, ro)
    ro.chmod(0o555)
    try:
        one_line_error(invoke("convert", BUILTIN, "--out", ro), r"is read-only")
    finally:
        ro.chmod(0o755)
    assert (ro / "model.safetensors").is_file()


@pytest.mark.e2e
def test_sigkill_during_export_leaves_only_what_the_next_run_removes(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from flowmap_convert.io import atomic_dir\n"
        f"with atomic_dir({str(out)!r}, 'model') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    stale = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert not out.exists() and len(stale) == 3, stale  # the temp dir, its claim, the (released) lock file
    assert stale[0].endswith(".tmp") and stale[1] == stale[0] + ".flowmap" and stale[2] == ".out.flowmap-lock"
    aside = tmp_path / f".out.{proc.pid}.zz.old"  # an aside dir of the same dead run, claimed as flowmap claims it
    aside.mkdir()
    (tmp_path / (aside.name + ".flowmap")).write_text(json.dumps({"flowmap_leftover": aside.name}))
    users = tmp_path / ".out.20240101.backup.old"  # looks like a leftover, but nothing claims it: the user's
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    (tmp_path / ".out.19991231.v1.tmp").write_text("mine too")
    live = tmp_path / f".out.{os.getpid()}.yy.tmp"  # a live run's temp dir is never touched
    live.mkdir()
    assert invoke("convert", BUILTIN, "--out", out).exit_code == 0
    left = sorted([live.name, "out", users.name, ".out.19991231.v1.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    assert (users / "keep.txt").read_text() == "mine"


@pytest.mark.e2e
def test_disk_full_during_convert_is_one_line_and_leaves_nothing(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # the weights file is larger

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "flowmap_convert.cli", "convert", BUILTIN, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=limit,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert "cannot write" in r.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- 2. bounded work
@pytest.mark.e2e
@pytest.mark.parametrize(
    "key, message",
    [("blocks.800.attn.qkv.weight", r"not contiguous from 0"), ("blocks.1000000000.x", r"exceeds 1023")],
)
def test_a_stray_block_key_fails_fast(tmp_path, key, message):
    sd = make_sd(seed=2)
    sd[key] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    t0 = time.perf_counter()
    one_line_error(invoke("convert", path, "--num-heads", "4", "--out", tmp_path / "o"), message)
    assert time.perf_counter() - t0 < 20


def test_contiguous_block_indices_are_checked_in_one_function():
    from flowmap_convert.adapters.dit_keys import block_count

    assert block_count({"blocks.0.a": 0, "blocks.1.a": 0, "x": 0}) == 2
    with pytest.raises(FlowmapError, match="missing 1"):
        block_count({"blocks.0.a": 0, "blocks.2.a": 0})


def test_loading_builds_the_model_state_dict_once(monkeypatch):
    from flowmap_convert import io

    calls = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(50))

        def state_dict(self, *a, **k):
            calls.append(1)
            return super().state_dict(*a, **k)

    m = Model()
    sd = {k[len("net.") :]: v.clone() for k, v in m.state_dict().items()}
    calls.clear()
    io.load_canonical_state_dict(m, sd, "x")
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------- 3. downloads
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.path.rsplit("/", 1)[0]  # /KIND/m.pt
        if path == "/endless":  # no Content-Length, bytes until the client gives up (bounded here too)
            self.send_response(200)
            self.end_headers()
            for _ in range(10_000):
                try:
                    self.wfile.write(b"x" * 1024)
                except OSError:
                    return
        elif path == "/short":  # announces 5000 bytes, sends 1000
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"y" * 1000)
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.pt")
            self.end_headers()
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(300):
                try:
                    self.wfile.write(b"z" * 10)
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)


@pytest.fixture
def http_base(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLOWMAP_ALLOW_HTTP", "1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def cache_files(tmp_path):
    root = tmp_path / "cache"
    return sorted(p.name for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize(
    "path, message",
    [
        ("/endless", "sent more than"),
        ("/short", "stopped after 1000 of 5000 bytes"),
        ("/big", "over the download limit"),
        ("/to-ftp", "refusing to leave https|redirects to ftp"),
    ],
)
def test_bad_downloads_are_refused_and_never_cached(http_base, tmp_path, monkeypatch, path, message):
    from flowmap_convert.adapters.sources import fetch_url

    monkeypatch.setenv("FLOWMAP_MAX_DOWNLOAD_GB", "0.00005")  # 50 kB
    for _ in range(2):  # the second try must not find a cached copy
        with pytest.raises(FlowmapError, match=message):
            fetch_url(http_base + path + "/m.pt")
    assert cache_files(tmp_path) in ([], ["url"])


def test_redirect_from_https_to_http_is_refused():
    import urllib.request

    from flowmap_convert.adapters.sources import _NoDowngrade

    req = urllib.request.Request("https://example.org/m.pt")
    with pytest.raises(FlowmapError, match="refusing to leave https"):
        _NoDowngrade().redirect_request(req, None, 302, "Found", {}, "http://example.org/m.pt")
    assert _NoDowngrade().redirect_request(req, None, 302, "Found", {}, "https://cdn.example.org/m.pt") is not None


@pytest.mark.e2e  # starts a Python child process
def test_sigterm_during_a_download_removes_the_part_file(http_base, tmp_path):
    code = f"from flowmap_convert.adapters.sources import fetch_url\nfetch_url({http_base + '/slow/m.pt'!r})\n"
    env = {**os.environ, "FLOWMAP_CACHE": str(tmp_path / "cache"), "FLOWMAP_ALLOW_HTTP": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if any(n.endswith(".part") for n in cache_files(tmp_path)):
                break
            time.sleep(0.05)
        assert any(n.endswith(".part") for n in cache_files(tmp_path))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not any(n.endswith(".part") for n in cache_files(tmp_path))
    dead = tmp_path / "cache" / "url" / f".{'0' * 16}-m.pt.999999999.ab.part"  # a killed run's leftover
    dead.write_bytes(b"x")
    from flowmap_convert.outputs import clean_stale

    name = dead.name.split(".999999999")[0][1:]
    assert clean_stale(dead.parent, name) == []  # outside the cache a name alone proves nothing
    assert clean_stale(dead.parent, name, by_name=True) == [dead]  # the download cache is flowmap's own


# ---------------------------------------------------------------------------------------------------- 4. values
def _save(tmp_path, sd, name="m.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


@pytest.mark.e2e
def test_nan_weights_are_refused_unless_allowed_and_huge_ones_warn(tmp_path):
    sd = make_sd(seed=3)
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    path = _save(tmp_path, sd)
    one_line_error(
        invoke("convert", path, "--num-heads", "4", "--out", tmp_path / "o"),
        r"NaN or infinite weights in blocks.1.mlp.fc1.weight.*--allow-nonfinite",
    )
    assert not (tmp_path / "o").exists()
    r = invoke("convert", path, "--num-heads", "4", "--out", tmp_path / "o", "--allow-nonfinite")
    assert r.exit_code == 0 and "warning" in r.stderr
    sd = make_sd(seed=3)
    sd["pos_embed"][0, 0, 0] = 1e38
    r = invoke("convert", _save(tmp_path, sd, "big.safetensors"), "--num-heads", "4", "--out", tmp_path / "o2")
    assert r.exit_code == 0 and "larger than" in r.stderr and "pos_embed" in r.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_weights_are_refused_by_name(tmp_path, dtype):
    sd = make_sd(seed=4)
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].to(dtype)
    one_line_error(
        invoke("convert", _save(tmp_path, sd), "--num-heads", "4", "--out", tmp_path / "o"),
        r"non-float weights blocks.0.attn.proj.weight \(" + str(dtype).replace("torch.", ""),
    )


CONFIG_MUTATIONS = {
    "a JSON list": (lambda c: [1, 2], r"holds a JSON list"),
    "num_blocks string": (lambda c: {**c, "num_blocks": "4"}, r"num_blocks must be an integer"),
    "latent string": (lambda c: {**c, "latent": "identity"}, r"latent must be an object"),
    "zero heads": (lambda c: {**c, "num_heads": 0}, r"num_heads = 0 is outside"),
    "cfg_scale text": (lambda c: {**c, "sampling": {"cfg_scale": "high"}}, r"sampling.cfg_scale must be"),
    "absurd size": (lambda c: {**c, "hidden_size": 10**12}, r"hidden_size = \d+ is outside"),
    "mlp nan": (lambda c: {**c, "mlp_ratio": float("nan")}, r"mlp_ratio must be"),
    "latent kind": (lambda c: {**c, "latent": {**c["latent"], "kind": "vq"}}, r"latent.kind 'vq'"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(CONFIG_MUTATIONS))
def test_damaged_config_json_is_one_line(tmp_path, model_dir, case):
    mutate, message = CONFIG_MUTATIONS[case]
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps(mutate(cfg)))
    if case == "a JSON list":  # not recognised as an export at all, then read as one when forced
        from flowmap_convert.model import read_model_dir

        with pytest.raises(FlowmapError, match=message):
            read_model_dir(m)
        return
    one_line_error(invoke("convert", m, "--out", tmp_path / "o"), message)
    one_line_error(invoke("sample", m, "--out", tmp_path / "s"), message)


@pytest.mark.e2e
def test_bad_training_args_missing_keys_and_another_models_dict_are_one_line(tmp_path):
    sd = make_sd(seed=5)
    legacy = {k.replace("blocks.3.", "decoder_blocks.0."): v for k, v in sd.items()}
    bad_args = tmp_path / "bad-args.pt"
    torch.save({"ema": legacy, "args": argparse.Namespace(encoder_depth="abc", enc_type="dinov2")}, bad_args)
    one_line_error(invoke("convert", bad_args, "--out", tmp_path / "o"), r"encoder_depth must be an integer")
    missing = dict(make_sd(seed=6))
    del missing["blocks.2.mlp.fc2.weight"]
    one_line_error(invoke("convert", _save(tmp_path, missing, "miss.safetensors"), "--out", tmp_path / "o"), r".")
    from flowmap_convert.adapters import BUILTIN_DIR
    from safetensors.torch import load_file

    floats = {
        k: v
        for k, v in load_file(BUILTIN_DIR / "digits-classifier" / "model.safetensors").items()
        if v.is_floating_point()
    }
    other = _save(tmp_path, floats, "classifier.safetensors")
    one_line_error(invoke("convert", other, "--out", tmp_path / "o"), r"no known model family")
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["/etc", "../digits-sit", "digits-sit/../digits-sit", ""])
def test_builtin_names_are_plain_names(tmp_path, name):
    one_line_error(invoke("convert", f"builtin:{name}", "--out", tmp_path / "o"), r"unknown builtin model")


@pytest.mark.e2e
def test_the_trust_pickle_hint_is_printed_only_where_the_flag_exists(tmp_path):
    import datetime

    evil = tmp_path / "global.pt"
    torch.save({"ema": make_sd(seed=7), "created": datetime.datetime(2025, 1, 1)}, evil)
    r = invoke("convert", evil, "--out", tmp_path / "o")
    one_line_error(r, r"rerun with --trust-pickle")
    r = invoke("sample", evil, "--out", tmp_path / "s")
    one_line_error(r, r"convert it first with `flowmap convert .* --trust-pickle")
    assert "rerun with --trust-pickle" not in r.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--depth", "0", r"--depth must be an integer in \[1, 1024\]"),
        ("--depth", str(2**70), r"--depth must be an integer"),
        ("--num-heads", "-3", r"--num-heads must be an integer"),
        ("--encoder-depth", "0", r"--encoder-depth must be"),
        ("--sha256", "xyz", r"--sha256 'xyz' is not 64 hexadecimal digits"),
    ],
)
def test_convert_numbers_are_checked_before_any_work(tmp_path, option, value, message):
    r = invoke("convert", "acme/not-a-repo", option, value, "--out", tmp_path / "o")
    one_line_error(r, message)
    assert "flowmap:" not in r.stderr  # nothing was resolved or loaded


def test_mark_output_records_the_kind_for_in_place_directories(tmp_path):
    from flowmap_convert.outputs import check_output, mark_output, output_kind

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    assert output_kind(run) is None
    mark_output(run, "run")
    assert output_kind(run) == "run"
    check_output(run, "run")  # ours, same kind: may be reused
    with pytest.raises(FlowmapError, match="is a flowmap run output, not a model output"):
        check_output(run, "model")
    (run / "later.txt").write_text("user")
    with pytest.raises(FlowmapError, match=r"did not write \(later.txt\)"):
        check_output(run, "run")
    check_output(run, "run", force=True)


def test_atomic_file_failure_keeps_the_old_file_and_names_temps_for_cleanup(tmp_path):
    from flowmap_convert.outputs import atomic_file, write_text_atomic

    target = write_text_atomic(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            assert re.match(rf"^\.a\.json\.{os.getpid()}\.[0-9a-f]+\.tmp$", tmp.name)
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_interrupted_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    from flowmap_convert import outputs

    out = tmp_path / "out"
    with outputs.atomic_dir(out, "samples") as tmp:
        (tmp / "grid.png").write_bytes(b"old")
    real, calls = os.rename, []

    def rename(src, dst):
        if Path(dst) == out and not calls:  # the new directory's rename-in is interrupted (once)
            calls.append(src)
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with outputs.atomic_dir(out, "samples") as tmp:
            (tmp / "grid.png").write_bytes(b"new")
    monkeypatch.undo()
    assert calls and (out / "grid.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
