"""Options declared once: a dataclass field with metadata is the option, its CLI flag, its help and its check.

A settings dataclass (finetuning.Recipe, sampling.SampleSettings, ...) declares each option as

    lr: float = option(1e-4, "AdamW learning rate.", lo=0.0, lo_open=True)

and everything else is derived from that one line:

- the API keyword (the field itself),
- the validation (`check(obj)` in `__post_init__`: finite, in range, one of the choices; one FlowmapError per bad
  value naming the *parameter* in backticks, e.g. `` `lr` must be > 0, got nan``),
- the command-line option (`with_options` builds a typer command's signature from the fields: typer reads
  `inspect.signature`, so a generated `__signature__` of `Annotated[..., typer.Option(...)]` parameters is a
  command like any other), and the parameter -> flag pair the CLI renders errors with (vocabulary.for_cli).

Shared concepts (seed, device, batch size, guidance interval, ...) take their flag and help from vocabulary.SHARED.
Adding an option is adding a field.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from .errors import FlowmapError
from .validate import finite_float, int_in_range
from .vocabulary import SHARED, register_flags

KEY = "flowmap_option"


@dataclass(frozen=True)
class Opt:
    """The metadata of one option (everything but its name, type and default, which the field holds)."""

    help: str = ""
    flag: str | None = None  # default: --name-with-dashes (or the shared concept's)
    short: str | None = None
    lo: float | None = None  # numbers (and each number of a tuple) must lie in [lo, hi] (ends open when asked)
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    ordered: bool = False  # a pair (lo, hi) with lo <= hi (an interval)
    concept: str | None = None  # key of vocabulary.SHARED: flag, short alias and help come from there
    cli: bool = True  # False: an API keyword only (no command-line option)
    parse: Callable[[str], Any] | None = None  # command-line text -> value (default: by the field's type)
    metavar: str | None = None


def option(default: Any = None, help: str = "", **meta) -> Any:
    """A dataclass field declaring one option (see the module docstring)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata={KEY: Opt(help=help, **meta)})


@dataclass(frozen=True)
class Declared:
    """One declared option of a dataclass: name, resolved type, default and metadata."""

    name: str
    type: Any
    default: Any
    opt: Opt

    @property
    def optional(self) -> bool:
        """True when None is an allowed value."""
        return _is_optional(self.type)

    @property
    def base(self) -> Any:
        """The type without `| None`."""
        return _strip_none(self.type)

    @property
    def flag(self) -> str:
        """The command-line flag (--name-with-dashes unless declared or shared)."""
        if self.opt.flag:
            return self.opt.flag
        if self.opt.concept:
            return SHARED[self.opt.concept].flag
        return "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        """The help text: a shared concept's sentence first (the same words in every command), then the option's own."""
        shared = SHARED[self.opt.concept].help if self.opt.concept else ""
        return " ".join(t for t in (shared, self.opt.help) if t)


def _is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp) and typing.get_origin(tp) in (typing.Union, _UnionType)


def _strip_none(tp):
    if _is_optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


_UnionType = type(int | None)


@functools.cache
def declared(cls) -> tuple[Declared, ...]:
    """The declared options of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(KEY)
        if opt is None:
            continue
        out.append(Declared(f.name, hints[f.name], f.default, opt))
    return tuple(out)


def flags(cls) -> dict[str, str]:
    """parameter -> flag for every command-line option of a dataclass."""
    return {d.name: d.flag for d in declared(cls) if d.opt.cli}


def register(cls) -> None:
    """Tell vocabulary.for_cli how this dataclass's parameters are spelt on the command line (call at import)."""
    register_flags(flags(cls))


# ---------------------------------------------------------------------------------------------------- validation
def check_value(d: Declared, value):
    """One value checked against its declaration; returns it normalised (ints as int, lists as tuples)."""
    name, o = f"`{d.name}`", d.opt
    if value is None:
        if d.optional:
            return None
        raise FlowmapError(f"{name} must be given, got None.")
    tp = d.base
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise FlowmapError(f"{name} must be true or false, got {value!r}.")
        return value
    if tp is int:
        return int_in_range(name, value, _int(o.lo), _int(o.hi))
    if tp is float:
        return finite_float(name, value, o.lo, o.hi, lo_open=o.lo_open, hi_open=o.hi_open)
    if tp is str:
        if not isinstance(value, str):
            raise FlowmapError(f"{name} must be text, got {value!r}.")
        if o.choices is not None and value not in o.choices:
            raise FlowmapError(f"{name} {value!r} is not supported; choose one of {', '.join(o.choices)}.")
        return value
    if tp is Path:
        return Path(value)
    if origin is tuple:
        args = typing.get_args(tp)
        items = tuple(value) if isinstance(value, (tuple, list)) else None
        fixed = len(args) != 2 or args[1] is not Ellipsis
        if items is None or (fixed and len(items) != len(args)):
            what = f"{len(args)} numbers" if fixed else "a list"
            raise FlowmapError(f"{name} takes {what}, got {value!r}.")
        elem = args[0]
        out = []
        for k, v in enumerate(items):
            one = f"{name} item {k + 1}"
            if elem is int:
                out.append(int_in_range(one, v, _int(o.lo), _int(o.hi)))
            else:
                out.append(finite_float(one, v, o.lo, o.hi, lo_open=o.lo_open, hi_open=o.hi_open))
        if o.ordered and len(out) == 2 and out[0] > out[1]:
            raise FlowmapError(f"{name} must have start <= end, got {list(items)}.")
        return tuple(out)
    return value


