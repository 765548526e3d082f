"""`flowmap push` against a local stand-in for the Hub API (127.0.0.1): what is uploaded, the card, the refusals."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flowmap_convert.errors import FlowmapError
from flowmap_convert.hub import push
from flowmap_convert.outputs import mark_output


class HubStandIn(BaseHTTPRequestHandler):
    """The four POST endpoints huggingface_hub's create_repo / create_branch / create_commit call, recorded."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        hub = self.server.hub
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub["auth"].append(self.headers.get("Authorization"))
        path = self.path.split("?")[0]
        if hub.get("refuse"):
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            hub["created"].append(payload)
            return self._reply(200, {"url": f"{hub['base']}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # ['', 'api', 'models', owner, name, action, revision]
        if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
            repo, action, revision = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if action == "preupload":
                files = json.loads(body)["files"]
                hub["preupload"].append([f["path"] for f in files])
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes})
            if action == "branch":
                hub["branches"].append((repo, revision))
                return self._reply(200, {})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                files = {
                    item["value"]["path"]: base64.b64decode(item["value"]["content"])
                    for item in lines
                    if item["key"] == "file"
                }
                hub["commits"].append(
                    {"repo": repo, "revision": revision, "summary": header["summary"], "files": files}
                )
                oid = f"{len(hub['commits']):040x}"
                return self._reply(200, {"commitUrl": f"{hub['base']}/{repo}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"no endpoint {path} in the stand-in"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hub stand-in on an ephemeral 127.0.0.1 port; HF_ENDPOINT and HF_TOKEN point at it."""
    server = HTTPServer(("127.0.0.1", 0), HubStandIn)
    server.timeout = 5
    base = f"http://127.0.0.1:{server.server_port}"
    server.hub = {"base": base, "auth": [], "created": [], "preupload": [], "branches": [], "commits": []}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server.hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny exported flow map with a grid, an extra figure and a checkpoints/ subdirectory."""
    from conftest import randomize, tiny_config

    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    model = randomize(FlowMap(tiny_config())).with_depth(2)
    model.config = model.config.replace(
        provenance={"source": "builtin:test", "family": "repa"}, training={"recipe": {"lr": 1e-4, "steps": 10}}
    )
    out = export(model, tmp_path / "fm")
    (out / "grid.png").write_bytes(b"\x89PNG grid")
    (out / "loss.png").write_bytes(b"\x89PNG loss")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-10.pt").write_bytes(b"optimizer state")
    mark_output(out, "model")  # as flowmap finetune records the figures it writes
    return out


def test_push_uploads_model_files_and_card_in_one_commit(hub, model_dir):
    res = push(model_dir, "alice/tiny-dmf", private=True, commit_message="first upload")
    assert len(hub["commits"]) == 1 and hub["created"][0]["visibility"] == "private"
    assert hub["created"][0]["organization"] == "alice" and hub["created"][0]["name"] == "tiny-dmf"
    assert set(hub["auth"]) == {"Bearer hf_standin_token"}
    commit = hub["commits"][0]
    assert commit["repo"] == "alice/tiny-dmf" and commit["revision"] == "main" and commit["summary"] == "first upload"
    files = commit["files"]
    assert sorted(files) == ["README.md", "config.json", "grid.png", "loss.png", "model.safetensors"]
    assert files["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert json.loads(files["config.json"])["depth"] == 2
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: flowmap-convert\n")
    assert "flowmap sample alice/tiny-dmf --nfe 1" in card and "PATH_OR_REPO" not in card
    assert "![samples](grid.png)" in card and "![loss](loss.png)" in card and '"lr": 0.0001' in card
    assert "PATH_OR_REPO" in (model_dir / "README.md").read_text()  # the local card is not rewritten
    assert res.skipped_dirs == ["checkpoints"] and res.commit == f"{1:040x}" and res.url.endswith("/alice/tiny-dmf")


def test_push_to_a_branch_creates_it_and_keeps_a_users_own_card(hub, model_dir):
    (model_dir / "README.md").write_text("---\nlibrary_name: flowmap-convert\n---\n# my own card\n")
    push(model_dir, "alice/tiny-dmf", revision="v1")
    assert hub["branches"] == [("alice/tiny-dmf", "v1")] and "visibility" not in hub["created"][0]
    commit = hub["commits"][0]
    assert commit["revision"] == "v1" and commit["files"]["README.md"].endswith(b"# my own card\n")
    assert "model.safetensors" in commit["summary"]


@pytest.mark.e2e
def test_push_cli_prints_where_and_how_to_sample(hub, model_dir, capsys):
    from flowmap_convert.cli import main

    with pytest.raises(SystemExit) as e:
        main(["push", str(model_dir), "alice/tiny-dmf"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert "pushed 5 files" in out.out and "flowmap sample alice/tiny-dmf --nfe 1" in out.out
    assert "checkpoints" in out.err and len(hub["commits"]) == 1


def test_push_refusal_by_the_hub_is_one_line_about_the_token(hub, model_dir):
    hub["refuse"] = True
    with pytest.raises(FlowmapError, match=r"refused the upload to alice/tiny-dmf \(HTTP 401\).*hf auth login"):
        push(model_dir, "alice/tiny-dmf")
    assert hub["commits"] == []


@pytest.mark.e2e
@pytest.mark.parametrize(
    "make_dir, repo, match",
    [
        (lambda p: p, "alice/x", "is not a flowmap model"),  # an arbitrary directory
        (lambda p: p / "missing", "alice/x", "is not a directory"),
        (None, "no-owner", "not a Hub repo id"),
        (None, "alice/bad name", "not a Hub repo id"),
    ],
)
def test_push_refuses_before_any_request(hub, model_dir, tmp_path, make_dir, repo, match, capsys):
    from flowmap_convert.cli import main

    target = make_dir(tmp_path / "other") if make_dir else model_dir
    (tmp_path / "other").mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as e:
        main(["push", str(target), repo])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert hub["auth"] == []  # nothing was sent


def test_push_without_a_token_says_how_to_log_in(hub, model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(FlowmapError, match="no Hugging Face token found; log in with `hf auth login`"):
        push(model_dir, "alice/tiny-dmf")
    assert hub["auth"] == []


def test_push_uploads_only_what_flowmap_wrote(hub, model_dir, tmp_path, capsys):
    """A user's secrets.env and a link to a private key outside: refused before any request, nothing sent."""
    from flowmap_convert.cli import main

    key = tmp_path / "id_rsa"
    key.write_text("PRIVATE KEY")
    (model_dir / "secrets.env").write_text("TOKEN=1")
    (model_dir / "id_rsa").symlink_to(key)

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["push", str(model_dir), "alice/tiny-dmf", *args])
        return e.value.code, capsys.readouterr()

    code, out = run()
    assert code == 2 and "symbolic links (id_rsa)" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = run("--include", "id_rsa")  # a link is never uploaded, even when named
    assert code == 2 and "not a plain file" in out.err
    (model_dir / "id_rsa").unlink()
    code, out = run()
    assert code == 2 and "did not write or that changed since (secrets.env)" in out.err and "--include" in out.err
    assert hub["auth"] == [] and hub["commits"] == []  # nothing was sent
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + " ")  # changed since
    code, out = run("--include", "secrets.env")
    assert code == 2 and "(config.json)" in out.err and hub["commits"] == []
    mark_output(model_dir, "model", files=["config.json"], update=True)
    code, out = run("--include", "secrets.env")
    assert code == 0, out.err
    assert (
        "uploading 6 files to alice/tiny-dmf: config.json" in out.err
        and "secrets.env (7 B) (named by --include)" in out.err
    )
    assert out.err.index("uploading") < out.err.index("left out")  # the plan is shown before the upload
    assert sorted(hub["commits"][0]["files"]) == sorted(
        ["README.md", "config.json", "grid.png", "loss.png", "model.safetensors", "secrets.env"]
    )


def test_push_plan_names_a_card_the_user_edited(hub, model_dir, capsys):
    from flowmap_convert.hub import upload_plan

    assert upload_plan(model_dir).card == "flowmap"
    (model_dir / "README.md").write_text("# mine\n")
    plan = upload_plan(model_dir)
    assert plan.card == "yours" and plan.describe()[-1] == "README.md (your own card, uploaded as it is)"
    push(model_dir, "alice/tiny-dmf")
    assert hub["commits"][0]["files"]["README.md"] == b"# mine\n"


def test_push_refuses_a_directory_without_a_marker(hub, model_dir):
    (model_dir / ".flowmap-output.json").unlink()
    with pytest.raises(FlowmapError, match="no flowmap model marker"):
        push(model_dir, "alice/tiny-dmf")
    assert hub["auth"] == []
