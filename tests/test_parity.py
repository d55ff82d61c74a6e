"""Cross-backend parity: the same tiny weights in diffusers and in ComfyUI, the same seed
and steps, give matching losses and LoRA deltas (needs COMFYUI_PATH), for an SD 1.x-style
(epsilon, CLIP-L) and an SD 2.x-style model (v-prediction, OpenCLIP-H-shaped text encoder
read at the penultimate layer, as ComfyUI builds it: one layer more than diffusers') and an
SDXL-style model.

Tolerance: losses within 1e-4 relative at every step; LoRA deltas within 1e-2 relative
overall, and no layer's difference above 5e-2 of the largest layer delta. (Adam divides each
update by the gradient's running RMS, so layers with tiny gradients, the time-embedding
projections, turn float-level differences between the backends, such as ComfyUI's float
timestep vs diffusers' integer one, into visible direction changes; their size stays tiny.)
Measured on 2 CPU cores, fp32, 15 + 10 steps, no gradient clipping: SD 1.x-style UNet LoRA
6.9e-3 overall / 1.8e-2 worst layer, text-encoder LoRA 1.3e-5 / 3.1e-5; SD 2.x-style
(v-prediction) 6.4e-3 / 1.5e-2 and 3.1e-6 / 3.6e-6; SDXL-style (two text encoders, pooled
embedding and size ids) 6.0e-3 / 1.6e-2 and 7.1e-5 / 2.1e-4. Both backends draw the
fresh LoRAs from the same generator (dac_core.lora.fresh_lora) and share the latent
distribution (the ComfyUI test VAE is TAESD, not the tiny diffusers VAE).
"""

from __future__ import annotations

import importlib

import comfy_tiny
import pytest
import torch

COMFYUI = comfy_tiny.comfyui_path()
pytestmark = comfy_tiny.NEEDS_COMFYUI
if COMFYUI:
    comfy_tiny.import_comfy(COMFYUI)


def lora_difference(a, b) -> tuple[float, float]:
    """(relative difference of all deltas together, worst layer's difference relative to the
    largest layer delta of the LoRA)."""
    assert set(a.layers) == set(b.layers)
    diffs = {stem: float((a.layers[stem].delta() - b.layers[stem].delta()).norm()) for stem in a.layers}
    norms = {stem: float(a.layers[stem].delta().norm()) for stem in a.layers}
    overall = (sum(d**2 for d in diffs.values()) / sum(n**2 for n in norms.values())) ** 0.5
    worst = max(diffs.values()) / max(norms.values())
    print(f"LoRA delta difference: overall {overall:.2e}, worst layer {worst:.2e} of the largest layer delta")
    return overall, worst


@pytest.mark.parametrize("flavour", ["sd1", "sd2", "sdxl"])
def test_abductions_match_across_backends(flavour):
    from dac_core.backend import LatentDistribution
    from dac_core.diffusers_backend import DiffusersBackend

    comfy_tiny.import_pack()
    stages = importlib.import_module("dac_pack.dac_core.stages")
    ComfyBackend = importlib.import_module("dac_pack.nodes.comfy_backend").ComfyBackend

    diffusers_be = DiffusersBackend(comfy_tiny.parity_pipeline(COMFYUI, flavour), device="cpu")
    g = torch.Generator().manual_seed(5)
    latents = LatentDistribution(torch.randn(1, 4, 8, 8, generator=g), 0.1 * torch.rand(1, 4, 8, 8, generator=g))

    settings = stages.TrainSettings(steps=15, learning_rate=1e-3, rank=4, seed=7)
    text_settings = stages.TrainSettings(steps=10, learning_rate=1e-3, rank=4, seed=7)

    with torch.inference_mode():
        comfy_be = ComfyBackend(comfy_tiny.tiny_model(flavour), comfy_tiny.tiny_clip(flavour))
        # SDXL: a photo of 96 x 64 trained at 64 x 64 (the size ids differ, in the same order in both)
        comfy_be.original_size = diffusers_be.original_size = (96, 64)
        with torch.inference_mode(False), torch.enable_grad():
            cond_c = comfy_be.encode_prompts(["a red disc"]).detach()
            u_c = stages.abduct_unet_lora(comfy_be, latents, "a red disc", settings)
    with torch.no_grad():
        cond_d = diffusers_be.encode_prompts(["a red disc"])
    assert torch.allclose(cond_c.context, cond_d.context, atol=1e-5)  # same text embedding from both text encoders
    if flavour == "sdxl":  # and the same pooled embedding
        assert comfy_be.architecture == diffusers_be.architecture == "sdxl"
        assert torch.allclose(cond_c.pooled, cond_d.pooled, atol=1e-5)
    else:
        assert cond_c.pooled is None and cond_d.pooled is None
    expected = "v_prediction" if flavour == "sd2" else "epsilon"
    assert comfy_be.prediction_type == diffusers_be.prediction_type == expected
    u_d = stages.abduct_unet_lora(diffusers_be, latents, "a red disc", settings)

    assert u_c.losses == pytest.approx(u_d.losses, rel=1e-4)
    overall, worst = lora_difference(u_c.lora, u_d.lora)
    assert overall < 1e-2 and worst < 5e-2

    # Abduction-2 from the same UNet LoRA and the same (fresh, zero-up) text LoRA draw.
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            d_c = stages.abduct_text_lora(comfy_be, latents, "a red disc with a hat", u_d.lora, text_settings,
                                          eta=0.8)
    d_d = stages.abduct_text_lora(diffusers_be, latents, "a red disc with a hat", u_d.lora, text_settings, eta=0.8)
    assert d_c.losses == pytest.approx(d_d.losses, rel=1e-4)
    overall, worst = lora_difference(d_c.lora, d_d.lora)
    assert overall < 1e-2 and worst < 5e-2


