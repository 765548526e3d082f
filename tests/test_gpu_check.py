"""benchmarks/gpu_check.sh runs from the checkout without installing, and stops at once when the kernels do not import."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOT = ROOT / "benchmarks" / "checkout"


def test_checkout_mapping_is_pyprojects_package_dir():
    sys.path.insert(0, str(BOOT))
    try:
        import sitecustomize as boot  # the checkout's, not an installed one: BOOT is first on sys.path

        assert Path(boot.__file__).resolve() == BOOT / "sitecustomize.py"
    finally:
        sys.path.remove(str(BOOT))
    text = (ROOT / "pyproject.toml").read_text()  # the [tool.setuptools.package-dir] table, read without tomllib (3.10)
    table = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    dirs = dict(re.findall(r'^"([^"]+)"\s*=\s*"([^"]+)"', table, flags=re.M))
    assert dirs and boot.PACKAGE_DIR == {k: v for k, v in dirs.items() if k != v}


@pytest.mark.e2e  # starts a Python child process
def test_a_child_imports_the_kernels_from_the_checkout(tmp_path):
    code = (
        "import sys, flowmap_convert.kernels as k, flowmap_convert.adapters as a; "
        "print(k.__file__); print(a.__file__); "
        "print(any(type(f).__name__ == 'CheckoutFinder' for f in sys.meta_path))"
    )
    env = dict(os.environ, PYTHONPATH=f"{BOOT}{os.pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    k, a, found = out.stdout.split()
    assert Path(k) == ROOT / "kernels" / "__init__.py" and Path(a) == ROOT / "adapters" / "__init__.py"
    assert found == "True"


def test_gpu_check_stops_when_setup_fails(tmp_path):
    env = dict(os.environ, PYTHON="false", OUT=str(tmp_path / "out"))
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 3
    assert "setup failed" in out.stdout and "stopping" in out.stdout
    steps = (tmp_path / "out" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 1 and '"step": "setup"' in steps[0]  # no later step ran into the same ImportError
