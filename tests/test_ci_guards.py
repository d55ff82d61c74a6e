"""conftest.py's guards, run on a throwaway project in a fresh pytest: in CI (CI=true with
COMFYUI_PATH set) a skipped ComfyUI test fails, and any run that writes into COMFYUI_PATH fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

from conftest import ROOT

SKIPPED_COMFYUI_TEST = """
    import pytest

    @pytest.mark.comfyui
    @pytest.mark.skipif(True, reason="ComfyUI is not importable")
    def test_needs_comfyui():
        pass

    @pytest.mark.skip(reason="not a ComfyUI test")
    def test_other():
        pass
"""


def run_pytest(tmp_path, test_code: str, **env_extra) -> subprocess.CompletedProcess:
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), project / "conftest.py")
    (project / "test_guarded.py").write_text(textwrap.dedent(test_code))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(COMFYUI_PATH=str(comfyui), **env_extra)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(project)],
                          cwd=project, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_in_ci_a_skipped_comfyui_test_fails(tmp_path):
    r = run_pytest(tmp_path, SKIPPED_COMFYUI_TEST, CI="true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ComfyUI test skipped in CI" in r.stdout and "ComfyUI is not importable" in r.stdout
    assert "SKIPPED" in r.stdout and "not a ComfyUI test" in r.stdout  # other skips stay skips


def test_outside_ci_a_comfyui_test_may_be_skipped(tmp_path):
    r = run_pytest(tmp_path, SKIPPED_COMFYUI_TEST, CI="false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout


def test_a_run_that_writes_into_comfyui_path_fails(tmp_path):
    r = run_pytest(tmp_path, """
        import os

        def test_writes():
            os.makedirs(os.path.join(os.environ["COMFYUI_PATH"], "input"))
    """)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    assert "wrote into COMFYUI_PATH" in r.stderr and "'input'" in r.stderr
