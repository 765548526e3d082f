"""Resolve a source string to a file or directory on disk, with provenance.

Accepted sources, tried in this order:
  builtin:NAME                    a model shipped inside the package
  https://...                     downloaded once into $FLOWMAP_CACHE/url (default ~/.cache/flowmap/url), sha256 checked
  a local file or directory       used in place
  an alias (adapters/aliases.json) e.g. sihyun-yu/REPA -> the REPA SiT-XL/2 file in kyungmnlee/DMF
  owner/name[/path/in/repo]       a Hugging Face Hub repo (with --revision / --filename), through huggingface_hub's cache

Hub and URL failures become one-sentence FlowmapErrors naming the fix. `HF_HUB_OFFLINE=1` (or `FLOWMAP_OFFLINE=1`)
reads only what is cached.

URL downloads are bounded: at most the Content-Length the server announces, and never more than
$FLOWMAP_MAX_DOWNLOAD_GB gigabytes (default 64; the largest released checkpoints are under 10 GB). A body shorter
than its Content-Length, or whose sha256 differs from --sha256 / the alias table, is deleted and never cached;
redirects may not leave https. The body goes to `.NAME.<pid>.<random>.part` in the cache, removed on any error,
Ctrl-C or SIGTERM; a `.part` left by a killed process (dead pid) is removed by the next download of that file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .. import adapters  # the package: its registry (DETECTION_ORDER, FAMILIES) at call time
from ..downloads import (
    COMMIT_RE,
    TRUE,
    hub_download,
    hub_files,
    hub_snapshot,
    is_offline,
)
from ..errors import FlowmapError
from ..io import sha256_file
from ..outputs import clean_stale, write_text_atomic
from ..validate import finite_float
from . import builtin_path, note
from .checkpoint import WEIGHT_SUFFIXES

ALIASES_FILE = Path(__file__).with_name("aliases.json")
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")
DEFAULT_MAX_DOWNLOAD_GB = 64.0


@dataclass
class Resolved:
    """A source found on disk: `path` is a file or a directory; `info` is its provenance."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)  # source, revision (commit when known), file, sha256
    family_hint: str | None = None  # from the alias table
    name: str = ""  # file name, used as a family hint (e.g. SiT-XL-2-256x256.pt)


def url_cache_dir() -> Path:
    """Where URL downloads are kept: $FLOWMAP_CACHE/url or ~/.cache/flowmap/url."""
    root = os.environ.get("FLOWMAP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowmap")
    return Path(root) / "url"


def load_aliases() -> dict[str, dict[str, Any]]:
    """The alias table, keyed by lower-case name."""
    data = json.loads(ALIASES_FILE.read_text())
    return {k.lower(): v for k, v in data.items() if not k.startswith("_")}


def check_sha256(path: Path, expected: str | None, digest: str | None = None) -> str:
    """Hash `path` and compare with `expected` (if given); returns the hex digest."""
    digest = digest or sha256_file(path)
    if expected and digest.lower() != expected.strip().lower():
        raise FlowmapError(
            f"{path.name} has sha256 {digest}, not the expected {expected}; the file is not the one asked for (re-download it or fix `sha256`)."
        )
    return digest


# --------------------------------------------------------------------------------------------- entry point
def resolve(
    source: str,
    revision: str | None = None,
    filename: str | None = None,
    sha256: str | None = None,
    allow_http: bool | None = None,
) -> Resolved:
    """Find `source` on disk (downloading or reading caches as needed) and describe where it came from."""
    source = str(source).strip()
    if not source:
        raise FlowmapError("no source given; pass a Hub repo id, an https:// URL, a local path or builtin:NAME.")
    if source.startswith("builtin:"):
        _no_hub_options(source, revision, filename)
        return Resolved(builtin_path(source.split(":", 1)[1]), {"source": source}, name=source)
    if re.match(r"^[a-z][a-z0-9+.-]*://", source, re.I):
        _no_hub_options(source, revision, filename)
        path = fetch_url(source, sha256=sha256, allow_http=allow_http)
        return Resolved(
            path, {"source": source, "file": path.name, "sha256": _recorded_sha(path)}, name=_url_name(source)
        )
    local = Path(os.path.expanduser(source))
    if local.exists():
        _no_hub_options(source, revision, filename)
        info: dict[str, Any] = {"source": source}
        if local.is_file():
            info["file"] = local.name
            info["sha256"] = check_sha256(local, sha256)
        return Resolved(local, info, name=local.name)
    aliases = load_aliases()
    if source.lower() in aliases:
        return resolve_alias(source, aliases[source.lower()], revision, filename, sha256)
    if _looks_local(source):
        raise FlowmapError(f"no such file or directory: {source}; check the path.")
    if REPO_RE.match(source):
        parts = source.split("/")
        repo, inner = "/".join(parts[:2]), "/".join(parts[2:]) or None
        if inner and filename and inner != filename:
            raise FlowmapError(
                f"the source names the file {inner!r} and `filename` names {filename!r}; give the file once."
            )
        return resolve_hub(repo, revision, inner or filename, sha256, source=source)
    raise FlowmapError(
        f"cannot understand the source {source!r}; pass a Hub repo id (owner/name), an https:// URL, a local path or builtin:NAME."
    )


