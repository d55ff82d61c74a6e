"""Shared fixtures. Tiny models come from dac_core.tiny, the one place that builds them."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny diffusers folders, {"sd1": path, "sd2": path}, built once per session."""
    from dac_core.tiny import save_tiny_model

    base = tmp_path_factory.mktemp("models")
    return {flavour: save_tiny_model(str(base / flavour), flavour) for flavour in ("sd1", "sd2")}


@pytest.fixture
def make_backend():
    """A fresh CPU DiffusersBackend on a tiny model: make_backend("sd1" | "sd2")."""
    from dac_core.diffusers_backend import DiffusersBackend
    from dac_core.tiny import tiny_pipeline

    def make(flavour: str = "sd1"):
        return DiffusersBackend(tiny_pipeline(flavour), device="cpu")

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
