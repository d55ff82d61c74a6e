"""Gradient checkpointing in the ComfyUI backend really recomputes the UNet's layers in the
backward pass (needs COMFYUI_PATH).

ComfyUI runs a UNet block's layers one by one (openaimodel.forward_timestep_embed) and never
calls the block's own forward, so patches on the blocks' forwards recomputed nothing: the
training was the same as without (tests/test_comfyui.py checks that) and so was its memory.
Here calls into ResBlocks and spatial transformers of each part of the UNet are counted: once
per training step without checkpointing, twice with it, and the LoRA gradients agree to 1e-6 of the largest
entry (the recomputation repeats the same operations).
"""

from __future__ import annotations

import importlib

import comfy_tiny
import torch

COMFYUI = comfy_tiny.comfyui_path()
pytestmark = comfy_tiny.NEEDS_COMFYUI
if COMFYUI:
    comfy_tiny.import_comfy(COMFYUI)


def one_step(checkpointing: bool):
    comfy_tiny.import_pack()
    cb = importlib.import_module("dac_pack.nodes.comfy_backend")
    lora = importlib.import_module("dac_pack.dac_core.lora")
    names = importlib.import_module("dac_pack.dac_core.backend")
    with torch.inference_mode():
        backend = cb.ComfyBackend(comfy_tiny.tiny_model("sd1"), comfy_tiny.tiny_clip("sd1"),
                                  gradient_checkpointing=checkpointing)
    unet = backend.model.model.diffusion_model
    # sub-modules each layer calls (through __call__, so in the recomputation too)
    counted = {"input resblock": unet.input_blocks[1][0].in_layers, "input transformer": unet.input_blocks[1][1].norm,
               "middle resblock": unet.middle_block[0].in_layers, "output transformer": unet.output_blocks[-1][1].norm}
    calls = dict.fromkeys(counted, 0)
    hooks = [m.register_forward_pre_hook(lambda m, a, label=label: calls.update({label: calls[label] + 1}))
             for label, m in counted.items()]
    g = torch.Generator().manual_seed(0)
    u = lora.fresh_lora(backend.lora_shapes(names.UNET), 4, g)
    for layer in u.layers.values():
        layer.up.normal_(0, 0.05, generator=g)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            params = backend.attach_lora(names.UNET, u, trainable=True)
            cond = backend.encode_prompts(["a red disc"]).detach()
            loss = backend.loss(torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g),
                                torch.tensor([300]), cond).sum()
            loss.backward()
    finally:
        cb.release(backend.model, backend.clip.patcher)
        for h in hooks:
            h.remove()
    return calls, [p.grad for p in params]


def test_checkpointing_recomputes_each_layer_in_the_backward_pass():
    plain_calls, plain_grads = one_step(False)
    ckpt_calls, ckpt_grads = one_step(True)
    assert plain_calls == dict.fromkeys(plain_calls, 1)
    assert ckpt_calls == dict.fromkeys(ckpt_calls, 2)
    largest = max(float(g.abs().max()) for g in plain_grads)
    assert max(float((a - b).abs().max()) for a, b in zip(ckpt_grads, plain_grads)) <= 1e-6 * largest
