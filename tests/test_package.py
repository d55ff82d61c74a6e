"""Packaging rules: the pack's entry point is cheap, dac_core never touches comfy, the library
never imports the lab (dac_core.world)."""

import ast
import os
import subprocess
import sys

from conftest import ROOT


def test_pack_entry_point_imports_without_comfy_or_torch():
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from tools.pack import import_pack, node_spec\n"
        "m = import_pack(); node_spec()  # the node schemas are plain data too\n"
        "heavy = [n for n in ('torch', 'diffusers', 'transformers', 'comfy') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(m.__version__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    import dac_core

    assert r.stdout.strip() == dac_core.__version__


def test_versions_agree():
    import tomllib

    import dac_core

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["version"] == dac_core.__version__
    assert "comfyui" not in project["name"].lower()


def _python_files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".py"))


def _imported_modules(path: str, package: str) -> list[str]:
    """Every module an import statement in the file names (absolute; anywhere in the file,
    functions included), and for `from X import a` also X.a (a may be a submodule)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    mods = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            mods += [base] + [f"{base}.{a.name}" for a in node.names]
    return mods


def _package_of(path: str) -> str:
    return ".".join(os.path.relpath(os.path.dirname(path), ROOT).split(os.sep))


def test_dac_core_never_imports_comfy():
    for path in _python_files(os.path.join(ROOT, "dac_core")):
        mods = _imported_modules(path, _package_of(path))
        assert not any(m == "comfy" or m.startswith(("comfy.", "comfy_")) for m in mods), (path, mods)


def _is_lab(module: str) -> bool:
    return module == "dac_core.world" or module.startswith("dac_core.world.")


def test_the_library_never_imports_the_lab():
    """dac_core.world (the synthetic world, its model, the benchmark) is a lab on top of the
    library: no module of dac_core outside it imports it, not even lazily."""
    folder = os.path.join(ROOT, "dac_core")
    library = [p for p in _python_files(folder) if not _is_lab(_package_of(p))]
    assert os.path.join(folder, "cli.py") in library and os.path.join(folder, "world", "scene.py") not in library
    for path in library:
        mods = _imported_modules(path, _package_of(path))
        assert not any(_is_lab(m) for m in mods), (path, [m for m in mods if _is_lab(m)])
    # and at run time: every library module, and `dac-edit --demo` up to the edit itself
    code = (
        "import importlib, pkgutil, sys\n"
        "import dac_core, dac_core.edit\n"
        "for m in pkgutil.iter_modules(dac_core.__path__):\n"
        "    if m.name != 'world': importlib.import_module('dac_core.' + m.name)\n"
        "from dac_core.cli import main\n"
        "from dac_core.errors import DACError\n"
        "def stub(*a, **k): raise DACError('stub')\n"
        "dac_core.edit.edit = stub\n"
        "assert main(['--demo', '--workdir', 'unused']) == 1\n"
        "lab = [m for m in sys.modules if m == 'dac_core.world' or m.startswith('dac_core.world.')]\n"
        "assert not lab, lab\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dac-edit: error: stub" in r.stderr, r.stderr[-3000:]


def test_code_passes_ruff_with_the_configured_rules():
    """pyproject's [tool.ruff.lint] rules, which include the registry's (no exec / eval)."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
