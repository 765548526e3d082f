"""`flowmap push DIR REPO_ID`: upload an exported flow map and its model card to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_common import describe_model, shared_option
from .hub import push


def push_cmd(
    directory: Annotated[Path, typer.Argument(help="A directory written by `flowmap convert` or `flowmap finetune`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo OWNER/NAME (created when missing).")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo as private (an existing repo keeps its visibility).")
    ] = False,
    revision: Annotated[
        str | None,
        shared_option("revision", "Here: the branch to commit to (created from main when missing; default main)."),
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", "-m", help="Commit message (default: lists the uploaded files).")
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Also upload this top-level file, which flowmap did not write or which changed since (repeatable).",
        ),
    ] = None,
):
    """Upload a flowmap model directory to the Hugging Face Hub, with a model card.

    The token comes from HF_TOKEN or `hf auth login`. Exactly the top-level files flowmap wrote, unchanged
    (config.json, model.safetensors, grid.png...), are uploaded in one commit, with the model card (or your own
    README.md, as it is); the list is shown first. Any other file is refused unless --include names it; symbolic
    links are never uploaded; subdirectories such as checkpoints/ stay local.

    Examples:

      flowmap push repa-dmf20 your-name/repa-sit-xl-dmf20

      flowmap push digits-ft your-name/digits-dmf --private --revision v1 -m "digits, 2k steps"
    """
    from rich.console import Console

    # lazy: adapters pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .adapters import note

    def show(lines):
        note(f"uploading {len(lines)} files to {repo_id}: " + "; ".join(lines))

    result = push(
        directory,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        include=include or (),
        on_plan=show,
    )
    if result.skipped_dirs:
        note(f"left out subdirectories: {', '.join(result.skipped_dirs)} (push uploads the model's top-level files)")
    Console().print(
        f"pushed {len(result.files)} files ({result.bytes / 2**20:.1f} MiB) of "
        f"{describe_model(str(directory), sha256=_recorded_sha256(directory))} to {result.url}"
        + (f" (commit {result.commit[:12]})" if result.commit else "")
        + f"\nsample it with: flowmap sample {repo_id} --nfe 1",
        highlight=False,
        soft_wrap=True,
    )


def _recorded_sha256(directory: Path) -> str | None:
    """The sha256 a flowmap model directory's config.json records for its source, if any."""
    import json

    try:
        prov = json.loads((directory / "config.json").read_text()).get("provenance") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return prov.get("sha256") if isinstance(prov, dict) else None
