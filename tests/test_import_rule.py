"""docs/architecture.md's import rule: the project's own modules are imported at module top. The few imports that
wait for a function are listed there, file by file with the reason, and in ALLOWED below (the same list); the
reasons are checked too (what they keep out of an import really stays out, what they defer really is heavy)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.import_counts import lazy_imports, module_paths, third_party_pulled  # noqa: E402

PACKAGE = "PEP 562 attributes: `import flowmap_convert` loads none of these (nor torch) until one is used"
CLI = "they pull torch (seconds): `flowmap --help` and every command's option checks start without it"
FINETUNING = (
    "they pull torch: the CLI imports `finetuning.recipe` (the fine-tuner's options) at start-up, "
    "which runs this package's `__init__`"
)
TRITON = "`triton_jvp` imports triton: optional, and TRITON_INTERPRET is read when triton is first imported"

# file -> (the project modules it imports inside functions, as written, and why)
ALLOWED: dict[str, tuple[tuple[str, ...], str]] = {
    "flowmap_convert/__init__.py": (
        (".api", ".config", ".errors", ".finetuning", ".model", ".sampling", ".search"),
        PACKAGE,
    ),
    "flowmap_convert/cli.py": ((".api", ".digits", ".export_samples", ".io", ".runtime", ".sampling"), CLI),
    "flowmap_convert/cli_eval.py": ((".evaluate", ".runtime", ".sampling"), CLI),
    "flowmap_convert/cli_finetune.py": ((".encode", ".finetuning.memory", ".runtime"), CLI),
    "flowmap_convert/cli_push.py": ((".adapters",), CLI),
    "flowmap_convert/cli_search.py": ((".runtime", ".sampling", ".search"), CLI),
    "flowmap_convert/finetuning/__init__.py": (
        ("..api", "..model", "..runtime", ".checkpoint", ".loader", ".objectives", ".trainer"),
        FINETUNING,
    ),
    "kernels/attention.py": ((".triton_jvp",), TRITON),
}

# what `import flowmap_convert.cli` (every `flowmap` command's start) must not load
HEAVY = ("torch", "numpy", "safetensors", "huggingface_hub", "PIL", "triton", "accelerate", "diffusers", "transformers")
HEAVY += ("sklearn", "scipy", "torch_fidelity", "matplotlib")


def _module_of(path: str) -> str:
    return {p.relative_to(ROOT).as_posix(): name for name, p in module_paths(ROOT).items()}[path]


def _absolute(path: str, target: str) -> str:
    """A relative import written in `path` as the installed module name it names."""
    module = _module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    level = len(target) - len(target.lstrip("."))
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{target.lstrip('.')}"


@pytest.fixture(scope="module")
def lazy():
    return [f for f in lazy_imports(ROOT) if f.kind == "project"]


def test_no_project_import_waits_in_a_function_unless_listed(lazy):
    stray = [
        f"{f.where()} ({f.scope}): {t}" for f in lazy for t in f.targets() if t not in ALLOWED.get(f.path, ((), ""))[0]
    ]
    assert not stray, (
        "import these at the module top (or list them with a reason in docs/architecture.md): " + "; ".join(stray)
    )


def test_every_listed_exception_is_still_lazy(lazy):
    """The list shrinks when an import moves up: no entry outlives its import."""
    found = {(f.path, t) for f in lazy for t in f.targets()}
    stale = [(path, t) for path, (targets, _) in ALLOWED.items() for t in targets if (path, t) not in found]
    assert not stale


def test_docs_give_the_same_list():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Imports inside functions", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else None
        if cells:
            modules = tuple(sorted(re.findall(r"`([^`]+)`", cells[1])))
            rows[cells[0].strip("`")] = (modules, cells[2])
    assert rows == {path: (tuple(sorted(t)), why) for path, (t, why) in ALLOWED.items()}


@pytest.mark.e2e  # starts a Python child process
def test_what_each_listed_import_defers_is_heavy():
    """The CLI and fine-tuning entries defer modules that pull torch; the triton entry, the module importing triton."""
    for path, (targets, why) in ALLOWED.items():
        for target in targets:
            pulled = third_party_pulled(_absolute(path, target), ROOT)
            if why in (CLI, FINETUNING):
                assert "torch" in pulled, f"{path}: {target} no longer pulls torch; import it at the top"
            elif why == TRITON:
                assert "triton" in pulled


def test_the_modules_that_defer_them_stay_light():
    """What the reasons protect, read from the sources: the CLI modules and the finetuning package import no torch."""
    for path, (_, why) in ALLOWED.items():
        if why in (CLI, FINETUNING, PACKAGE):
            assert not set(HEAVY) & third_party_pulled(_module_of(path), ROOT), path


def test_cli_start_up_loads_no_heavy_dependency():
    """The same, in a real interpreter: `flowmap`'s start and `import flowmap_convert` load none of HEAVY."""
    code = (
        "import sys, flowmap_convert; base = set(sys.modules); import flowmap_convert.cli; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); "
        "print(sorted(m for m in base if m.startswith('flowmap_convert.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    heavy, package = out.stdout.splitlines()
    assert heavy == "[]"
    assert package == "['flowmap_convert._version']"  # `import flowmap_convert` alone: its version only


def test_the_counter_reads_every_kind_of_body(tmp_path):
    pkg = tmp_path / "flowmap_convert"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import json\n"
        "from . import config\n"
        "if TYPE_CHECKING:\n"
        "    from .model import FlowMap\n"
        "def f():\n"
        "    from .io import export\n"
        "    import torch\n"
        "    def g():\n"
        "        from flowmap_convert import api\n"
        "async def h():\n"
        "    import os.path\n"
        "class C:\n"
        "    from . import a, b\n"
        "    def m(self):\n"
        "        import adapters.sit\n"
    )
    got = [(f.line, f.kind, f.targets(), f.scope) for f in lazy_imports(tmp_path, ("flowmap_convert",))]
    assert got == [
        (7, "project", (".io",), "f"),
        (8, "third-party", ("torch",), "f"),
        (10, "project", ("flowmap_convert",), "f.g"),
        (12, "stdlib", ("os.path",), "h"),
        (14, "project", (".a", ".b"), "C"),
        (16, "project", ("adapters.sit",), "C.m"),
    ]
    script = ROOT / "devtools" / "import_counts.py"
    out = subprocess.run([sys.executable, str(script), "--root", str(ROOT)], capture_output=True, text=True, check=True)
    project = sum(f.kind == "project" for f in lazy_imports(ROOT))
    assert f"project {project}," in out.stdout.splitlines()[-1]