def _no_hub_options(source: str, revision: str | None, filename: str | None) -> None:
    """--revision / --filename only make sense for Hub repos."""
    if revision or filename:
        raise FlowmapError(f"`revision` and `filename` apply to Hub repos, but {source!r} is not one; drop them.")


def _looks_local(source: str) -> bool:
    """Paths users clearly meant as files: absolute, ./ ../ ~, or a bare name with a checkpoint suffix."""
    if source.startswith(("/", "./", "../", "~", ".\\")) or (len(source) > 1 and source[1] == ":"):
        return True
    return source.lower().endswith(WEIGHT_SUFFIXES) and source.count("/") < 2


# --------------------------------------------------------------------------------------------- aliases
def resolve_alias(source: str, entry: dict[str, Any], revision, filename, sha256) -> Resolved:
    """Follow an alias: its Hub copy first (picked by name or pattern), then its URL."""
    family = entry.get("family")
    if entry.get("manual"):
        raise FlowmapError(f"{source}: {entry['manual']}.")
    hub = entry.get("hub")
    hub_error: FlowmapError | None = None
    if hub:
        try:
            repo = hub["repo"]
            name = filename or hub.get("filename")
            if name is None:
                files, commit = hub_files(repo, revision)
                pattern = re.compile(hub["pattern"])
                matches = sorted(f for f in files if pattern.search(f))
                if not matches:
                    raise FlowmapError(
                        f"no file in {repo} matches the {source} pattern; pass `filename` (files: {', '.join(sorted(files)[:6])})."
                    )
                name = matches[0]
                extra = f" (also matched: {', '.join(matches[1:])})" if len(matches) > 1 else ""
                note(f"{source} -> {repo}/{name}{extra}")
                revision = commit or revision
            res = resolve_hub(repo, revision, name, sha256, source=source)
            res.family_hint = family
            return res
        except FlowmapError as e:
            if not entry.get("url") or filename or revision:
                raise
            hub_error = e
    if entry.get("url"):
        url = entry["url"]
        if hub_error is not None:
            note(f"{source}: {_hub_failure(hub_error, hub['repo'])}; trying its download from {urlparse(url).netloc}")
        try:
            path = fetch_url(url, sha256=sha256 or entry.get("sha256"), name=entry.get("url_filename"))
        except FlowmapError as url_error:
            raise _alias_unavailable(source, entry, hub_error, url_error) from None
        info = {"source": source, "url": url, "file": path.name, "sha256": _recorded_sha(path)}
        return Resolved(path, info, family_hint=family, name=entry.get("url_filename") or path.name)
    raise FlowmapError(f"the alias {source} has no location; pass a file path or a Hub repo id instead.")


def _unreachable(error: FlowmapError) -> bool:
    """A failure to reach a server (no network), as opposed to the file being absent there."""
    text = str(error).lower()
    return any(w in text for w in ("unreachable", "cannot reach", "no connection", "cannot download", "cannot list"))


def _hub_failure(error: FlowmapError, repo: str) -> str:
    """Why an alias's Hub copy could not be read, as a clause: offline, unreachable, or not found (and why).

    It names only what the user typed (the alias), never the repository that hosts the copy.
    """
    if is_offline():
        return "its Hub copy is not in the local Hub cache"
    if _unreachable(error):
        return "the Hugging Face Hub is unreachable"
    return (
        f"its Hub copy was not found ({str(error).rstrip('.').replace(f'Hub repo {repo}', 'it').replace(repo, 'it')})"
    )