@pytest.fixture(scope="module")
def sd2_backends():
    """(ComfyBackend, DiffusersBackend) of the same SD 2.x-style tiny model."""
    from dac_core.diffusers_backend import DiffusersBackend

    comfy_tiny.import_pack()
    ComfyBackend = importlib.import_module("dac_pack.nodes.comfy_backend").ComfyBackend
    with torch.inference_mode():
        comfy_be = ComfyBackend(comfy_tiny.tiny_model("sd2"), comfy_tiny.tiny_clip("sd2"))
    return comfy_be, DiffusersBackend(comfy_tiny.parity_pipeline(COMFYUI, "sd2"), device="cpu")


def text_lora_of(backend, stages):
    """A short Abduction-2 on `backend` (its own U, fresh), returning Delta."""
    from dac_core.backend import LatentDistribution

    g = torch.Generator().manual_seed(5)
    latents = LatentDistribution(torch.randn(1, 4, 8, 8, generator=g), 0.1 * torch.rand(1, 4, 8, 8, generator=g))
    settings = stages.TrainSettings(steps=2, learning_rate=1e-3, rank=4)
    u = stages.abduct_unet_lora(backend, latents, "a red disc", settings).lora
    return u, stages.abduct_text_lora(backend, latents, "a red disc with a hat", u,
                                      stages.TrainSettings(steps=6, learning_rate=1e-2, rank=4), eta=0.8).lora


def encoded_with(backend, name, lora, strength):
    backend.attach_lora(name, lora)
    backend.set_lora_scale(name, strength)
    with torch.no_grad():
        cond = backend.encode_prompts(["a red disc with a hat"])
    backend.detach_lora(name)
    return cond


@pytest.mark.parametrize("trained_in", ["comfyui", "diffusers"])
def test_sd2_text_lora_moves_between_backends(sd2_backends, trained_in):
    """ComfyUI's SD 2.x text encoder has a 24th layer it never reads; a Delta trained there
    holds only the layers that reach the output, so diffusers' 23-layer encoder takes it, and
    a diffusers Delta attaches in ComfyUI: the same -Delta embedding in both, and it samples."""
    from dac_core.backend import TEXT_DELTA

    comfy_be, diffusers_be = sd2_backends
    stages = importlib.import_module("dac_pack.dac_core.stages")
    n_comfy = len(comfy_be.clip.cond_stage_model.clip_h.transformer.text_model.encoder.layers)
    n_diffusers = len(diffusers_be.text_encoder.text_model.encoder.layers) if hasattr(
        diffusers_be.text_encoder, "text_model") else len(diffusers_be.text_encoder.encoder.layers)
    assert n_comfy == n_diffusers + 1
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            trainer = comfy_be if trained_in == "comfyui" else diffusers_be
            u, delta = text_lora_of(trainer, stages)
    layers = sorted({int(stem.split("_layers_")[1].split("_")[0]) for stem in delta.layers})
    assert layers == list(range(n_diffusers)) and len(delta) == 4 * n_diffusers
    assert all(float(layer.up.abs().sum()) > 0 for layer in delta.layers.values())

    with torch.inference_mode():
        with torch.inference_mode(False):
            comfy_plain = encoded_with(comfy_be, TEXT_DELTA, delta, 0.0)
            comfy_minus = encoded_with(comfy_be, TEXT_DELTA, delta, -1.0)
    diffusers_plain = encoded_with(diffusers_be, TEXT_DELTA, delta, 0.0)
    diffusers_minus = encoded_with(diffusers_be, TEXT_DELTA, delta, -1.0)
    assert torch.allclose(comfy_plain.context, diffusers_plain.context, atol=1e-5)  # the same encoder in both
    assert not torch.allclose(comfy_minus.context, comfy_plain.context, atol=1e-4)  # Delta acts
    assert torch.allclose(comfy_minus.context, diffusers_minus.context, atol=1e-5)  # and acts the same

    other = diffusers_be if trained_in == "comfyui" else comfy_be
    with torch.inference_mode():
        with torch.inference_mode(False):
            latents = stages.counterfactual_sample(other, "a red disc with a hat", u, delta, (64, 64), steps=2,
                                                   decode=False)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
