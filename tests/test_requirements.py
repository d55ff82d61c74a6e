"""What the pack needs in ComfyUI's Python, and what the tests need of ComfyUI (needs COMFYUI_PATH).

ComfyUI-Manager installs the pack as a folder in custom_nodes/ plus `pip install -r
requirements.txt` into ComfyUI's Python; it never installs this project's pyproject
dependencies (diffusers, peft, transformers, ..., which only the `dac-edit` command uses).
So every third-party module the nodes import must come with ComfyUI or be in requirements.txt,
and loading the pack must not pull in the diffusers stack.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib import metadata

import comfy_tiny
import pytest
import tomllib
from conftest import ROOT, tree_changes, tree_state

COMFYUI = comfy_tiny.comfyui_path()
pytestmark = comfy_tiny.NEEDS_COMFYUI

# Modules of the diffusers stack that the nodes must never import (ComfyUI has its own models).
DAC_EDIT_ONLY = ("diffusers", "peft", "transformers", "accelerate")
# ComfyUI requirements that the `test` extra leaves out on purpose, with the reason.
NOT_IN_TEST_EXTRA = {
    "torchaudio": "only ComfyUI's audio nodes import it (they log an import failure and the rest runs); "
                  "PyPI's torchaudio must match the torch build exactly",
}
# Distribution -> import name, for distributions that may not be installed here.
IMPORT_NAMES = {"pillow": ["PIL"], "pyyaml": ["yaml"], "av": ["av"], "pydantic-settings": ["pydantic_settings"]}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines) -> list[str]:
    """Distribution names of requirement lines (comments, blank lines and options skipped)."""
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        assert match, f"cannot read the requirement {line!r}"
        names.append(canonical(match.group(0)))
    return names


def read_requirements(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return requirement_names(f)


def import_names(distributions) -> set[str]:
    """Top-level import names of the given distributions."""
    wanted = {canonical(d) for d in distributions}
    names = set()
    for module, dists in metadata.packages_distributions().items():
        if wanted & {canonical(d) for d in dists}:
            names.add(module)
    for dist in wanted:
        names.update(IMPORT_NAMES.get(dist, [dist.replace("-", "_")]))
    return names


def comfyui_modules() -> set[str]:
    """Top-level modules that ComfyUI itself provides (comfy, comfy_api, folder_paths, nodes, ...)."""
    names = set()
    for entry in os.listdir(COMFYUI):
        full = os.path.join(COMFYUI, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(full) and not entry.startswith("."):
            names.add(entry)
    return names


def _module_file(path: str) -> str | None:
    if os.path.isfile(path + ".py"):
        return path + ".py"
    if os.path.isfile(os.path.join(path, "__init__.py")):
        return os.path.join(path, "__init__.py")
    return None


def node_imports() -> dict[str, set[str]]:
    """{top-level absolute module: files that import it} over the pack's entry point, nodes/
    and every module they reach through relative imports (imports inside functions included)."""
    found: dict[str, set[str]] = {}
    todo = [os.path.join(ROOT, "__init__.py")]
    nodes_dir = os.path.join(ROOT, "nodes")
    todo += [os.path.join(nodes_dir, n) for n in sorted(os.listdir(nodes_dir)) if n.endswith(".py")]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = os.path.relpath(path, ROOT)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found.setdefault(alias.name.split(".")[0], set()).add(rel)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.setdefault(node.module.split(".")[0], set()).add(rel)
            elif isinstance(node, ast.ImportFrom):
                base = os.path.dirname(path)
                for _ in range(node.level - 1):
                    base = os.path.dirname(base)
                assert os.path.commonpath([base, ROOT]) == ROOT, f"{rel}: relative import above the pack"
                parts = node.module.split(".") if node.module else []
                # Every package on the way runs its __init__.py, then the module, then
                # submodules named in `from X import name`.
                for i in range(len(parts) + 1):
                    init = os.path.join(base, *parts[:i], "__init__.py")
                    if os.path.isfile(init):
                        todo.append(init)
                target = _module_file(os.path.join(base, *parts))
                assert target, f"{rel}: cannot find the module of 'from {'.' * node.level}{node.module or ''} import'"
                todo.append(target)
                for alias in node.names:
                    sub = _module_file(os.path.join(base, *parts, alias.name))
                    if sub:
                        todo.append(sub)
    reached = {os.path.relpath(p, ROOT) for p in seen}
    assert {"__init__.py", "nodes/dac_nodes.py", "dac_core/stages.py"} <= reached, reached
    return found


def test_every_module_the_nodes_import_comes_with_comfyui_or_requirements_txt():
    comfy_reqs = read_requirements(os.path.join(COMFYUI, "requirements.txt"))
    ours = read_requirements(os.path.join(ROOT, "requirements.txt"))
    provided = comfyui_modules() | import_names(comfy_reqs) | import_names(ours) | set(sys.stdlib_module_names)
    imports = node_imports()
    assert {"torch", "comfy", "folder_paths"} <= imports.keys(), sorted(imports)  # the walk sees the nodes
    missing = {m: sorted(files) for m, files in imports.items() if m not in provided}
    assert not missing, (f"the nodes import modules that neither ComfyUI's requirements nor requirements.txt "
                         f"provide (module: importing files): {missing}")
    heavy = {m: sorted(imports[m]) for m in DAC_EDIT_ONLY if m in imports}
    assert not heavy, f"the nodes import the dac-edit stack (ComfyUI does not need it): {heavy}"


def test_requirements_txt_lists_only_what_the_nodes_import_without_upper_pins():
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    for line in filter(None, lines):
        assert "<" not in line and "==" not in line and "~=" not in line, f"upper pin in requirements.txt: {line}"
    imports = node_imports()
    comfy_reqs = set(read_requirements(os.path.join(COMFYUI, "requirements.txt")))
    for dist in requirement_names(lines):
        assert dist not in comfy_reqs, f"{dist} comes with ComfyUI: no need to list it in requirements.txt"
        assert import_names([dist]) & imports.keys(), f"requirements.txt lists {dist}, which the nodes never import"


def test_the_test_extra_covers_comfyuis_requirements():
    """The `test` extra (plus the project's dependencies) installs what ComfyUI needs headless,
    so the README's one test command can run the ComfyUI tests. A newer ComfyUI with a new
    requirement, or a requirement that our pins no longer satisfy, fails here by name."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    ours = set(requirement_names(project["dependencies"] + project["optional-dependencies"]["test"]))
    assert "requests" in ours  # app/frontend_management.py imports it without listing it
    with open(os.path.join(COMFYUI, "requirements.txt"), encoding="utf-8") as f:
        comfy_lines = [line.split("#", 1)[0].strip() for line in f]
    comfy_reqs = requirement_names(filter(None, comfy_lines))
    missing = sorted(set(comfy_reqs) - ours - NOT_IN_TEST_EXTRA.keys())
    assert not missing, f"pyproject's `test` extra lacks ComfyUI's requirements {missing}"
    # The installed versions satisfy ComfyUI's own specifiers (e.g. its exact frontend pin).
    from packaging.requirements import Requirement

    wrong = []
    for line in filter(None, comfy_lines):
        req = Requirement(line)
        if canonical(req.name) in NOT_IN_TEST_EXTRA:
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name} {version} does not satisfy ComfyUI's {req}")
    assert not wrong, wrong