def _alias_unavailable(
    source: str, entry: dict[str, Any], hub_error: FlowmapError | None, url_error: FlowmapError
) -> FlowmapError:
    """One sentence for an alias whose Hub copy and download both failed: why each failed, and the manual fallback."""
    url = entry["url"]
    host = urlparse(url).netloc
    name = entry.get("url_filename") or _url_name(url)
    family = entry.get("family")
    if is_offline():
        why_url = (
            f"its download from {host} is not cached either, and offline mode is on (HF_HUB_OFFLINE/FLOWMAP_OFFLINE)"
        )
    elif _unreachable(url_error):
        why_url = f"{host} is unreachable too ({str(url_error).split('(', 1)[-1].split(')')[0]})"
    else:
        why_url = f"the download from {host} failed ({str(url_error).split(';')[0].rstrip('.')})"
    why = f"{_hub_failure(hub_error, entry['hub']['repo'])} and {why_url}" if hub_error else why_url
    fallback = f"flowmap convert ./{name} --family {family}" if family else f"flowmap convert ./{name}"
    error = FlowmapError(
        f"cannot fetch {source}: {why}; download {url} by hand, save it as {name}, and run `{fallback}`."
    )
    # what the CLI needs to rewrite the suggestion as the user's own command line (all their options kept)
    error.manual_fallback = {"command": fallback, "source": source, "file": f"./{name}", "family": family}
    return error


