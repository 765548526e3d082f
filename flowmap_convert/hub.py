"""`flowmap push`: upload an exported flowmap directory to the Hugging Face Hub with its model card.

One commit through huggingface_hub (create_repo, an optional branch, create_commit): the directory's top-level
files (config.json, model.safetensors, images, metrics) and a README.md whose sampling command names the repo.
Subdirectories (fine-tuning checkpoints/, raw/) stay local. The token is huggingface_hub's: HF_TOKEN or
`hf auth login`. The endpoint is HF_ENDPOINT, read at call time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlowmapError
from .outputs import CARD_NAME, CONFIG_NAME, is_model_dir

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
CARD_PLACEHOLDER = "PATH_OR_REPO"


@dataclass
class PushResult:
    """What was uploaded where."""

    repo_id: str
    url: str
    commit: str | None
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    skipped_dirs: list[str] = field(default_factory=list)


def check_push_args(directory: Path, repo_id: str, revision: str | None, commit_message: str | None) -> None:
    """Refuse a non-flowmap directory, a malformed repo id, revision or empty message before any network access."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FlowmapError(
            f"{directory} is not a directory; push a directory written by `flowmap convert` or `flowmap finetune`."
        )
    if not is_model_dir(directory):
        raise FlowmapError(
            f"{directory} is not a flowmap model (no flowmap config.json next to model.safetensors); "
            "push a directory written by `flowmap convert` or `flowmap finetune`."
        )
    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".", "-")):
        raise FlowmapError(f"{repo_id!r} is not a Hub repo id; pass OWNER/NAME (e.g. your-name/repa-dmf20).")
    if revision is not None and (not revision.strip() or revision.startswith(("-", "/")) or ".." in revision):
        raise FlowmapError(f"--revision {revision!r} is not a branch name; pass e.g. --revision main.")
    if commit_message is not None and not commit_message.strip():
        raise FlowmapError("--commit-message is empty; pass a message or drop the option.")


def upload_plan(directory: Path) -> tuple[list[Path], list[str]]:
    """(top-level files to upload, subdirectories left out); hidden and temporary files are never uploaded."""
    files, skipped = [], []
    for p in sorted(Path(directory).iterdir()):
        if p.name.startswith(".") or ".tmp" in p.name:
            continue
        if p.is_dir():
            skipped.append(p.name)
        elif p.is_file():
            files.append(p)
    return files, skipped


def card_for_push(directory: Path, repo_id: str) -> str:
    """The README.md to upload: flowmap's card with the repo id in its sampling command, or the user's own card."""
    from .card import model_card
    from .config import ModelConfig

    directory = Path(directory)
    existing = directory / CARD_NAME
    if existing.is_file():
        text = existing.read_text(encoding="utf-8", errors="replace")
        if CARD_PLACEHOLDER not in text:  # a card the user wrote: uploaded as it is
            return text
    import json

    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    images = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    has_grid = "grid.png" in images
    figures = [name for name in images if name != "grid.png"]
    return model_card(cfg, has_grid=has_grid, repo_id=repo_id, figures=figures)


def _hub_failure(exc: BaseException, repo_id: str, endpoint: str) -> FlowmapError:
    """A huggingface_hub / network exception as one sentence naming the fix."""
    from huggingface_hub import errors as he

    from .downloads import is_network_error

    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403) or isinstance(exc, he.GatedRepoError):
        return FlowmapError(
            f"the Hub refused the upload to {repo_id} (HTTP {status}); log in with `hf auth login` or set HF_TOKEN "
            "to a token with write access to that namespace."
        )
    if isinstance(exc, he.RepositoryNotFoundError):
        return FlowmapError(
            f"cannot write to {repo_id} (not found or not yours); check the owner name and your token's permissions."
        )
    if isinstance(exc, he.HfHubHTTPError):
        return FlowmapError(f"the Hub answered HTTP {status} for {repo_id} ({exc}); check the repo id and retry.")
    if is_network_error(exc) or isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return FlowmapError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}); check the network and retry.")
    return FlowmapError(f"the upload to {repo_id} failed ({type(exc).__name__}: {exc}); retry, or check the repo id.")


def push(
    directory: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload `directory` (a flowmap export) to the Hub model repo `repo_id` in one commit; returns what was sent."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    directory = Path(directory)
    check_push_args(directory, repo_id, revision, commit_message)
    token = token or get_token()
    if not token:
        raise FlowmapError("no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN, then rerun.")
    files, skipped = upload_plan(directory)
    card = card_for_push(directory, repo_id).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files if p.name != CARD_NAME]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card))
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    message = commit_message or f"Upload flowmap model ({', '.join(sorted(op.path_in_repo for op in operations))})"
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    except FlowmapError:
        raise
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one user-facing sentence
        raise _hub_failure(e, repo_id, endpoint) from None
    size = sum(p.stat().st_size for p in files if p.name != CARD_NAME) + len(card)
    return PushResult(
        repo_id=repo_id,
        url=f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision and revision != "main" else ""),
        commit=getattr(info, "oid", None),
        files=sorted(op.path_in_repo for op in operations),
        bytes=size,
        skipped_dirs=skipped,
    )
