"""Count the imports that sit inside function, lambda or class bodies in flowmap_convert/, adapters/ and kernels/.

docs/architecture.md's rule: the project's own modules are imported at module top; only heavy optional
third-party dependencies (and a project module that is lazy because it pulls one) wait for the function that
needs them. This script lists every import that is not at module level, split into

* project: a relative import, or an absolute one of `flowmap_convert`, `adapters` or `kernels`;
* third-party: anything else that is not in the standard library;
* standard library: `sys.stdlib_module_names`.

Run from the repository root: `python devtools/import_counts.py` (add `--json` for a machine-readable list).
An import under `if TYPE_CHECKING:` at module level is module level: it is not counted.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowmap_convert", "adapters", "kernels")
PROJECT_ROOTS = frozenset(PACKAGES)
KINDS = ("project", "third-party", "stdlib")


@dataclass(frozen=True)
class LazyImport:
    """One import inside a def / async def / lambda / class body."""

    path: str  # relative to the repository root, with forward slashes
    line: int
    kind: str  # one of KINDS
    module: str  # the imported module as written ("..io", "flowmap_convert.model", "triton")
    names: tuple[str, ...]  # the names a `from` import binds; () for `import x`
    scope: str  # the enclosing function or class, dotted ("FlowMap.forward")

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def targets(self) -> tuple[str, ...]:
        """The modules it imports, as written: `from . import a, b` -> (".a", ".b"), `from .x import y` -> (".x",)."""
        if self.names and not self.module.strip("."):
            return tuple(self.module + name for name in self.names)
        return (self.module,)


def _modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return ["." * node.level + (node.module or "")]


def classify(module: str) -> str:
    """'project', 'third-party' or 'stdlib' for an imported module as written."""
    if module.startswith("."):
        return "project"
    top = module.split(".")[0]
    if top in PROJECT_ROOTS:
        return "project"
    if top in sys.stdlib_module_names or top == "__future__":
        return "stdlib"
    return "third-party"


class _Finder(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.found: list[LazyImport] = []

    def _enter(self, node, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._enter(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._enter(node, node.name)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._enter(node, node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._enter(node, "<lambda>")

    def _record(self, node: ast.Import | ast.ImportFrom) -> None:
        if not self.scope:
            return
        names = tuple(a.name for a in node.names) if isinstance(node, ast.ImportFrom) else ()
        for module in _modules(node):
            self.found.append(LazyImport(self.path, node.lineno, classify(module), module, names, ".".join(self.scope)))

    visit_Import = _record
    visit_ImportFrom = _record


def lazy_imports(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[LazyImport]:
    """Every import inside a function, lambda or class body under `root`/`packages`, in file and line order."""
    found: list[LazyImport] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            finder = _Finder(rel)
            finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel))
            found.extend(finder.found)
    return found


MODULE_DIRS = {
    "flowmap_convert": "flowmap_convert",
    "flowmap_convert.adapters": "adapters",
    "flowmap_convert.kernels": "kernels",
}


def module_paths(root: Path = ROOT) -> dict[str, Path]:
    """{installed module name: file} for the package and the directories setuptools maps into it (package-dir)."""
    out = {}
    for package, directory in MODULE_DIRS.items():
        for path in sorted((root / directory).rglob("*.py")):
            parts = path.relative_to(root / directory).with_suffix("").parts
            name = ".".join((package, *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))
            if package == "flowmap_convert" and parts[0] in ("adapters", "kernels"):
                continue
            out[name] = path
    return out


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """What importing `name` runs: its module-level imports (not those in def / class bodies), resolved to project
    module names (the package itself, and its parents, included) or third-party top-level names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # parents run first

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    out.add(a.name if a.name.split(".")[0] in PROJECT_ROOTS else a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base.split(".")[0] not in PROJECT_ROOTS and not node.level:
                    out.add(base.split(".")[0])
                    continue
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):  # if / try / with at module level
                    visit(getattr(node, field, []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    out.discard(name)
    return {m for m in out if m in known or m.split(".")[0] not in PROJECT_ROOTS}


def third_party_pulled(module: str, root: Path = ROOT) -> set[str]:
    """The third-party and standard-library top-level names that `import module` loads (module-level imports,
    followed through the project's modules)."""
    paths = module_paths(root)
    known = set(paths)
    seen, todo, found = set(), [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for target in module_level_imports(m, paths[m], known):
            if target in known:
                todo.append(target)
            else:
                found.add(target)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = parser.parse_args(argv)
    found = lazy_imports(args.root)
    if args.json:
        print(json.dumps([asdict(f) for f in found], indent=1))
        return 0
    for kind in KINDS:
        rows = [f for f in found if f.kind == kind]
        print(f"## {kind}: {len(rows)}")
        for f in rows:
            what = f"from {f.module} import {', '.join(f.names)}" if f.names else f"import {f.module}"
            print(f"{f.where()}  {f.scope}  {what}")
        print()
    counts = ", ".join(f"{kind} {sum(f.kind == kind for f in found)}" for kind in KINDS)
    print(f"function-level imports: {counts}, total {len(found)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
