"""Pieces shared by the CLI modules: option aliases and argument parsers (no command lives here)."""

from __future__ import annotations

from typing import Annotated

import typer

from .errors import FlowmapError


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; a clear error otherwise."""
    if text is None or text == "":
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FlowmapError(f"{what} must be a comma-separated list of integers, got {text!r}.") from None


# Options shared by every command that reads a source.
SourceArg = Annotated[
    str,
    typer.Argument(help="Hub repo id (e.g. sihyun-yu/REPA), https:// URL, local file or directory, or builtin:NAME."),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")]
FilenameOpt = Annotated[
    str | None, typer.Option("--filename", help="File inside the Hub repo (default: picked by pattern and printed).")
]
FamilyOpt = Annotated[
    str | None,
    typer.Option("--family", help="Override family detection: repa, sit, dit, dmf, rae, mf-rae, ddt, flowmap."),
]
WeightsOpt = Annotated[
    str,
    typer.Option("--weights", help="Which weights of a training checkpoint: ema, model, or auto (ema when present)."),
]
HeadsOpt = Annotated[int | None, typer.Option("--num-heads", help="Attention heads (default: from the hidden size).")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow full pickle loading of .pt files (runs code from the file: only for files you trust).",
    ),
]
Sha256Opt = Annotated[str | None, typer.Option("--sha256", help="Expected sha256 of the downloaded file.")]
