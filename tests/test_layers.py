"""The import-linter contract covers adapters/ and kernels/ (installed as flowmap_convert.adapters / .kernels through
package-dir): devtools/importlinter_contracts.py adds them to grimp's graph before the layers are checked."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.importlinter_contracts import _parse_mapping, add_mapped_packages, imports_of  # noqa: E402

MAPPED = {"flowmap_convert.adapters": ROOT / "adapters", "flowmap_convert.kernels": ROOT / "kernels"}


@pytest.fixture(scope="module")
def graph():
    g = grimp.build_graph("flowmap_convert", cache_dir=None)
    assert "flowmap_convert.adapters" not in g.modules  # what the contract type exists for
    add_mapped_packages(g, MAPPED, {"flowmap_convert": ROOT / "flowmap_convert"})
    return g


def test_the_graph_holds_the_mapped_packages_and_the_imports_both_ways(graph):
    for package, directory in MAPPED.items():
        for f in directory.glob("*.py"):
            name = package if f.stem == "__init__" else f"{package}.{f.stem}"
            assert name in graph.modules, name
    edges = [
        ("flowmap_convert.adapters.dit_keys", "flowmap_convert.dit"),  # mapped -> walked (`from ..dit import`)
        ("flowmap_convert.adapters.sit", "flowmap_convert.adapters"),  # mapped -> mapped (`from . import register`)
        ("flowmap_convert.adapters.sit", "flowmap_convert.adapters.dit_keys"),
        ("flowmap_convert.dit", "flowmap_convert.kernels.attention"),  # walked -> mapped: a submodule by that name
        ("flowmap_convert.cli_push", "flowmap_convert.adapters"),  # inside a function (push_cmd)
        ("flowmap_convert.finetuning.setup", "flowmap_convert.kernels"),  # `from .. import kernels`
    ]
    for importer, imported in edges:
        assert graph.direct_import_exists(importer=importer, imported=imported), (importer, imported)
    assert not graph.direct_import_exists(importer="flowmap_convert.decoders", imported="flowmap_convert.adapters")


def test_relative_and_absolute_imports_resolve_like_grimp(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text(
        "import os\nfrom ..cli import app\nfrom .. import sampling\nfrom . import helper, thing\n"
        "def g():\n    import pkg.search.plan\n    from pkg.io import export\n"
    )
    known = {"pkg", "pkg.cli", "pkg.sampling", "pkg.sub", "pkg.sub.helper", "pkg.search", "pkg.io"}
    got = {(t, line) for t, line, _ in imports_of("pkg.sub.mod", f, known)}
    assert got == {
        ("pkg.cli", 2),
        ("pkg.sampling", 3),
        ("pkg.sub.helper", 4),
        ("pkg.sub", 4),  # `thing` is not a module: the package
        ("pkg.search", 6),  # the nearest module the graph knows
        ("pkg.io", 7),
    }


def test_pyproject_contract_covers_adapters_and_kernels():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = conf["tool"]["importlinter"]["contracts"]
    assert contract["type"] == "layers_with_package_dirs"
    layers = [m.strip() for layer in contract["layers"] for m in layer.split(":")]
    assert "adapters" in layers and "kernels" in layers
    assert layers.index("adapters") < layers.index("model") and layers.index("kernels") > layers.index("dit")
    mapping = _parse_mapping(contract["package_dirs"])
    package_dir = conf["tool"]["setuptools"]["package-dir"]
    assert {k: str(v) for k, v in mapping.items()} == {k: v for k, v in package_dir.items() if k != "flowmap_convert"}
