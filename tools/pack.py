"""Import this repository as ComfyUI does: a package (named like a custom_nodes folder) whose
nodes/ and dac_core/ are reached by relative imports. The tools and the tests use it to
read nodes/spec.py without starting ComfyUI."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "dac_pack"  # the package name the repository is imported under


def import_pack(root: str = ROOT, name: str = PACK):
    """The pack at `root` (this repository by default) as ComfyUI imports it, a package named
    `name` (imported once; the root __init__.py is cheap)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def node_spec():
    """nodes/spec.py of the pack: every node's inputs, outputs and tooltips, as plain data."""
    import_pack()
    return importlib.import_module(f"{PACK}.nodes.spec")
