"""The world model that ships with the package, and the world demo on it.

Skipped while no trained world model is in dac_core/assets/world_model (issue 4: the
model trained so far does not reach the quality target, so it is not shipped)."""

import os

import pytest
import torch

from dac_core import bench
from dac_core import world_model as M

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(M.SHIPPED, "model_index.json")),
                                reason="no trained world model ships yet (issue 4)")


@pytest.fixture(scope="module")
def backend():
    from dac_core.diffusers_backend import DiffusersBackend

    return DiffusersBackend.from_model(M.shipped_model_path(), device="cpu")


def test_shipped_model_loads_as_the_documented_architecture(backend):
    pipe = backend.pipe
    assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and "CLIPTokenizer" in type(pipe.tokenizer).__name__
    assert tuple(pipe.unet.config.block_out_channels) == M.UNET_CONFIG["block_out_channels"]
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.scaling_factor != 0.18215  # set by the training
    for model in (pipe.vae, pipe.unet, pipe.text_encoder):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in M.WORDS)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(M.SHIPPED) for f in fs)
    assert size <= 30 * 2**20


def test_shipped_model_draws_what_unseen_captions_say(backend):
    # 12 scenes of the evaluation stream (not in the training set); the full figure (50 scenes)
    # is in assets/world_model/training.json and the README
    rates = M.evaluate(backend.pipe, n=12, exclude=M.training_captions())
    assert rates["all"] >= 0.75, rates


def test_demo_edit_changes_the_colour_and_keeps_the_rest(tmp_path, capsys):
    """The world demo end to end through dac-edit on the shipped model."""
    from PIL import Image

    from dac_core.cli import main

    settings = [f"--{k.replace('_', '-')}={v}" for k, v in M.DAC_SETTINGS.items()]
    assert main([M.DEMO_SOURCE, "--model", M.SHIPPED, "--source", M.DEMO_CASE.source_prompt, "--target",
                 M.DEMO_CASE.target_prompt, "--workdir", str(tmp_path / "work"), *settings]) == 0
    edited = Image.open(tmp_path / "work" / "edit.png")
    result = bench.score(M.DEMO_CASE, edited)
    assert result.edit_ok, "the circle did not turn green"
    assert result.preserved, f"something else changed (PSNR outside the objects {result.psnr:.1f} dB)"
    picture = Image.open(tmp_path / "work" / "before_after.png")
    assert picture.width > 2 * picture.height  # before and after, side by side
    assert str(tmp_path / "work" / "before_after.png") in capsys.readouterr().out