def _int(x):
    return None if x is None else int(math.ceil(x) if x > 0 else x)


def check(obj) -> None:
    """Validate and normalise every declared field of a (frozen) dataclass instance, in field order."""
    for d in declared(type(obj)):
        value = check_value(d, getattr(obj, d.name))
        object.__setattr__(obj, d.name, value)


# ---------------------------------------------------------------------------------------------------- command line
def parse_text(d: Declared, text: str):
    """Command-line text of a tuple option -> a tuple ('0.4,-1.2' -> (0.4, -1.2)); a one-line error otherwise."""
    if d.opt.parse is not None:
        return d.opt.parse(text)
    args = typing.get_args(d.base)
    elem = args[0] if args else float
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        return tuple(elem(p) for p in parts)
    except ValueError:
        raise FlowmapError(f"`{d.name}` takes comma-separated numbers, got {text!r}.") from None


def _cli_type(d: Declared):
    """(annotation type, needs text parsing) of one option on the command line."""
    if d.opt.parse is not None or typing.get_origin(d.base) is tuple:
        return str, True
    return d.base, False


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cli_parameters(cls, *, given_only: bool = False, skip=(), default_note: str = "") -> list[inspect.Parameter]:
    """typer parameters (keyword-only, `Annotated[T, typer.Option(...)]`) for the CLI options of a dataclass.

    given_only: every option defaults to None, so a command can tell a value the user typed from a default (the
    fine-tuner's recipe fills the rest); the help then shows the dataclass default followed by `default_note`.
    """
    import typer

    params = []
    for d in declared(cls):
        if not d.opt.cli or d.name in skip:
            continue
        tp, text = _cli_type(d)
        decls = [d.flag]
        short = d.opt.short or (SHARED[d.opt.concept].short if d.opt.concept else None)
        if short:
            decls.append(short)
        help_ = d.help
        metavar = d.opt.metavar or (SHARED[d.opt.concept].metavar if d.opt.concept else None)
        if d.opt.choices and "choose" not in help_:
            help_ += f" One of: {', '.join(d.opt.choices)}."
        if given_only:
            default = None
            tp = tp | None
            if d.default is not None:
                help_ += f" (default: {_show(d.default)}{default_note})"
            if d.base is bool:
                decls = [f"{d.flag}/--no-{d.flag[2:]}"]
        else:
            default = _show(d.default) if text and d.default is not None else d.default
            if d.optional:
                tp = tp | None
        info = typer.Option(*decls, help=help_, metavar=metavar, show_default=not given_only)
        params.append(
            inspect.Parameter(d.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[tp, info])
        )
    return params


def from_cli(cls, values: dict[str, Any], *, given_only: bool = False) -> dict[str, Any]:
    """The keyword arguments of `cls` from a command's parsed options (text parsed; None dropped when given_only)."""
    out = {}
    for d in declared(cls):
        if d.name not in values:
            continue
        v = values[d.name]
        if v is None and given_only:
            continue
        if isinstance(v, str) and _cli_type(d)[1]:
            v = parse_text(d, v)
        out[d.name] = v
    return out


def with_options(*groups: tuple[type, dict]) -> Callable:
    """Decorator: a typer command's signature is its own parameters followed by each group's generated options.

    groups: (dataclass, keyword arguments of cli_parameters). The command receives every option as a keyword
    (collect them with **options) and turns them into its dataclasses with `from_cli`.
    """

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        params = list(own)
        for cls, kw in groups:
            for p in cli_parameters(cls, **kw):
                if p.name not in names:
                    names.add(p.name)
                    params.append(p)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {}  # typer takes the annotations from the signature
        return fn

    return deco
