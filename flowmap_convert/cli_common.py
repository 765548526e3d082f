"""Pieces shared by the CLI modules: option aliases and argument parsers (no command lives here).

Every shared concept (model argument, --out, --device, --threads, --seed, --nfe, guidance, sampler settings) is
declared through `shared_option` / `model_argument` from `vocabulary.SHARED`, so each spelling, short alias and help
sentence exists once; tests/test_cli_grammar.py reads the click tree and fails on a second spelling.
"""

from __future__ import annotations

import difflib
from typing import Annotated

import typer

from .errors import FlowmapError
from .validate import interval
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
    return interval("--guidance-interval", *vals)


# ---------------------------------------------------------------------------------------------- --help text
# A command's docstring has prose paragraphs and example paragraphs (lines that start with a command). Prose flows:
# its single line breaks are spaces, so rich fills the width. Examples are literal blocks: never wrapped inside a
# word or an argument; a line wider than the terminal is folded between arguments with a shell continuation
# (` \`), so what is copied still runs.
EXAMPLE_PREFIXES = ("flowmap ", "torchrun ", "accelerate ", "hf ", "python ", "export ", "$ ")


def is_example(paragraph: str) -> bool:
    """Whether a help paragraph is a block of example command lines."""
    lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith(EXAMPLE_PREFIXES) for line in lines)


def fold_command(line: str, width: int, indent: str = "    ") -> list[str]:
    """One example line as lines of at most `width` columns, broken only between arguments, with ` \\` continuations.

    Quoted arguments stay whole; a trailing `# comment` is never followed by a continuation (it would swallow it), so
    such a line is kept whole. An argument longer than the width overflows rather than being cut.
    """
    import re

    if len(line) <= width or "#" in line:
        return [line]
    lead = line[: len(line) - len(line.lstrip())]
    tokens = re.findall(r"""(?:[^\s"']+|"[^"]*"|'[^']*')+""", line)
    words: list[str] = []  # an option and its value stay on one line
    for token in tokens:
        if words and words[-1].startswith("-") and " " not in words[-1] and not token.startswith("-"):
            words[-1] += " " + token
        else:
            words.append(token)
    lines, current = [], lead + words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) + 2 > width and current.strip():
            lines.append(current + " \\")
            current = lead + indent + word
        else:
            current += " " + word
    lines.append(current)
    return lines


class LiteralBlock:
    """Rich renderable: example lines, folded to the width they are rendered at, never re-wrapped by rich."""

    def __init__(self, lines: list[str], style: str = ""):
        self.lines, self.style = lines, style

    def __rich_console__(self, console, options):
        from rich.text import Text

        width = options.max_width
        folded = [piece for line in self.lines for piece in fold_command(line, width)]
        yield Text("\n".join(folded), style=self.style, no_wrap=True, overflow="ignore")

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement(1, options.max_width)


def help_renderables(help_text: str, markup_mode: str):
    """The renderables of a command's help text: the first line, flowing prose paragraphs, literal example blocks."""
    import inspect

    from rich.markup import escape
    from rich.text import Text
    from typer import rich_utils as ru

    text = inspect.cleandoc(help_text or "").partition("\f")[0]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        return
    first, rest = paragraphs[0], paragraphs[1:]
    yield ru._make_rich_text(text=" ".join(first.split()), style=ru.STYLE_HELPTEXT_FIRST_LINE, markup_mode=markup_mode)
    for paragraph in rest:
        yield Text("")
        if is_example(paragraph):
            lines = [line.rstrip() for line in paragraph.splitlines() if line.strip()]
            yield LiteralBlock(["  " + line.strip() for line in lines], style=ru.STYLE_HELPTEXT)
        else:
            flowing = " ".join(paragraph.split())
            if markup_mode != "rich":
                flowing = escape(flowing)
            yield ru._make_rich_text(text=flowing, style=ru.STYLE_HELPTEXT, markup_mode="rich")


def install_help_rendering() -> None:
    """Render every command's help through `help_renderables` (typer's own joins examples into wrapped prose)."""
    from rich.console import group
    from rich.text import Text
    from typer import rich_utils as ru

    if getattr(ru._get_help_text, "_flowmap_help", False):
        return

    @group()
    def _get_help_text(*, obj, markup_mode):
        if getattr(obj, "deprecated", False):
            yield Text(ru.DEPRECATED_STRING, style=ru.STYLE_DEPRECATED)
        yield from help_renderables(obj.help or "", markup_mode)

    _get_help_text._flowmap_help = True
    ru._get_help_text = _get_help_text
