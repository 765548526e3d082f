"""Import rules that import-linter cannot check: adapters/ and kernels/ install through package-dir.

grimp (import-linter's graph builder) maps only top-level packages onto directories, so the two packages that live
outside flowmap_convert/ on disk are checked here by reading their import statements.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each outside package may import from flowmap_convert (module names relative to the package root).
ALLOWED = {
    # sources and families: read files, build backbones and FlowMaps; never the trainer, the search or the CLI
    "adapters": {
        "errors",
        "config",
        "io",
        "outputs",
        "model",
        "dit",
        "ddt",
        "ddpm",
        "layers",
        "validate",
        "progress",
        "runtime",
    },
    # attention: nothing of the model (the model imports the kernels, not the other way round)
    "kernels": {"errors"},
}


def imported_modules(path: Path) -> set[str]:
    """flowmap_convert modules one file imports through `from ..X import` (or `from .. import X`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 2:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names if a.name != "__file__")
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("flowmap_convert.")
        ):
            out.add(node.module.split(".")[1])
    return out


def test_outside_packages_import_only_lower_layers():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((ROOT / pkg).glob("*.py")):
            for mod in sorted(imported_modules(f) - allowed - {pkg}):
                bad.append(f"{pkg}/{f.name} imports flowmap_convert.{mod}")
    assert not bad, "layering broken: " + "; ".join(bad)


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from ..cli import app\nfrom .. import sampling\nfrom flowmap_convert.search import plan\n")
    assert imported_modules(f) == {"cli", "sampling", "search"}
