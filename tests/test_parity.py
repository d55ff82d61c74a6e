"""Cross-backend parity: the same tiny weights in diffusers and in ComfyUI, the same seed
and steps, give matching losses and LoRA deltas (needs COMFYUI_PATH).

Tolerance: losses within 1e-4 relative at every step; LoRA deltas within 1e-2 relative
overall, and no layer's difference above 5e-2 of the largest layer delta. (Adam divides each
update by the gradient's running RMS, so layers with tiny gradients, the time-embedding
projections, turn float-level differences between the backends, such as ComfyUI's float
timestep vs diffusers' integer one, into visible direction changes; their size stays tiny.)
Measured on 2 CPU cores, fp32, 15 + 10 steps: UNet LoRA 3.6e-3 overall / 9.9e-3 worst
layer; text-encoder LoRA 1.6e-6 / 1.7e-6. Both backends draw the
fresh LoRAs from the same generator (dac_core.lora.fresh_lora) and share the latent
distribution (the ComfyUI test VAE is TAESD, not the tiny diffusers VAE).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import comfy_tiny

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


def test_abductions_match_across_backends():
    from dac_core.backend import LatentDistribution
    from dac_core.diffusers_backend import DiffusersBackend

    comfy_tiny.import_pack()
    stages = importlib.import_module("dac_pack.dac_core.stages")
    ComfyBackend = importlib.import_module("dac_pack.nodes.comfy_backend").ComfyBackend

    diffusers_be = DiffusersBackend(comfy_tiny.parity_pipeline(COMFYUI), device="cpu")
    g = torch.Generator().manual_seed(5)
    latents = LatentDistribution(torch.randn(1, 4, 8, 8, generator=g), 0.1 * torch.rand(1, 4, 8, 8, generator=g))

    settings = stages.TrainSettings(steps=15, lr=1e-3, rank=4, seed=7)
    text_settings = stages.TrainSettings(steps=10, lr=1e-3, rank=4, seed=7)

    with torch.inference_mode():
        comfy_be = ComfyBackend(comfy_tiny.tiny_model("sd1"), comfy_tiny.tiny_clip())
        with torch.inference_mode(False), torch.enable_grad():
            cond_c = comfy_be.encode_prompts(["a red disc"]).detach()
            u_c = stages.abduct_unet_lora(comfy_be, latents, "a red disc", settings)
    with torch.no_grad():
        cond_d = diffusers_be.encode_prompts(["a red disc"])
    assert torch.allclose(cond_c, cond_d, atol=1e-5)  # same text embedding from both text encoders
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
