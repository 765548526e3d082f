"""`flowmap` command line: a thin typer layer over the public API (parse, call, print)."""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ._version import __version__
from .card import describe_family
from .cli_common import (
    FamilyOpt,
    FilenameOpt,
    HeadsOpt,
    RevisionOpt,
    Sha256Opt,
    SourceArg,
    TrustOpt,
    WeightsOpt,
    describe_model,
    install_help_rendering,
    shared_option,
    suggest_options,
    user_message,
)
from .config import MAX_BLOCKS
from .errors import FlowmapError
from .options import from_cli, with_options
from .outputs import check_output
from .sample_options import SampleRun, SampleSettings
from .validate import int_in_range
from .vocabulary import default_out

app = typer.Typer(
    name="flowmap",
    help="Convert pretrained flow-matching / diffusion transformers into few-step flow maps, fine-tune and sample them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=False)
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    """--version: print the package version and exit."""
    if value:
        console.print(f"flowmap-convert {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


# The command line as the user typed it (set by main); messages that suggest a command rebuild it from these words.
_TYPED: list[str] | None = None


def keep_typed(error: FlowmapError) -> str:
    """An error's message, with a suggested fallback command rewritten as the user's own command line.

    The library suggests `flowmap convert ./FILE --family F` for a source it could not fetch; the user typed more
    (`--depth 20`, `--out`, another command), so the source word is replaced by the file and every other word kept.
    """
    import shlex

    message = str(error)
    fallback = getattr(error, "manual_fallback", None)
    if not fallback or not _TYPED or fallback["source"] not in _TYPED:
        return message
    words = [fallback["file"] if w == fallback["source"] else w for w in _TYPED]
    if fallback.get("family") and not any(w == "--family" or w.startswith("--family=") for w in words):
        words += ["--family", fallback["family"]]
    return message.replace(fallback["command"], "flowmap " + shlex.join(words))


def fail(message: str) -> None:
    """Print one clear line on stderr and exit with code 2 (user error); the message is shown verbatim (escaped)."""
    err_console.print(f"[bold red]error:[/] {user_message(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def guarded(fn):
    """Run a command body, turning user errors into a one-line message and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowmapError as e:
            fail(keep_typed(e))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
                raise
            fail(f"cannot write ({e.strerror}); free some disk space or write to another location.")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def check_out_dir(
    out: Path, kind: str = "model", *, force: bool = False, force_flag: str | None = None, sources=()
) -> Path:
    """Fail now, before a long download or conversion, if --out may not be written (rules: flowmap_convert.outputs)."""
    return check_output(out, kind, force=force, sources=sources, force_flag=force_flag)


def source_options(revision, filename, family, weights, num_heads, trust_pickle, sha256) -> dict:
    """Collect the shared source options into load_source keyword arguments."""
    return dict(
        revision=revision,
        filename=filename,
        family=family,
        weights=weights,
        num_heads=num_heads,
        trust_pickle=trust_pickle,
        sha256=sha256,
    )


DEFAULT_OUT = Path(default_out("convert"))  # the one naming rule: flowmap-<command>


@app.command()
@guarded
def convert(
    source: SourceArg = "builtin:digits-sit",
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth",
            "-d",
            help="Encoder/decoder split: blocks [0, depth) see t, the rest and the head see r (default: 2/3 of the blocks; for RAE DiT^DH all encoder blocks, so the DDT head sees r).",
        ),
    ] = None,
    out: Annotated[Path, shared_option("out", "Holds config.json, model.safetensors, README.md.")] = DEFAULT_OUT,
    revision: RevisionOpt = None,
    filename: FilenameOpt = None,
    family: FamilyOpt = None,
    weights: WeightsOpt = "auto",
    num_heads: HeadsOpt = None,
    trust_pickle: TrustOpt = False,
    sha256: Sha256Opt = None,
    encoder_depth: Annotated[
        int | None,
        typer.Option(
            "--encoder-depth",
            help="Blocks before the decoder: REPA legacy checkpoints (before `decoder_blocks.0`; default: from the training args) and DDT (its condition encoder; default: 22 of 28, as released).",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace --out even if it is not a flowmap model output (never the source)."),
    ] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Convert even if some weights are NaN or infinite.")
    ] = False,
):
    """Convert a pretrained flow model into a decoupled flow map and export it.

    Examples:

      flowmap convert sihyun-yu/REPA --depth 20 --out repa-dmf20

      flowmap convert builtin:digits-sit --depth 4 --out digits-d4

      flowmap convert ./checkpoints/0400000.pt --weights ema --depth 18

      flowmap convert willisma/SiT --family sit --depth 20 --out sit-dmf20

      flowmap convert https://example.org/model.safetensors --sha256 <hex> --depth 8
    """
    # lazy: these pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .api import convert as convert_fn
    from .io import export

    # every number and the output first: a bad value costs nothing and leaves nothing behind
    if depth is not None:
        int_in_range("--depth", depth, 1, MAX_BLOCKS)
    if num_heads is not None:
        int_in_range("--num-heads", num_heads, 1, 4096)
    if encoder_depth is not None:
        int_in_range("--encoder-depth", encoder_depth, 1, MAX_BLOCKS)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
        raise FlowmapError(f"--sha256 {sha256!r} is not 64 hexadecimal digits; pass the file's sha256.")
    if (weights or "auto").lower() not in ("auto", "ema", "model"):
        raise FlowmapError(f"--weights {weights!r} is not one of auto, ema, model; pass one of them.")
    check_out_dir(out, "model", force=force, force_flag="--force", sources=(source,))
    opts = source_options(revision, filename, family, weights, num_heads, trust_pickle, sha256)
    opts["allow_nonfinite"] = allow_nonfinite
    if encoder_depth is not None:
        opts["encoder_depth"] = encoder_depth
    model = convert_fn(source, depth=depth, mapped=True, **opts)  # exported and dropped: no copy of the weights
    export(model, out, force=force, sources=(source,))
    cfg, prov = model.config, model.config.provenance
    lines = [
        f"family      {describe_family(prov)}",
        f"parameters  {model.num_parameters():,}",
        f"depth       {cfg.depth} of {cfg.num_blocks}: blocks 0..{cfg.depth - 1} see t, blocks {cfg.depth}..{cfg.num_blocks - 1} + head see r"
        if cfg.depth
        else f"conditioning {cfg.conditioning}",
        f"weights     {prov.get('weights', '-')}",
        f"source      {prov.get('source', source)}" + (f" @ {prov['revision']}" if prov.get("revision") else ""),
        f"file        {prov['file']}" if prov.get("file") else None,
        f"sha256      {prov.get('sha256', '-')}",
        f"written     {out} (from {describe_model(source, model)})",
    ]
    console.print("\n".join(line for line in lines if line), highlight=False, soft_wrap=True)


DEFAULT_SAMPLE_MODEL = "builtin:digits-dmf"


def default_sample_model():
    """(model, name) for `flowmap sample` without a model: the fine-tuned 1-step builtin:digits-dmf when shipped,
    else builtin:digits-sit converted at its default depth."""
    # lazy: these pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .api import convert, load
    from .digits import BUILTIN_DIR

    if (BUILTIN_DIR / "digits-dmf" / "config.json").is_file():
        return load(DEFAULT_SAMPLE_MODEL), DEFAULT_SAMPLE_MODEL
    model = convert("builtin:digits-sit")
    return model, f"builtin:digits-sit (converted at depth {model.config.depth})"


def velocity_warning(model, nfe: int) -> str | None:
    """A one-line hint when a base velocity model is asked for a few steps (it needs conversion + fine-tuning)."""
    if model.config.conditioning == "velocity" and nfe <= 4:
        return (
            f"this is a base velocity model: {nfe}-step Euler samples will be blurry; convert it "
            "(`flowmap convert`) and fine-tune it (`flowmap finetune`) for few-step sampling."
        )
    return None


@app.command()
@guarded
@with_options((SampleSettings, {}), (SampleRun, {}))
def sample(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Exported flowmap directory, Hub id, checkpoint or builtin:NAME (default: builtin:digits-dmf)."
        ),
    ] = None,
    family: FamilyOpt = None,
    revision: RevisionOpt = None,
    **options,
):
    """Sample images from a flow map (or a base flow model) in a few network evaluations.

    Runs unchanged under torchrun / accelerate launch: each process draws its share of the sample indices and
    rank 0 writes the same files a single process would. An interrupted run resumes on re-run with the same options.

    Examples:

      flowmap sample flowmap-convert --nfe 1 --out samples

      flowmap sample builtin:digits-sit --nfe 32 --sampler euler --num-samples 100 --npz

      flowmap sample repa-dmf20 --nfe 4 --sampler ctm --gamma 0.3 --classes 207,360,387

      torchrun --nproc_per_node 8 -m flowmap_convert.cli sample repa-dmf20 -n 50000 --npz --no-png
    """
    # lazy: these pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .api import load
    from .export_samples import run_sampling
    from .runtime import choose_threads, resolve_device, set_threads
    from .sampling import default_num_samples

    settings = SampleSettings(**from_cli(SampleSettings, options))
    settings = replace(settings, device=str(resolve_device(settings.device)))
    opts = SampleRun(**from_cli(SampleRun, options))
    n = default_num_samples(settings.classes) if opts.num_samples is None else opts.num_samples
    chunk, threads, out, npz, no_png = opts.chunk_size, opts.threads, opts.out, opts.npz, opts.no_png
    choose_threads(threads)  # --threads checked before any work
    check_out_dir(out, "samples", sources=(model,) if model else ())  # never the model read or a user's folder
    main_rank = os.environ.get("RANK", "0") in ("", "0")  # under torchrun, only rank 0 prints notes
    if model is None:
        net, name = default_sample_model()
    else:
        net, name = load(model, family=family, revision=revision), model
    settings.resolve(net)  # class ids, sampler and guidance against this model, before any note or work
    note = set_threads(threads, settings.device)
    if note and main_rank:
        err_console.print(note, highlight=False)
    warning = velocity_warning(net, settings.nfe)
    if warning and main_rank:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    # lazy: these pull torch, and `flowmap --help` starts without it (docs/architecture.md)
    from .export_samples import model_identity

    meta = {"model": name, "model_sha256": model_identity(net, model)}  # a resume continues only this model's run
    written = run_sampling(net, settings, n, out, meta=meta, png=not no_png, npz=npz, chunk_size=chunk)
    if written is not None:
        console.print(
            f"wrote {n} samples of {describe_model(name, net)} ({settings.sampler}, {settings.nfe} NFE) to {out}",
            highlight=False,
            soft_wrap=True,
        )


# Commands that live in their own modules (registered here so `flowmap --help` lists them in order).
from .cli_eval import eval_cmd  # noqa: E402  (the paper metrics)
from .cli_finetune import encode_cmd, finetune_cmd  # noqa: E402  (the fine-tuner's commands)
from .cli_push import push_cmd  # noqa: E402
from .cli_search import search_depth_cmd  # noqa: E402  (the depth search)

app.command(name="search-depth")(guarded(search_depth_cmd))
app.command(name="eval")(guarded(eval_cmd))
app.command(name="finetune")(guarded(finetune_cmd))
app.command(name="encode")(guarded(encode_cmd))
app.command(name="push")(guarded(push_cmd))


def _hide_flag_types() -> None:
    """Boolean flags take no value: --help shows no `<bool>` type next to them (typer shows one for every option)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_flowmap_flags", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return shown(self, ctx)

    display_type_rich._flowmap_flags = True
    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()
install_help_rendering()  # examples as literal blocks, descriptions as flowing paragraphs


def usage_error_line(exc, argv: list[str] | None = None, commands=()) -> str:
    """A click usage error as one line naming the fix: `<what>; see `flowmap CMD --help``."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = None
    if ctx is not None and ctx.parent is not None:
        where, command = ctx.command_path, ctx.command
    else:  # errors raised while parsing a command's options may carry no context: name the command typed
        typed = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        where = f"flowmap {typed[0]}" if typed and typed[0] in commands else "flowmap"
        command = commands.get(typed[0]) if typed and typed[0] in commands and hasattr(commands, "get") else None
    name = getattr(exc, "option_name", None)
    if name and type(exc).__name__ == "NoSuchOption":  # click's own guesses are by spelling only; ours know synonyms
        options = [o for p in getattr(command, "params", ()) for o in (*p.opts, *p.secondary_opts)]
        close = suggest_options(name, options)
        message = f"no such option: {name}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
    return f"{message}; see `{where} --help`."


def _click_exceptions(name: str) -> tuple[type, ...]:
    """The click exception class `name` from click and from the copy typer >= 0.20 vendors (typer._click)."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None and cls not in found:
            found.append(cls)
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line on stderr with exit code 2 (no help box)."""
    global _TYPED
    _TYPED = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="flowmap", standalone_mode=False)
    except _click_exceptions("NoArgsIsHelpError") as e:  # bare `flowmap` or `flowmap CMD` without arguments
        console.print(e.ctx.get_help() if e.ctx is not None else str(e), highlight=False)
        sys.exit(2)
    except _click_exceptions("UsageError") as e:
        err_console.print(
            f"[bold red]error:[/] {user_message(usage_error_line(e, argv, getattr(command, 'commands', {})))}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(e.exit_code)
    except _click_exceptions("ClickException") as e:
        err_console.print(f"[bold red]error:[/] {user_message(e.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except _click_exceptions("Abort"):
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