LOADER = r"""
import asyncio, builtins, json, os, sys

comfyui, base, pack_dir, tests_dir = sys.argv[1:5]
sys.path.insert(0, tests_dir)
import comfy_tiny

comfy_tiny.import_comfy(comfyui, base)
import nodes  # ComfyUI's nodes.py

assert os.path.dirname(os.path.realpath(nodes.__file__)) == os.path.realpath(comfyui), nodes.__file__
before = set(sys.modules)
from_pack = []
real_import = builtins.__import__


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    # Every import statement comes here, also of modules already in sys.modules.
    if level == 0 and globals and str(globals.get("__file__") or "").startswith(pack_dir + os.sep):
        from_pack.append([os.path.relpath(globals["__file__"], pack_dir), name])
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = recording_import
try:
    loaded = asyncio.run(nodes.load_custom_node(pack_dir))
finally:
    builtins.__import__ = real_import
new = sorted(set(sys.modules) - before)
print("RESULT " + json.dumps({"loaded": loaded, "from_pack": from_pack, "new_modules": new,
                               "all_modules": sorted(sys.modules),
                               "node_ids": sorted(nodes.NODE_CLASS_MAPPINGS),
                               "base_path": __import__("folder_paths").base_path}))
"""


@pytest.fixture(scope="module")
def loaded_pack(tmp_path_factory):
    """The pack loaded by ComfyUI's own loader (nodes.load_custom_node) from a copy in a
    temporary custom_nodes/, in a fresh Python, with a recorder on every import statement."""
    base = str(tmp_path_factory.mktemp("comfyui-base"))
    pack_dir = comfy_tiny.copy_pack(os.path.join(base, "custom_nodes"))
    before = tree_state(COMFYUI)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-B", "-c", LOADER, COMFYUI, base, pack_dir, os.path.join(ROOT, "tests")],
                       capture_output=True, text=True, cwd=base, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (line,) = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    result.update(base=base, log=r.stderr, written=tree_changes(before, tree_state(COMFYUI)))
    return result


def test_comfyui_loads_the_pack_with_every_node(loaded_pack):
    from tools.workflows import load_spec

    assert loaded_pack["loaded"] is True, loaded_pack["log"][-3000:]
    assert {node.id for node in load_spec().NODES} <= set(loaded_pack["node_ids"])
    assert os.path.realpath(loaded_pack["base_path"]) == os.path.realpath(loaded_pack["base"])


def test_loading_the_pack_never_imports_the_diffusers_stack(loaded_pack):
    # The recorder saw the pack's own imports (so an import of transformers would show).
    imported = {name.split(".")[0] for _, name in loaded_pack["from_pack"]}
    assert {"torch", "comfy", "folder_paths"} <= imported, loaded_pack["from_pack"]
    by_pack = sorted({f"{file}: import {name}" for file, name in loaded_pack["from_pack"]
                      if name.split(".")[0] in DAC_EDIT_ONLY})
    assert not by_pack, f"the pack imports the dac-edit stack: {by_pack}"
    # diffusers and peft are installed here (dac-edit needs them): neither ComfyUI nor the pack loaded them.
    assert metadata.version("diffusers") and metadata.version("peft")
    stray = [m for m in loaded_pack["all_modules"] if m.split(".")[0] in ("diffusers", "peft")]
    assert not stray, stray


def test_loading_the_pack_writes_nothing_into_comfyui(loaded_pack):
    assert not loaded_pack["written"], f"written into COMFYUI_PATH: {loaded_pack['written'][:20]}"
    assert os.path.isdir(os.path.join(loaded_pack["base"], "input"))  # where folder_paths put it instead
