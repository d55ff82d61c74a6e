"""The ComfyUI backend's two LoRA paths (through the weights, on the activations) are the same
function with the same gradients, and "auto" takes each layer its own way (needs COMFYUI_PATH).

The same tiny models, LoRAs, latents, noise and timesteps go through ComfyBackend with every
LoRA forced through the weights and forced onto the activations; the losses and the LoRA
gradients are compared. Tolerance (float32): losses within 1e-6 relative; every gradient
entry within 1e-5 of the largest gradient entry of its LoRA (a few time-embedding
projections of the tiny UNets have a true gradient of zero, so only rounding noise is left in
theirs, as tests/test_reference_semantics.py notes; measured on 2 CPU threads: losses 1.0e-7
relative, gradients 3.4e-6 (UNet LoRA) and 4.8e-6 (text-encoder LoRA) of the largest entry).
bf16 and fp16 under autocast: against the float32 step, the activation and auto paths'
losses are within one rounding unit of the dtype (2^-8, 2^-11) and their gradients no further
off (in norm) than twice the weight path's (measured: losses 1.4e-3 / 1.6e-4 at most, any
path; gradients 1.4x the weight path's at most, which is itself 3.1e-2 off in bf16 and 4.2e-3
in fp16); the gradients are float32.
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

LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-6, 1e-5


@pytest.fixture(scope="module")
def pack():
    comfy_tiny.import_pack()
    return {name: importlib.import_module(f"dac_pack.{name}")
            for name in ("nodes.comfy_backend", "nodes.comfy_internals", "dac_core.lora", "dac_core.backend")}


def circular(model):
    """What seamless-tiling nodes do to a model: every convolution pads circularly."""
    for module in model.model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.padding_mode = "circular"
    return model


def step(pack, flavour: str, stage: str, path: str, training_dtype: str = "fp32", edit_model=lambda m: m):
    """One loss and backward of Abduction-1 (U trains, per-sample strengths 1.0 / 0.6) or
    Abduction-2 (U frozen at 0.9 / 0.6, Delta trains) on a batch of two; returns the losses,
    the trained LoRA's gradients and the paths the layers took."""
    cb, lora, names = pack["nodes.comfy_backend"], pack["dac_core.lora"], pack["dac_core.backend"]
    with torch.inference_mode():  # as ComfyUI runs a node
        backend = cb.ComfyBackend(edit_model(comfy_tiny.tiny_model(flavour)), comfy_tiny.tiny_clip(flavour),
                                  training_dtype=training_dtype, lora_path=path)
    g = torch.Generator().manual_seed(0)
    u = lora.fresh_lora(backend.lora_shapes(names.UNET), 16, g)
    delta = lora.fresh_lora(backend.lora_shapes(names.TEXT_DELTA), 4, g)
    for layer in (*u.layers.values(), *delta.layers.values()):  # trained LoRAs: up is not zero
        layer.up.normal_(0, 0.05, generator=g)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if stage == "abduction1":
                params = backend.attach_lora(names.UNET, u, trainable=True)
                backend.set_lora_scale(names.UNET, torch.tensor([1.0, 0.6]))
                cond = backend.encode_prompts(["a red disc"] * 2).detach()
            else:
                backend.attach_lora(names.UNET, u)
                backend.set_lora_scale(names.UNET, torch.tensor([0.9, 0.6]))
                params = backend.attach_lora(names.TEXT_DELTA, delta, trainable=True)
                cond = backend.encode_prompts(["a red disc with a hat"] * 2)
            loss = backend.loss(x0, noise, t, cond)
            loss.sum().backward()
    finally:
        cb.release(backend.model, backend.clip.patcher)
    paths = {p for layer in backend._layers.values() for p in layer.last_paths}
    return loss.detach(), [p.grad for p in params], paths


