"""An alias whose Hub copy and direct download both fail: the message says why each failed and how to fetch by hand."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from flowmap_convert.adapters import sources

from flowmap_convert.cli import main
from flowmap_convert.errors import FlowmapError

REAL_URL = json.loads(sources.ALIASES_FILE.read_text())["sihyun-yu/REPA"]["url"]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FLOWMAP_CACHE", str(tmp_path / "fc"))
    monkeypatch.delenv("FLOWMAP_OFFLINE", raising=False)
    return tmp_path


def local_alias(monkeypatch, tmp_path, url: str) -> None:
    """The real REPA alias entry with its download URL replaced by a loopback one (no real network in tests)."""
    table = json.loads(sources.ALIASES_FILE.read_text())
    table["sihyun-yu/REPA"]["url"] = url
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(sources, "ALIASES_FILE", path)
    monkeypatch.setenv("FLOWMAP_ALLOW_HTTP", "1")


@pytest.mark.e2e
def test_offline_alias_names_the_file_the_url_and_the_local_fallback(empty_caches, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(["convert", "sihyun-yu/REPA", "--depth", "20", "--out", str(empty_caches / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not (empty_caches / "out").exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot fetch sihyun-yu/REPA: ")
    assert "its Hub copy is not in the local Hub cache" in line and "not found" not in line
    assert "kyungmnlee" not in err  # only what the user named
    assert "www.dl.dropboxusercontent.com is not cached either, and offline mode is on" in line
    assert f"download {REAL_URL} by hand, save it as repa-sit-xl-2-256-last.pt" in line
    # the suggestion is the user's own command line with the file in place of the alias: --depth 20 is kept
    out = str(empty_caches / "out")
    assert line.endswith(f"run `flowmap convert ./repa-sit-xl-2-256-last.pt --depth 20 --out {out} --family repa`.")


def test_unreachable_hub_and_download_say_unreachable_not_missing(empty_caches, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    url = f"http://127.0.0.1:{closed_port()}/last.pt"
    local_alias(monkeypatch, empty_caches, url)
    t0 = time.perf_counter()
    with pytest.raises(FlowmapError) as e:
        sources.resolve("sihyun-yu/REPA")
    msg = str(e.value)
    assert time.perf_counter() - t0 < 60
    assert "the Hugging Face Hub is unreachable and" in msg and "127.0.0.1" in msg and "kyungmnlee" not in msg
    assert "is unreachable too" in msg and "not found" not in msg and "not cached" not in msg
    assert msg.endswith(
        f"download {url} by hand, save it as repa-sit-xl-2-256-last.pt, and run `flowmap convert ./repa-sit-xl-2-256-last.pt --family repa`."
    )


class NotFound(BaseHTTPRequestHandler):
    """Answers 404 to everything (a Hub without the repo, a server without the file)."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        body = b'{"error": "Repository not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


def test_missing_hub_copy_and_missing_file_say_not_found(empty_caches, monkeypatch):
    import huggingface_hub.constants as c

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setattr(c, "ENDPOINT", base)
        local_alias(monkeypatch, empty_caches, f"{base}/last.pt")
        with pytest.raises(FlowmapError) as e:
            sources.resolve("sihyun-yu/REPA")
    finally:
        server.shutdown()
        server.server_close()
    msg = str(e.value)
    assert "its Hub copy was not found (it does not exist" in msg and "kyungmnlee" not in msg
    assert "the download from 127.0.0.1" in msg and "answered 404" in msg and "unreachable" not in msg
    assert "save it as repa-sit-xl-2-256-last.pt" in msg
