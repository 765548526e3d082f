"""Pieces shared by the CLI modules: option aliases and argument parsers (no command lives here).

Every shared concept (model argument, --out, --device, --threads, --seed, --nfe, guidance, sampler settings) is
declared through `shared_option` / `ModelArg` from `vocabulary.SHARED`, so each spelling, short alias and help
sentence exists once; tests/test_cli_grammar.py reads the click tree and fails on a second spelling.
"""

from __future__ import annotations

import difflib
from typing import Annotated

import typer

from .errors import FlowmapError
from .vocabulary import SHARED, for_cli


def shared_option(concept: str, extra: str = "", **kwargs):
    """A typer option for one shared concept: its flag, short alias, metavar and help sentence from SHARED.

    `extra` is a command-specific sentence appended after the shared one (what the output directory holds, say).
    """
    c = SHARED[concept]
    names = [c.flag] + ([c.short] if c.short else [])
    if c.metavar is not None:
        kwargs.setdefault("metavar", c.metavar)
    return typer.Option(*names, help=c.help + (f" {extra}" if extra else ""), **kwargs)


def model_argument(extra: str = "", **kwargs):
    """The positional MODEL argument, with the shared help."""
    help_text = SHARED["model"].help + (f" {extra}" if extra else "")
    return typer.Argument(help=help_text, metavar=SHARED["model"].flag, **kwargs)


def user_message(message: str) -> str:
    """A message as the CLI prints it through rich: backticked parameters become flags, then markup is escaped.

    Every user-facing line the CLI prints goes through here, so `[rae]`, `photos[cats]` or `ckpt[ema].pt` reach the
    terminal verbatim instead of being read as rich markup.
    """
    from rich.markup import escape

    return escape(for_cli(str(message)))


def describe_model(name: str, model=None, sha256: str | None = None) -> str:
    """How a result line names a model: what the user typed plus a sha256 prefix, e.g. `repa-dmf20 (sha256 3fa2c1d0e4b5)`.

    The hash is `sha256` when given, else the one the model's provenance records (its source file's), else none.
    """
    digest = sha256
    if digest is None and model is not None:
        prov = getattr(getattr(model, "config", None), "provenance", None) or {}
        digest = prov.get("sha256")
    return f"{name} (sha256 {digest[:12]})" if isinstance(digest, str) and len(digest) >= 12 else str(name)


# Known synonyms of flags (what users of other tools type) -> the flag flowmap uses.
FLAG_SYNONYMS: dict[str, str] = {
    "--steps": "--nfe",
    "--num-steps": "--nfe",
    "--sampling-steps": "--nfe",
    "--num-inference-steps": "--nfe",
    "--output": "--out",
    "--output-dir": "--out",
    "--outdir": "--out",
    "--out-dir": "--out",
    "--cfg": "--cfg-scale",
    "--guidance-scale": "--cfg-scale",
    "--n": "--num-samples",
    "--num-images": "--num-samples",
    "--samples": "--num-samples",
    "--bs": "--batch-size",
    "--batch": "--batch-size",
    "--gpu": "--device",
    "--cuda": "--device",
    "--workers": "--threads",
    "--num-threads": "--threads",
    "--guidance-low": "--guidance-interval",
    "--guidance-high": "--guidance-interval",
    "--model": "MODEL (the positional argument)",
    "--source": "MODEL (the positional argument)",
}


def suggest_options(typed: str, options: list[str], n: int = 2) -> list[str]:
    """The closest option names to an unknown one: its known synonym if any, else difflib's closest spellings."""
    synonym = FLAG_SYNONYMS.get(typed.split("=", 1)[0].lower())
    if synonym is not None and (synonym in options or not synonym.startswith("--")):
        return [synonym]
    longs = [o for o in options if o.startswith("--") and o != "--help"]
    return difflib.get_close_matches(typed, longs, n=n, cutoff=0.7)


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; a clear error otherwise."""
    if text is None or text == "":
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise FlowmapError(f"{what} must be a comma-separated list of integers, got {text!r}.") from None


# Options shared by every command that reads a source.
SourceArg = Annotated[str, model_argument()]
RevisionOpt = Annotated[str | None, shared_option("revision")]
FilenameOpt = Annotated[
    str | None, typer.Option("--filename", help="File inside the Hub repo (default: picked by pattern and printed).")
]
FamilyOpt = Annotated[str | None, shared_option("family")]
DeviceOpt = Annotated[str | None, shared_option("device")]
ThreadsOpt = Annotated[int | None, shared_option("threads")]
SeedOpt = Annotated[int, shared_option("seed")]
SamplerOpt = Annotated[str, shared_option("sampler")]
ShiftOpt = Annotated[float | None, shared_option("shift")]
CfgScaleOpt = Annotated[float | None, shared_option("cfg_scale")]
ClassesOpt = Annotated[str | None, shared_option("classes")]
GuidanceOpt = Annotated[str, shared_option("guidance_interval")]
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


def parse_guidance_interval(text: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (lo, hi) for --guidance-interval (ranges are checked by the settings that receive it)."""
    if text is None or text == "":
        return None
    try:
        vals = tuple(float(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        vals = ()
    if len(vals) != 2:
        raise FlowmapError(f"--guidance-interval takes LO,HI (two comma-separated numbers, e.g. 0,0.7), got {text!r}.")
    return vals
