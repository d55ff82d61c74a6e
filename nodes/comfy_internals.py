"""Every use of a semi-private ComfyUI internal, in one place.

The rest of the pack uses ComfyUI's public surface (ModelPatcher.clone / add_weight_wrapper /
add_object_patch / add_wrapper / set_model_compute_dtype, CLIP.tokenize / encode_from_tokens,
VAE.encode / decode, comfy.sample, comfy.utils.ProgressBar, folder_paths). What ComfyUI does
not promise to keep (module-level lists, private attributes, patch uuids, a patcher's object
patches, a layer class's forward signature, the VAE's posterior) is reached only through the
functions below, so a newer ComfyUI that moves them needs this one file changed.

Tested with ComfyUI 0.3.64 (Comfy-Org/ComfyUI a125cd84).
"""

from __future__ import annotations

import re
import types
import uuid

import comfy.clip_model
import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.utils
import torch

TESTED_COMFYUI_VERSIONS = ("0.3.64",)


# --- weight wrappers --------------------------------------------------------------------
def has_weight_function(module: torch.nn.Module) -> bool:
    """A comfy.ops layer: ComfyUI calls its `weight_function`s on every forward."""
    return hasattr(module, "weight_function")


def weight_functions(module: torch.nn.Module) -> list:
    """The functions ComfyUI applies to a comfy.ops layer's weight on this forward (the
    weight wrappers of the patcher loaded on it)."""
    return list(getattr(module, "weight_function", []))


def layer_weight(module: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The weight a comfy.ops layer computes with for an input like `like` (its dtype and
    device): cast as ComfyUI casts it, with its weight functions applied."""
    weight, _ = comfy.ops.cast_bias_weight(module, like)
    return weight


def wrapped_keys(patcher) -> set[str]:
    """The weight keys that already carry a weight wrapper on this patcher."""
    return set(patcher.weight_wrapper_patches)


def remove_weight_wrapper(patcher, key: str, function) -> None:
    """Take one wrapper off `key` (ModelPatcher has add_weight_wrapper but no remove)."""
    remaining = [f for f in patcher.weight_wrapper_patches.get(key, []) if f is not function]
    if remaining:
        patcher.weight_wrapper_patches[key] = remaining
    else:
        patcher.weight_wrapper_patches.pop(key, None)
    patcher.patches_uuid = uuid.uuid4()  # makes the next load re-apply the wrappers


def unload(*patchers) -> None:
    """Unload (and so unpatch) these patchers from ComfyUI's loaded-model list and clear the
    weight wrappers they installed (ComfyUI clears them only at the next load)."""
    mm = comfy.model_management
    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if any(loaded.model is p for p in patchers if p is not None):
            patcher = loaded.model
            mm.current_loaded_models.pop(i).model_unload()
            for m in patcher.model.modules():
                if has_weight_function(m):
                    m.weight_function, m.bias_function = [], []


def get_weight(model: torch.nn.Module, key: str) -> torch.Tensor:
    return comfy.utils.get_attr(model, key)


def unet_lora_keys(patcher) -> dict:
    """LoRA file key (kohya, diffusers, LDM names) -> the UNet weight key it patches."""
    return comfy.lora.model_lora_keys_unet(patcher.model, {})


def text_lora_keys(clip) -> dict:
    """LoRA file key -> the text-encoder weight key it patches."""
    return comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})


# --- text encoder -------------------------------------------------------------------------
def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without the in-place `x +=` (breaks backward)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def patch_clip_layers_out_of_place(patcher) -> None:
    """Object patches so a CLIP text encoder can be back-propagated through."""
    for n, m in patcher.model.named_modules():
        if isinstance(m, comfy.clip_model.CLIPLayer):
            patcher.add_object_patch(f"{n}.forward", types.MethodType(_clip_layer_forward, m))


def text_layers_used(clip, pooled_from: str | None = None) -> dict[str, int]:
    """For each text encoder inside `clip` ("clip_l", "clip_h", "clip_g"): how many of its
    transformer layers reach the output the UNet reads. SD 2.x builds OpenCLIP-H with 24
    layers and reads the penultimate one, so its layer 23 never matters; CLIP Set Last
    Layer (clip skip) cuts SD 1.x likewise; SDXL reads CLIP-L's penultimate layer. The
    encoder `pooled_from` (SDXL: "clip_g") also makes the pooled output the UNet takes,
    from its last layer: all its layers count."""
    used = {}
    csm = clip.cond_stage_model
    for name, sub in csm.named_children():
        if not hasattr(sub, "num_layers") or not hasattr(sub, "layer"):
            continue
        n = sub.num_layers
        idx = clip.layer_idx if clip.layer_idx is not None else (sub.layer_idx if sub.layer == "hidden" else None)
        if idx is not None and abs(idx) <= n and name != pooled_from:
            n = (idx % n) + 1
        used[name] = n
    return used


_TEXT_LAYER = re.compile(r"^(?:[^.]*\.)?(clip_\w+)\.transformer\.text_model\.encoder\.layers\.(\d+)\.")


def keys_reaching_output(keys: dict[str, str], clip, pooled_from: str | None = None) -> dict[str, str]:
    """The entries of `keys` (LoRA stem -> text-encoder weight key) whose layer reaches the
    output (not SD 2.x's unused layer 23): only those are trained and saved, so the file fits
    diffusers' 23-layer SD 2.x encoder. Keys outside the encoder layers are kept."""
    used = text_layers_used(clip, pooled_from)
    out = {}
    for stem, key in keys.items():
        m = _TEXT_LAYER.match(key)
        if m is None or int(m.group(2)) < used.get(m.group(1), 1 << 30):
            out[stem] = key
    return out


# --- diffusion model ------------------------------------------------------------------------
def architecture(patcher) -> str | None:
    """"sd" (SD 1.x / 2.x: text cross-attention only), "sdxl" (SDXL and its distilled
    variants: plus the pooled embedding and size ids as `y`), or None for any other model
    (SD 2.x unCLIP, the SDXL refiner, inpainting or instruct models with concat inputs, ...)."""
    model = patcher.model
    if getattr(model, "concat_keys", ()) or getattr(model, "inpaint_model", False):
        return None
    if type(model) is comfy.model_base.BaseModel:
        return "sd"
    if type(model) is comfy.model_base.SDXL:
        return "sdxl"
    return None


def sdxl_adm(patcher, pooled: torch.Tensor, width: int, height: int, target_width: int,
             target_height: int) -> torch.Tensor:
    """SDXL's `y` (pooled embedding, then the embedded original size, crop 0 and target
    size), as ComfyUI's conditioning would give it; differentiable in `pooled`."""
    return patcher.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                    target_width=target_width, target_height=target_height,
                                    device=pooled.device).to(pooled.device)


def prediction_type(model_sampling) -> str | None:
    """"epsilon" or "v_prediction" for the discrete-time SD 1.x / 2.x samplings, else None."""
    ms = comfy.model_sampling
    if not isinstance(model_sampling, ms.ModelSamplingDiscrete) or isinstance(model_sampling, ms.StableCascadeSampling):
        return None
    if isinstance(model_sampling, ms.EDM) or not isinstance(model_sampling, ms.EPS):
        return None
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.X0):
        return None
    return "epsilon"


