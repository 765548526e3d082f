"""Count command-line flags named in the library's error messages (docs/architecture.md: errors name parameters).

Library code (flowmap_convert/, adapters/, kernels/, without the cli*.py modules) names a parameter in backticks
(`` `nfe` ``) and the CLI turns it into its flag (vocabulary.for_cli). This script finds the messages that name a
`--flag` instead. A message is a string literal or f-string part that reaches an error:

- an argument of a call to an exception class (`raise FlowmapError(...)`, `return FlowmapError(...)`, `err = ...`),
  or anything else under a `raise` statement (but `raise SystemExit(...)`);
- a local variable that such a call uses (`msg = f"..."; raise FlowmapError(msg)`), within the same function;
- what a function of the same module returns when its call sits inside an error (`raise FlowmapError(hint(x))`);
- an argument of a call to a message helper (a function of the package that puts one of its parameters into an
  error message: `finite_float(name, ...)`, `check_output(..., flag=...)`, `write_error(..., then=...)`), and the
  defaults of a message helper's parameters.

A flag inside a suggested command line does not count: `` `flowmap sample MODEL --npz` `` (or a string that is
the command, `f"flowmap convert ./{name} --family {family}"`) tells either kind of user what to type in a shell.

Run: `.venv/bin/python devtools/house_counts.py` (prints each location and the count; `--quiet` prints the count
only; `--root DIR` reads another checkout, e.g. an older commit unpacked with `git archive`).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY_DIRS = ("flowmap_convert", "adapters", "kernels")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# a suggested command line (`flowmap convert FILE --family sit`) names the command's own flags, as a user types them
COMMAND = re.compile(r"`flowmap [^`]*`|^flowmap .*")
BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


@dataclass(frozen=True)
class Message:
    """One string (a literal, or the literal text of an f-string) that reaches an error."""

    path: str  # relative to the repository root
    line: int
    text: str

    @property
    def flags(self) -> list[str]:
        """The `--flags` the text names (outside a suggested `flowmap ...` command line)."""
        return FLAG.findall(COMMAND.sub("", self.text))

    @property
    def backticked(self) -> list[str]:
        """The identifiers the text names in backticks (parameters, in the library's convention)."""
        return BACKTICKED.findall(self.text)


def library_files(root: Path = ROOT) -> Iterator[Path]:
    """Every library module: the three package directories, without the command-line modules (cli*.py)."""
    for d in LIBRARY_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            if not path.name.startswith("cli"):
                yield path


def _is_error_class(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name.endswith(("Error", "Exception"))


def _call_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _text(node: ast.AST) -> str | None:
    """The literal text of a str constant or an f-string (its placeholders as {})."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _strings(node: ast.AST) -> Iterator[ast.AST]:
    """Every str constant and f-string inside `node`: an f-string as a whole, then the strings in its placeholders."""
    parts = {id(v) for sub in ast.walk(node) if isinstance(sub, ast.JoinedStr) for v in sub.values}
    for sub in ast.walk(node):
        if isinstance(sub, ast.JoinedStr) or (
            isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in parts
        ):
            yield sub


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)}


def _error_exprs(tree: ast.AST) -> Iterator[ast.AST]:
    """The expressions that make an error: calls to exception classes, and everything under `raise`.

    `raise SystemExit(...)` is a script's own exit (an argparse entry point such as `python -m flowmap_convert.demo`
    speaks of its own flags), not a library error.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            if isinstance(node.exc, ast.Call) and _call_name(node.exc.func) == "SystemExit":
                continue
            yield node.exc
        elif isinstance(node, ast.Call) and _is_error_class(node.func):
            yield node


def message_helpers(trees: dict[Path, ast.AST]) -> set[str]:
    """Names of the package's functions that put one of their parameters into an error message."""
    out = set()
    for tree in trees.values():
        for fn in _functions(tree):
            params = _params(fn)
            if any(isinstance(n, ast.Name) and n.id in params for e in _error_exprs(fn) for n in ast.walk(e)):
                out.add(fn.name)
    return out


def _module_messages(path: Path, tree: ast.AST, helpers: set[str]) -> Iterator[ast.AST]:
    """Every string node of one module that reaches an error (see the module docstring)."""
    local_fns = {fn.name: fn for fn in _functions(tree)}
    for expr in _error_exprs(tree):
        yield from _strings(expr)
        for call in (n for n in ast.walk(expr) if isinstance(n, ast.Call)):
            fn = local_fns.get(_call_name(call.func))
            if fn is not None and not _is_error_class(call.func):
                for ret in (n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None):
                    yield from _strings(ret.value)
    for fn in _functions(tree):
        names = {n.id for expr in _error_exprs(fn) for n in ast.walk(expr) if isinstance(n, ast.Name)}
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id in names for t in targets):
                    yield from _strings(node.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node.func) in helpers:
            for arg in (*node.args, *(k.value for k in node.keywords)):
                yield from _strings(arg)
    for fn in _functions(tree):
        if fn.name in helpers:  # a default that reaches the message (`flag: str = "--out"`)
            for default in (*fn.args.defaults, *(d for d in fn.args.kw_defaults if d is not None)):
                yield from _strings(default)


def messages(root: Path = ROOT) -> list[Message]:
    """Every error-message string of the library, once each, in file and line order."""
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in library_files(root)}
    helpers = message_helpers(trees)
    out: dict[tuple[str, int, int], Message] = {}
    for path, tree in trees.items():
        rel = path.relative_to(root).as_posix()
        for node in _module_messages(path, tree, helpers):
            text = _text(node)
            if text is not None:
                out.setdefault((rel, node.lineno, node.col_offset), Message(rel, node.lineno, text))
    return [out[k] for k in sorted(out)]


def flagged(root: Path = ROOT) -> list[Message]:
    """The error messages that name a `--flag`."""
    return [m for m in messages(root) if m.flags]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else ROOT
    found = flagged(root)
    if "--quiet" not in argv:
        for m in found:
            print(f"{m.path}:{m.line}: {', '.join(m.flags)}: {m.text[:100]}")
    print(f"{len(found)} library error messages name a command-line flag")
    return 0


if __name__ == "__main__":
    sys.exit(main())
