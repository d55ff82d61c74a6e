"""Packaging rules: the pack's entry point is cheap, dac_core never touches comfy."""

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


def test_dac_core_never_imports_comfy():
    folder = os.path.join(ROOT, "dac_core")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m == "comfy" or m.startswith(("comfy.", "comfy_")) for m in mods), (name, mods)


def test_code_passes_ruff_with_the_configured_rules():
    """pyproject's [tool.ruff.lint] rules, which include the registry's (no exec / eval)."""
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
