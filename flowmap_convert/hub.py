"""`flowmap push`: upload an exported flowmap directory to the Hugging Face Hub with its model card.

One commit through huggingface_hub (create_repo, an optional branch, create_commit) of exactly the top-level files
the directory's output marker lists (flowmap_convert.outputs) whose size and sha256 still match what flowmap
wrote, plus a README.md: flowmap's card with the repo id in its sampling command, or the card the user edited
or wrote, uploaded as it is and named in the plan. A file flowmap did not write (a `secrets.env`), or one changed
since, is refused unless `include` names it; a symbolic link is never uploaded. Subdirectories (fine-tuning
checkpoints/, raw/) and hidden files stay local. The plan is shown before anything is sent. The token is
huggingface_hub's: HF_TOKEN or `hf auth login`. The endpoint is HF_ENDPOINT, read at call time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .card import model_card
from .config import ModelConfig
from .downloads import is_network_error
from .errors import FlowmapError
from .outputs import CARD_NAME, CONFIG_NAME, MARKER_NAME, changed_files, is_model_dir, read_marker

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
        raise FlowmapError(f"`revision` {revision!r} is not a branch name; pass e.g. `revision` main.")
    if commit_message is not None and not commit_message.strip():
        raise FlowmapError("`commit_message` is empty; pass a message or drop the option.")


@dataclass
class PushPlan:
    """What a push sends: the files (top-level, checked), whose card it is, what stays local."""

    files: list[Path]
    card: str  # "flowmap" (regenerated with the repo id) or "yours" (uploaded as it is)
    skipped: list[str] = field(default_factory=list)
    included: list[str] = field(default_factory=list)  # files sent only because `include` named them

    def describe(self) -> list[str]:
        """One line per file, in upload order."""
        lines = []
        for p in self.files:
            if p.name == CARD_NAME:
                continue
            why = " (named by --include)" if p.name in self.included else ""
            lines.append(f"{p.name} ({_size(p.stat().st_size)}){why}")
        lines.append(
            f"{CARD_NAME} (flowmap's card, with the repo id)"
            if self.card == "flowmap"
            else f"{CARD_NAME} (your own card, uploaded as it is)"
        )
        return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def upload_plan(directory: Path, include=()) -> PushPlan:
    """The files to upload: exactly those the marker lists, unchanged, plus the README.md and `include`.

    One FlowmapError (before any network access) for a symbolic link, a file flowmap did not write or one changed
    since it wrote it (unless `include` names it), or an `include` that is not a plain top-level file here.
    """
    directory = Path(directory)
    include = [str(n) for n in include or ()]
    marker = read_marker(directory)
    if marker is None or marker["kind"] not in ("model", "run"):
        raise FlowmapError(
            f"{directory} has no flowmap model marker ({MARKER_NAME}), so nothing in it is known to be flowmap's; "
            "push a directory written by `flowmap convert` or `flowmap finetune`, or name each file with `include`."
            if not include
            else f"{directory} has no flowmap model marker ({MARKER_NAME}); push a directory flowmap wrote."
        )
    for name in include:
        p = directory / name
        if "/" in name or name in ("", ".", "..") or p.is_symlink() or not p.is_file():
            raise FlowmapError(
                f"`include` {name!r} is not a plain file at the top of {directory}; name a file there (links are never uploaded)."
            )
    entries = sorted(directory.iterdir())
    links = [p.name for p in entries if p.is_symlink()]
    if links:
        raise FlowmapError(
            f"{directory} holds symbolic links ({', '.join(links[:3])}); push never follows a link: copy the file in "
            "if it should be uploaded, or remove the link."
        )
    files, skipped, theirs = [], [], []
    plain = [p for p in entries if p.is_file()]
    changed = set(changed_files(directory, [p.name for p in plain if not p.name.startswith(".")]))
    for p in entries:
        if p.name.startswith(".") or ".tmp" in p.name:
            if p.name != MARKER_NAME:
                skipped.append(p.name)
            continue
        if p.is_dir():
            skipped.append(p.name + "/")
        elif not p.is_file():
            skipped.append(p.name)
        elif p.name == CARD_NAME or p.name not in changed or p.name in include:
            files.append(p)
        else:
            theirs.append(p.name)
    if theirs:
        raise FlowmapError(
            f"{directory} holds files flowmap did not write or that changed since ({', '.join(theirs[:4])}"
            f"{', ...' if len(theirs) > 4 else ''}); nothing was uploaded: pass `include` NAME for each one to "
            "upload it, or move it out."
        )
    required = [n for n in (CONFIG_NAME, "model.safetensors") if n not in {p.name for p in files}]
    if required:
        raise FlowmapError(f"{directory} has no {' or '.join(required)}; push a directory flowmap wrote.")
    card = "flowmap" if (directory / CARD_NAME).is_file() and CARD_NAME not in changed else "yours"
    if not (directory / CARD_NAME).is_file():
        card = "flowmap"
    included = [p.name for p in files if p.name in changed and p.name != CARD_NAME]
    return PushPlan(files=files, card=card, skipped=skipped, included=included)


def card_for_push(directory: Path, repo_id: str, plan: PushPlan | None = None) -> str:
    """The README.md to upload: flowmap's card with the repo id in its sampling command, or the user's own card."""
    directory = Path(directory)
    plan = plan or upload_plan(directory)
    existing = directory / CARD_NAME
    if plan.card == "yours":  # a card the user edited or wrote: uploaded as it is
        return existing.read_text(encoding="utf-8", errors="replace")
    import json

    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    images = sorted(p.name for p in plan.files if p.suffix.lower() in IMAGE_SUFFIXES)
    has_grid = "grid.png" in images
    figures = [name for name in images if name != "grid.png"]
    return model_card(cfg, has_grid=has_grid, repo_id=repo_id, figures=figures)


def _hub_failure(exc: BaseException, repo_id: str, endpoint: str) -> FlowmapError:
    """A huggingface_hub / network exception as one sentence naming the fix."""
    from huggingface_hub import errors as he

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
    include=(),
    on_plan=None,
) -> PushResult:
    """Upload `directory` (a flowmap export) to the Hub model repo `repo_id` in one commit; returns what was sent.

    `include` names top-level files flowmap did not write (or that changed since) to upload too; `on_plan(lines)`
    is called with one line per file before anything is sent.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    directory = Path(directory)
    check_push_args(directory, repo_id, revision, commit_message)
    plan = upload_plan(directory, include)
    token = token or get_token()
    if not token:
        raise FlowmapError("no Hugging Face token found; log in with `hf auth login` or set HF_TOKEN, then rerun.")
    card = card_for_push(directory, repo_id, plan).encode("utf-8")
    files = plan.files
    if on_plan is not None:
        on_plan(plan.describe())
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
        skipped_dirs=[n.rstrip("/") for n in plan.skipped if n.endswith("/")],
    )
