"""Run flowmap from a checkout without installing it: `PYTHONPATH=benchmarks/checkout:. python ...`.

An install maps two packages onto top-level folders (pyproject.toml, [tool.setuptools.package-dir]):
flowmap_convert.adapters -> adapters/ and flowmap_convert.kernels -> kernels/. Python reads this file at start-up
(site imports `sitecustomize` from sys.path) and puts a finder first on sys.meta_path that resolves those two names,
and their submodules, to the folders; flowmap_convert itself is found on PYTHONPATH as usual. Child processes
inherit PYTHONPATH and so the same mapping. benchmarks/gpu_check.sh runs everything this way.
"""

import importlib.abc
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE_DIR = {"flowmap_convert.adapters": "adapters", "flowmap_convert.kernels": "kernels"}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Find flowmap_convert.adapters / .kernels (packages) in the checkout's top-level folders."""

    def find_spec(self, name, path=None, target=None):
        folder = PACKAGE_DIR.get(name)
        if folder is None:
            return None
        init = os.path.join(ROOT, folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[os.path.join(ROOT, folder)]
        )


if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, CheckoutFinder())