def unet_state_dict(patcher) -> dict[str, torch.Tensor]:
    return patcher.model.diffusion_model.state_dict()


def lora_layer(patcher, weight_key: str) -> torch.nn.Linear | torch.nn.Conv2d | None:
    """The Linear or Conv2d layer whose weight is `weight_key`, if a LoRA on it can also be
    computed on the activations (a convolution with zero padding, no dilation, no groups);
    else None."""
    layer = comfy.utils.get_attr(patcher.model, weight_key.rsplit(".", 1)[0])
    if isinstance(layer, torch.nn.Linear):
        return layer
    if isinstance(layer, torch.nn.Conv2d) and layer.padding_mode == "zeros" and layer.groups == 1 and all(
            d == 1 for d in layer.dilation) and not isinstance(layer.padding, str):
        return layer
    return None


def patch_layer_forward(patcher, weight_key: str, make):
    """An object patch on the forward of the layer whose weight is `weight_key`:
    `make(layer, original)` returns the new forward, `original` being the forward it stands
    in for on this patcher (an object patch the patcher already carries, such as a DAC
    model's fed to another DAC node, else the layer class's own forward; never another
    patcher's, which may be installed on the shared module). Applied on load, undone on
    unload. Returns the new forward."""
    name = weight_key.rsplit(".", 1)[0]
    layer = comfy.utils.get_attr(patcher.model, name)
    key = f"{name}.forward"
    original = patcher.object_patches.get(key) or types.MethodType(type(layer).forward, layer)
    forward = make(layer, original)
    patcher.add_object_patch(key, forward)
    return forward


def _checkpointed(forward):
    """Recompute the block in the backward pass instead of keeping its activations."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def checkpoint_unet_blocks(patcher) -> None:
    """Gradient checkpointing for an SD UNet: each layer of its input, middle and output blocks
    (ResBlock, spatial transformer, down/upsampler) recomputed in the backward pass, as object
    patches on the patcher: applied on load, undone on unload. The patches go on the layers:
    ComfyUI runs a block's layers one by one (openaimodel.forward_timestep_embed) and never
    calls the block's own forward."""
    unet = patcher.model.diffusion_model
    for group in ("input_blocks", "middle_block", "output_blocks"):
        blocks = getattr(unet, group)
        named = [(f"{group}.{i}", b) for i, b in enumerate(blocks)] if group != "middle_block" else [(group, blocks)]
        for name, block in named:
            if block is None:  # distilled SDXL UNets (KOALA) have no middle block
                continue
            for j, layer in enumerate(block):
                forward = types.MethodType(type(layer).forward, layer)
                patcher.add_object_patch(f"diffusion_model.{name}.{j}.forward", _checkpointed(forward))


def apply_model(patcher, x_t: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
    """The denoised x0 for noised latents `x_t` at `sigma`, with the patcher's wrappers and
    transformer options (what a sampler's model call does, without the guider); `y`: SDXL's
    added conditioning (`sdxl_adm`)."""
    extra = {} if y is None else {"y": y}
    return patcher.model.apply_model(x_t, sigma, c_crossattn=cond,
                                     transformer_options=patcher.model_options["transformer_options"], **extra)


def vae_posterior(vae, image: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) of the VAE's posterior for `image` [1, H, W, 3] in 0..1, unscaled, or None
    when the VAE has no Gaussian posterior of `channels` latent channels (e.g. TAESD)."""
    fsm = vae.first_stage_model
    if not (hasattr(fsm, "regularization") and hasattr(fsm, "encoder")):
        return None
    comfy.model_management.load_models_gpu([vae.patcher])
    x = vae.process_input(vae.vae_encode_crop_pixels(image).movedim(-1, 1))
    moments = fsm.encoder(x.to(vae.vae_dtype).to(vae.device))
    if getattr(fsm, "quant_conv", None) is not None:
        moments = fsm.quant_conv(moments)
    if moments.shape[1] != 2 * channels:
        return None
    mean, logvar = torch.chunk(moments.float().cpu(), 2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