# --------------------------------------------------------------------------------------------- Hub
def _commit_of(path: Path) -> str | None:
    """The commit hash in a huggingface_hub cache path (…/snapshots/<commit>/…)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts) and COMMIT_RE.match(parts[i + 1]):
            return parts[i + 1]
    return None


def resolve_hub(repo: str, revision: str | None, filename: str | None, sha256: str | None, source: str) -> Resolved:
    """A Hub file (named, or the single weights file / claimed layout of the repo)."""
    if filename is None:
        files, commit = hub_files(repo, revision)
        patterns = _layout_patterns(files)
        if patterns is not None:  # an exported flowmap dir or a layout a family claims (e.g. diffusers transformer/)
            path = hub_snapshot(repo, commit or revision, patterns)
            info = {"source": source, "revision": _commit_of(path) or commit or revision, "file": ",".join(patterns)}
            return Resolved(path, info, name=repo.split("/")[-1])
        weights = [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)]
        if len(weights) != 1:
            listed = ", ".join(weights[:6]) or "none"
            raise FlowmapError(f"{repo} holds {len(weights)} weight files ({listed}); pick one with `filename`.")
        filename = weights[0]
        note(f"{repo}: using its only weights file {filename}")
        revision = commit or revision
    path = hub_download(repo, filename, revision)
    info = {
        "source": source,
        "repo": repo,
        "revision": _commit_of(path) or revision,
        "file": filename,
        "sha256": check_sha256(path, sha256),
    }
    if revision and not COMMIT_RE.match(revision):
        info["ref"] = revision
    return Resolved(path, info, name=Path(filename).name)


def _layout_patterns(files: list[str]) -> list[str] | None:
    """Download patterns for a directory-shaped repo: a flowmap export, or a layout a family claims."""
    if "config.json" in files and "model.safetensors" in files:
        return ["config.json", "model.safetensors", "README.md"]
    for name in adapters.DETECTION_ORDER:  # read at call time: the registry is the package's (tests extend it)
        patterns = adapters.FAMILIES[name].claims_layout(files) if name in adapters.FAMILIES else None
        if patterns:
            return list(patterns)
    return None


# --------------------------------------------------------------------------------------------- URLs
def _url_name(url: str) -> str:
    """A safe file name for a URL (its last path segment)."""
    base = os.path.basename(urlparse(url).path) or "download"
    return re.sub(r"[^\w.-]", "_", base)[:80]


def _recorded_sha(path: Path) -> str:
    """The sha256 recorded next to a cached download (computed if missing)."""
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        return side.read_text().split()[0]
    return sha256_file(path)


def _http_allowed(allow_http: bool | None) -> bool:
    """Plain http is for tests against a loopback server only (parameter or FLOWMAP_ALLOW_HTTP=1)."""
    if allow_http is not None:
        return allow_http
    return os.environ.get("FLOWMAP_ALLOW_HTTP", "").strip().lower() in TRUE


def max_download_bytes() -> int:
    """The download size cap: $FLOWMAP_MAX_DOWNLOAD_GB gigabytes (decimal), default DEFAULT_MAX_DOWNLOAD_GB."""
    text = os.environ.get("FLOWMAP_MAX_DOWNLOAD_GB", "").strip()
    gb = finite_float("FLOWMAP_MAX_DOWNLOAD_GB", text, 0, 1e9, lo_open=True) if text else DEFAULT_MAX_DOWNLOAD_GB
    return max(1, int(gb * 1e9))


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to the same or a stronger scheme (https -> http is refused), at most 10."""

    max_redirections = 10

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlparse(req.full_url).scheme, urlparse(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise FlowmapError(f"{req.full_url} redirects to {new}:// ({newurl[:80]}); refusing to leave https.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _TermAsInterrupt:
    """While downloading in the main thread, SIGTERM raises KeyboardInterrupt so the `.part` file is removed."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.signal(signal.SIGTERM, self._raise)
            except (ValueError, OSError):
                self.old = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def fetch_url(url: str, sha256: str | None = None, name: str | None = None, allow_http: bool | None = None) -> Path:
    """Download `url` once into the URL cache (bounded, atomically, sha256 recorded and checked); returns the file."""
    import http.client
    import urllib.error

    parsed = urlparse(url)
    if parsed.scheme == "http":
        if not (_http_allowed(allow_http) and parsed.hostname in ("127.0.0.1", "localhost", "::1")):
            raise FlowmapError(f"refusing plain-http download {url}; use an https:// URL.")
    elif parsed.scheme != "https":
        raise FlowmapError(f"unsupported URL scheme {parsed.scheme!r} in {url}; use an https:// URL or a local path.")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
        raise FlowmapError(f"`sha256` {sha256!r} is not 64 hexadecimal digits; pass the file's sha256.")
    cap = max_download_bytes()
    cache = url_cache_dir()
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name or _url_name(url)}"
    side = target.with_name(target.name + ".sha256")
    if target.is_file():
        recorded = side.read_text().split()[0] if side.is_file() else sha256_file(target)
        if not sha256 or recorded.lower() == sha256.strip().lower():
            return target
        note(f"cached {target.name} does not match --sha256; downloading again")
    if is_offline():
        raise FlowmapError(
            f"{url} is not in the download cache ({cache}) and offline mode is on; unset HF_HUB_OFFLINE/FLOWMAP_OFFLINE or pass a local file."
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        clean_stale(cache, target.name, by_name=True)  # the cache is flowmap's own: leftovers known by name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".part", dir=cache)
    except OSError as e:
        raise FlowmapError(
            f"cannot write to the download cache {cache} ({e.strerror}); set FLOWMAP_CACHE to a writable directory."
        ) from None
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    got = 0
    try:
        with _TermAsInterrupt(), os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "flowmap-convert"})
            opener = urllib.request.build_opener(_NoDowngrade())
            with opener.open(req, timeout=60) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.strip().isdigit() else None
                if total is not None and total > cap:
                    raise FlowmapError(
                        f"{url} is {total / 1e9:.3g} GB, over the download limit of {cap / 1e9:.3g} GB; raise FLOWMAP_MAX_DOWNLOAD_GB if you meant it."
                    )
                limit = total if total is not None else cap
                with _progress(target.name, total or 0) as advance:
                    while block := resp.read(min(1 << 20, limit - got + 1)):
                        got += len(block)
                        if got > limit:
                            raise FlowmapError(
                                f"{url} sent more than {limit / 1e9:.3g} GB (the download limit); raise FLOWMAP_MAX_DOWNLOAD_GB if you meant it."
                            )
                        out.write(block)
                        h.update(block)
                        advance(len(block))
                if total is not None and got != total:
                    raise FlowmapError(
                        f"the download of {url} stopped after {got} of {total} bytes; it was deleted, try again."
                    )
        digest = h.hexdigest()
        if sha256 and digest != sha256.strip().lower():
            raise FlowmapError(
                f"the download of {url} has sha256 {digest}, not the expected {sha256}; it was deleted (check `sha256` or the URL)."
            )
        os.replace(tmp, target)
        write_text_atomic(side, f"{digest}  {url}\n")
        note(f"downloaded {url} -> {target} (sha256 {digest})")
        return target
    except urllib.error.HTTPError as e:
        raise FlowmapError(f"the server answered {e.code} for {url}; check the URL.") from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, FlowmapError):
            raise reason from None
        raise FlowmapError(
            f"cannot download {url} ({reason}); check the network, or download the file yourself and pass its path."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


class _progress:
    """A rich download bar on a terminal, silent otherwise; yields an `advance(n)` callable."""

    def __init__(self, label: str, total: int):
        """Label and expected byte count (0 when the server does not say)."""
        self.label, self.total, self.bar = label, total, None

    def __enter__(self):
        """Start the bar (on a terminal) and return the advance callable."""
        if sys.stderr.isatty():
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
            )
            self.bar.start()
            task = self.bar.add_task(self.label, total=self.total or None)
            return lambda n: self.bar.advance(task, n)
        return lambda n: None

    def __exit__(self, *exc):
        """Stop the bar; never swallows exceptions."""
        if self.bar is not None:
            self.bar.stop()
        return False
