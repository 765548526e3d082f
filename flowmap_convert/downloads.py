"""Hugging Face Hub access shared by every layer: the cache directory and offline switch (read from the environment
at call time), downloads, and Hub / network failures as one-sentence FlowmapErrors naming the fix.

`adapters/sources.py` resolves sources through it; `decoders.py` fetches latent decoders and `hub.py` reports upload
failures with it. huggingface_hub is imported inside the functions that use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import FlowmapError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")  # a full commit hash (a Hub revision that needs no ref lookup)

TRUE = ("1", "on", "yes", "true")


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE or FLOWMAP_OFFLINE is set: only cached files are used."""
    return any(os.environ.get(k, "").strip().lower() in TRUE for k in ("HF_HUB_OFFLINE", "FLOWMAP_OFFLINE"))


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_error(exc: BaseException, repo: str, revision: str | None, filename: str | None) -> FlowmapError:
    """Translate huggingface_hub / network exceptions into one actionable sentence."""
    from huggingface_hub import errors as he

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, he.GatedRepoError):
        return FlowmapError(f"{repo} is gated; accept its terms on huggingface.co and log in with `hf auth login`.")
    if isinstance(exc, he.RepositoryNotFoundError):
        return FlowmapError(
            f"Hub repo {repo} does not exist or is private; check the name or log in with `hf auth login`."
        )
    if isinstance(exc, he.RevisionNotFoundError):
        return FlowmapError(
            f"{repo} has no revision {revision!r}; pass an existing branch, tag or commit with `revision`."
        )
    if isinstance(exc, he.LocalEntryNotFoundError) or isinstance(exc, he.OfflineModeIsEnabled):
        what = f"{repo}/{filename}" if filename else repo
        if is_offline():
            return FlowmapError(
                f"{what}{rev} is not in the local Hub cache ({hub_cache_dir()}) and offline mode is on; unset HF_HUB_OFFLINE and run once with network access."
            )
        return FlowmapError(
            f"cannot download {what}{rev} (no connection to the Hub and no cached copy); check the network or set HF_HUB_CACHE to a cache that has it."
        )
    if isinstance(exc, he.EntryNotFoundError):
        return FlowmapError(f"{repo}{rev} has no file {filename!r}; pass an existing `filename`.")
    if isinstance(exc, he.HFValidationError):
        return FlowmapError(f"{repo!r} is not a valid Hub repo id or revision ({exc}); check the spelling.")
    if is_network_error(exc) or isinstance(exc, (he.HfHubHTTPError, ConnectionError, TimeoutError, OSError)):
        return FlowmapError(
            f"cannot reach the Hugging Face Hub for {repo} ({type(exc).__name__}); check the network, or use HF_HUB_OFFLINE=1 with a cached copy."
        )
    return FlowmapError(
        f"Hub access to {repo} failed ({type(exc).__name__}: {exc}); check the repo id, revision and network."
    )


def is_network_error(exc: BaseException) -> bool:
    """Connection-level failures from whichever HTTP client huggingface_hub uses (httpx, requests, urllib3)."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "httpcore") and cls.__name__ in (
            "TransportError",
            "NetworkError",
            "TimeoutException",
            "ConnectError",
            "ConnectionError",
            "Timeout",
            "ProtocolError",
            "RequestError",
        ):
            return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def he_errors():
    """huggingface_hub.errors, imported lazily."""
    from huggingface_hub import errors

    return errors


def hub_download(repo: str, filename: str, revision: str | None) -> Path:
    """hf_hub_download with the cache and offline mode read from the environment now."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(repo, filename, revision=revision, cache_dir=hub_cache_dir(), local_files_only=is_offline())
        )
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes a user error
        raise hub_error(e, repo, revision, filename) from None


def hub_snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of the files matching `patterns` (a directory layout claimed by a family)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=hub_cache_dir(),
                local_files_only=is_offline(),
                allow_patterns=patterns,
            )
        )
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, repo, revision, None) from None


def cached_snapshot(repo: str, revision: str | None) -> tuple[str, Path] | None:
    """(commit, snapshot dir) of a repo revision in the local Hub cache, or None."""
    root = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    rev = revision or "main"
    if COMMIT_RE.match(rev):
        commit = rev
    else:
        ref = root / "refs" / rev
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snap = root / "snapshots" / commit
    return (commit, snap) if snap.is_dir() else None


def hub_files(repo: str, revision: str | None) -> tuple[list[str], str | None]:
    """Files of a Hub repo revision and its commit: from the Hub when online, else from the cached snapshot."""
    if not is_offline():
        from huggingface_hub import HfApi

        try:
            info = HfApi().model_info(repo, revision=revision)
            return [s.rfilename for s in (info.siblings or [])], info.sha
        except Exception as e:  # noqa: BLE001 - translated below, or fall back to the cache when unreachable
            if not is_network_error(e) and not isinstance(e, OSError) or isinstance(e, he_errors().HfHubHTTPError):
                raise hub_error(e, repo, revision, None) from None
    snap = cached_snapshot(repo, revision)
    if snap is None:
        rev = f" at revision {revision!r}" if revision else ""
        if is_offline():
            raise FlowmapError(
                f"{repo}{rev} is not in the local Hub cache ({hub_cache_dir()}) and offline mode is on; unset HF_HUB_OFFLINE and run once with network access."
            )
        raise FlowmapError(f"cannot list {repo}{rev}: the Hub is unreachable and nothing is cached; check the network.")
    commit, path = snap
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return files, commit