def compare(a, b, loss_tolerance, grad_tolerance):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    loss_diff = float(((loss_a - loss_b).abs() / loss_b.abs()).max())
    largest = max(float(gb.abs().max()) for gb in grads_b)
    grad_diff = max(float((ga - gb).abs().max()) for ga, gb in zip(grads_a, grads_b)) / largest
    print(f"losses {loss_diff:.1e} relative, gradients {grad_diff:.1e} of the largest entry")
    assert all(ga.dtype == torch.float32 for ga in grads_a)
    assert loss_diff <= loss_tolerance and grad_diff <= grad_tolerance


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
@pytest.mark.parametrize("stage", ["abduction1", "abduction2"])
def test_both_paths_give_the_same_loss_and_lora_gradients(pack, flavour, stage):
    weight, activation, auto = (step(pack, flavour, stage, path) for path in ("weight", "activation", "auto"))
    assert weight[2] == set()  # no forward patches at all: ComfyUI's weight wrappers alone
    assert activation[2] == {"activation"}
    if stage == "abduction1":  # rank 16 at 8 x 8 and 4 x 4 positions: some layers each way
        assert auto[2] == {"weight", "activation"}
    compare(activation, weight, LOSS_TOLERANCE, GRAD_TOLERANCE)
    compare(auto, weight, LOSS_TOLERANCE, GRAD_TOLERANCE)


def test_convolutions_the_activation_path_cannot_compute_go_through_the_weights(pack):
    """A convolution padded other than with zeros (here circularly, as seamless-tiling nodes
    set it) keeps its LoRA in the weights even when the activation path is forced, so the
    LoRA sees the padding the layer uses: the same loss and gradients as the weight path, and
    not those of the model padded with zeros."""
    weight, activation = (step(pack, "sd1", "abduction1", path, edit_model=circular)
                          for path in ("weight", "activation"))
    compare(activation, weight, LOSS_TOLERANCE, GRAD_TOLERANCE)
    zeros = step(pack, "sd1", "abduction1", "weight")
    assert float(((zeros[0] - weight[0]).abs() / weight[0].abs()).max()) > 100 * LOSS_TOLERANCE


@pytest.mark.parametrize("stage, path", [("abduction2", "auto"), ("abduction1", "activation")])
def test_layers_whose_weight_needs_no_gradient_keep_no_weight_for_the_backward_pass(pack, stage, path):
    """A LoRA'd layer whose weight gets no gradient (U frozen in Abduction-2, whichever path
    each layer takes; U trained on the activations in Abduction-1) forms the weight it
    computed with (W + gamma * dU, or the copy of W ComfyUI hands its wrappers) again in the
    backward pass instead of keeping it: autograd would keep one as large as the layer's
    weight for every layer (3.2 GB at SD 2.1 size). The same gradients: the tests above.
    Counted: tensors autograd saves that are shaped like the UNet's LoRA'd convolution
    weights, with ComfyUI's wrappers alone (the weight path) as control."""
    shapes = {tuple(m.weight.shape) for m in comfy_tiny.tiny_model("sd1").model.diffusion_model.modules()
              if isinstance(m, torch.nn.Conv2d) and min(m.weight.shape[:2]) > 4}  # not conv_in/out: no LoRA
    saved = {}
    for run in ("weight", path):
        kept = saved[run] = []

        def pack_hook(t, kept=kept):
            if tuple(t.shape) in shapes:
                kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            paths = step(pack, "sd1", stage, run)[2]
    assert len(saved["weight"]) >= len(shapes) and saved[path] == []
    assert "activation" in paths  # the tiny UNet's frozen U takes both paths in Abduction-2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", ["abduction1", "abduction2"])
def test_half_precision_paths_are_as_accurate_as_the_weight_path(pack, dtype, stage):
    """Under autocast each path rounds differently; measured against the float32 step, the
    activation and auto paths are as accurate as the weight path (ComfyUI's wrappers alone,
    what the backend did before): losses within one rounding unit of the dtype, gradients
    no further off than twice the weight path's (in norm, over the whole LoRA)."""
    reference = step(pack, "sd1", stage, "weight")
    runs = {path: step(pack, "sd1", stage, path, dtype) for path in ("weight", "activation", "auto")}
    unit = {"bf16": 2.0**-8, "fp16": 2.0**-11}[dtype]

    def errors(run):
        loss = float(((run[0] - reference[0]).abs() / reference[0].abs()).max())
        num = sum(float((a - b).norm() ** 2) for a, b in zip(run[1], reference[1]))
        return loss, (num / sum(float(b.norm() ** 2) for b in reference[1])) ** 0.5

    weight_loss, weight_grad = errors(runs["weight"])
    for path, run in runs.items():
        loss, grad = errors(run)
        print(f"{dtype} {stage} {path}: loss {loss:.1e}, gradients {grad:.1e} (weight path {weight_grad:.1e})")
        assert all(g.dtype == torch.float32 for g in run[1])
        assert loss <= unit and grad <= 2 * weight_grad


