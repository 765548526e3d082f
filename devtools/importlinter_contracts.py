"""An import-linter contract type that also sees the packages setuptools' `package-dir` maps into the root package.

`flowmap_convert.adapters` and `flowmap_convert.kernels` live in adapters/ and kernels/ beside flowmap_convert/
(pyproject.toml, `[tool.setuptools.package-dir]`). grimp builds its graph by walking the root package's directory,
so those modules, and every import into them, are missing from the graph that import-linter checks. The contract
type `layers_with_package_dirs` adds them (modules from the mapped directories, imports read from the source of
both the mapped and the walked files, top level and inside functions alike, as grimp reads them) and then checks
the ordinary layers contract on the completed graph. pyproject.toml names the mapped directories in the
contract's `package_dirs` option: "flowmap_convert.adapters: adapters".
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from importlinter.contracts.layers import LayersContract
from importlinter.domain import fields


def module_files(package: str, directory: Path) -> Iterator[tuple[str, Path]]:
    """(module name, file) of every module of a regular package rooted at `directory` (sub-packages included)."""
    for path in sorted(directory.rglob("*.py")):
        parts = path.relative_to(directory).with_suffix("").parts
        if any(not (directory / Path(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
            continue  # not inside a package (a stray script in a data folder)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((package, *parts)), path


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int, str]]:
    """(imported module, line number, line) for each import in `path` of a module in `known`."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1 if node.level else 0):
                base = base.rpartition(".")[0]
            if node.level == 0:
                base = node.module or ""
            elif node.module:
                base = f"{base}.{node.module}"
            # `from pkg import name`: the submodule when `name` is one, else the package itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package's attribute: its nearest module
                target = target.rpartition(".")[0]
            if target and target != module:
                yield target, node.lineno, lines[node.lineno - 1].strip()


def add_mapped_packages(graph, package_dirs: dict[str, Path], root_dirs: dict[str, Path]) -> list[str]:
    """Add the modules of `package_dirs` ({package: directory}) and every import into or out of them, read from
    the files of both the mapped packages and the root packages (`root_dirs`); returns the modules added."""
    mapped = {name: path for pkg, d in package_dirs.items() for name, path in module_files(pkg, d)}
    for name in mapped:
        graph.add_module(name)
    known = set(graph.modules) | set(mapped)
    walked = {name: path for pkg, d in root_dirs.items() for name, path in module_files(pkg, d)}
    prefixes = tuple(f"{pkg}." for pkg in package_dirs)
    for name, path in {**walked, **mapped}.items():
        own = name in mapped
        for target, line, contents in imports_of(name, path, known):
            if own or target in mapped or target.startswith(prefixes):  # grimp already has the rest
                graph.add_import(importer=name, imported=target, line_number=line, line_contents=contents)
    return sorted(mapped)


def _parse_mapping(entries) -> dict[str, Path]:
    """["pkg.sub: dir", ...] -> {"pkg.sub": Path("dir")} (relative to the working directory, as lint-imports runs)."""
    out = {}
    for entry in entries:
        package, sep, directory = (part.strip() for part in str(entry).partition(":"))
        if not sep or not package or not directory:
            raise ValueError(f"package_dirs entry {entry!r} is not 'package.name: directory'.")
        out[package] = Path(directory)
    return out


class LayersWithPackageDirsContract(LayersContract):
    """The layers contract, checked on the graph completed with the `package_dirs` packages."""

    type_name = "layers_with_package_dirs"

    package_dirs = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool):
        mapping = _parse_mapping(self.package_dirs)
        for package, directory in mapping.items():
            if not (directory / "__init__.py").is_file():
                raise ValueError(f"package_dirs: {directory}/__init__.py (for {package}) does not exist.")
        roots = {m.split(".")[0] for m in mapping}
        root_dirs = {r: Path(next(iter(importlib.util.find_spec(r).submodule_search_locations))) for r in roots}
        add_mapped_packages(graph, mapping, root_dirs)
        return super().check(graph, verbose)
