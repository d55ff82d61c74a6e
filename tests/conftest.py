"""Shared fixtures. Tiny models come from dac_core.tiny, the one place that builds them."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread unless told otherwise (set before anything imports torch). Measured on the
# 2-core machines with other jobs running: the suite without ComfyUI took 4.2 min with one
# thread against 12.8 min with two, and the ComfyUI tests' training fixture 6 s against 110 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402  (after OMP_NUM_THREADS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFYUI = os.environ.get("COMFYUI_PATH")
# In CI (CI=true) with COMFYUI_PATH set, the ComfyUI tests must run: a skip is a failure.
STRICT_COMFYUI = bool(COMFYUI) and os.environ.get("CI", "").lower() in ("1", "true", "yes")
_comfyui_before: dict[str, int] | None = None


def tree_state(path: str) -> dict[str, int]:
    """{relative path: mtime_ns} of everything under `path` (to check that nothing wrote there)."""
    state = {}
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            full = os.path.join(folder, name)
            state[os.path.relpath(full, path)] = os.lstat(full).st_mtime_ns
    state["."] = os.lstat(path).st_mtime_ns
    return state


def tree_changes(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Paths created, removed or modified between two tree_state() calls."""
    return sorted({p for p in before.keys() | after.keys() if before.get(p) != after.get(p)})


def pytest_configure(config):
    global _comfyui_before
    config.addinivalue_line("markers", "comfyui: needs a ComfyUI checkout (COMFYUI_PATH); never skipped in CI")
    if COMFYUI:
        if not os.path.isfile(os.path.join(COMFYUI, "main.py")) or not os.path.isdir(os.path.join(COMFYUI, "comfy")):
            raise pytest.UsageError(f"COMFYUI_PATH={COMFYUI!r} is not a ComfyUI checkout (no main.py and comfy/)")
        _comfyui_before = tree_state(COMFYUI)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_COMFYUI and report.skipped and item.get_closest_marker("comfyui") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"ComfyUI test skipped in CI (CI=true, COMFYUI_PATH={COMFYUI}): {reason}"


def pytest_sessionfinish(session, exitstatus):
    """Nothing may write into COMFYUI_PATH (it can be a shared, read-only checkout)."""
    if _comfyui_before is None:
        return
    changed = tree_changes(_comfyui_before, tree_state(COMFYUI))
    if changed:
        print(f"\nFAILED: the tests wrote into COMFYUI_PATH={COMFYUI}: {changed[:20]}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class HugeLossScale(torch.amp.GradScaler):
    """torch.amp.GradScaler with a first loss scale (2**40) so large that the float16 backward
    overflows until the scaler has backed off: skipped steps, on purpose."""

    def __init__(self, device="cuda", **kwargs):
        super().__init__(device, init_scale=2.0**40, **kwargs)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny diffusers folders, {"sd1": path, "sd2": path, "sdxl": path}, built once per session."""
    from dac_core.tiny import FLAVOURS, save_tiny_model

    base = tmp_path_factory.mktemp("models")
    return {flavour: save_tiny_model(str(base / flavour), flavour) for flavour in FLAVOURS}


@pytest.fixture
def make_backend():
    """A fresh CPU DiffusersBackend on a tiny model: make_backend("sd1" | "sd2" | "sdxl", exact_reference=False)."""
    from dac_core.diffusers_backend import DiffusersBackend
    from dac_core.tiny import tiny_pipeline

    def make(flavour: str = "sd1", exact_reference: bool = False):
        return DiffusersBackend(tiny_pipeline(flavour), device="cpu", exact_reference=exact_reference)

    return make


@pytest.fixture
def source_image():
    from dac_core.tiny import demo_image

    return demo_image((64, 64))


@pytest.fixture
def latents(source_image):
    """(backend-independent) pixels of the source image at 64x64, [1, 3, 64, 64]."""
    from dac_core.image import image_to_tensor

    return image_to_tensor(source_image, (64, 64))