def test_sampling_goes_through_the_weights_with_u_multiplied_out_once(pack):
    """Without gradients "auto" takes the weight path (what ComfyUI's LoRA loader merges), the
    frozen UNet LoRA's up @ down is formed once, and the output is the forced weight path's
    to the bit; the activation path gives it to float rounding."""
    cb, lora, names = pack["nodes.comfy_backend"], pack["dac_core.lora"], pack["dac_core.backend"]
    internals = pack["nodes.comfy_internals"]
    g = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3.0])
    outputs = {}
    for path in ("auto", "weight", "activation"):
        with torch.inference_mode():
            backend = cb.ComfyBackend(comfy_tiny.tiny_model("sd1"), comfy_tiny.tiny_clip("sd1"), lora_path=path)
            gu = torch.Generator().manual_seed(0)
            u = lora.fresh_lora(backend.lora_shapes(names.UNET), 16, gu)
            for layer in u.layers.values():
                layer.up.normal_(0, 0.05, generator=gu)
            backend.attach_lora(names.UNET, u)
            backend.set_lora_scale(names.UNET, 0.7)
            cond = backend.encode_prompts(["a red disc"])
            backend._load(backend.model)
            outputs[path] = [internals.apply_model(backend.model, x, sigma, cond.context) for _ in range(2)]
            wrappers = list(backend.wrappers[names.UNET].values())
            if path != "activation":
                assert all(w._product is not None for w in wrappers)
                products = [w._product for w in wrappers]
                internals.apply_model(backend.model, x, sigma, cond.context)
                assert all(w._product is p for w, p in zip(wrappers, products))  # formed once
            paths = {p for layer in backend._layers.values() for p in layer.last_paths}
            assert paths == {"auto": {"weight"}, "weight": set(), "activation": {"activation"}}[path]
            cb.release(backend.model, backend.clip.patcher)
    assert torch.equal(outputs["auto"][0], outputs["weight"][0])
    assert torch.equal(outputs["auto"][0], outputs["auto"][1])
    a, w = outputs["activation"][0], outputs["weight"][0]
    assert float((a - w).abs().max()) <= 1e-5 * float(w.abs().max())


def test_detached_loras_leave_the_layer_patches(pack):
    cb, lora, names = pack["nodes.comfy_backend"], pack["dac_core.lora"], pack["dac_core.backend"]
    with torch.inference_mode():
        backend = cb.ComfyBackend(comfy_tiny.tiny_model("sd1"), comfy_tiny.tiny_clip("sd1"))
        u = lora.fresh_lora(backend.lora_shapes(names.UNET), 4, torch.Generator().manual_seed(0))
        backend.attach_lora(names.UNET, u)
        patches = list(backend._layers.values())
        assert len(patches) == len(u.layers) and all(len(p.wrappers) == 1 for p in patches)
        backend.detach_lora(names.UNET)
        assert all(not p.wrappers for p in patches)
        backend.attach_lora(names.UNET, u)  # the same patches take the new wrappers
        assert list(backend._layers.values()) == patches and all(len(p.wrappers) == 1 for p in patches)


def test_a_dac_model_given_to_another_backend_keeps_its_layer_patches(pack):
    """Apply DAC LoRAs' MODEL fed to another DAC node: the new forward patch of a layer stands
    in for the one the MODEL carries (which handles its own LoRAs), not for the class's."""
    cb, lora, names = pack["nodes.comfy_backend"], pack["dac_core.lora"], pack["dac_core.backend"]
    with torch.inference_mode():
        model = comfy_tiny.tiny_model("sd1")
        u = lora.fresh_lora(cb.ComfyBackend(model, None).lora_shapes(names.UNET), 4, torch.Generator().manual_seed(0))
        applied, _ = cb.apply_loras(model, None, u, None, eta=1.0, beta=0.0)
        backend = cb.ComfyBackend(applied, None)
        backend.attach_lora(names.UNET, u)
        for (_, key), patch in backend._layers.items():
            assert isinstance(patch.original, cb.LayerLoRAs), key
            assert patch.original.wrappers and patch.original.wrappers[0] is not patch.wrappers[0]
