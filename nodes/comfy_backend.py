"""`DACBackend` on ComfyUI's own MODEL / CLIP / VAE objects (never converted to diffusers).

LoRAs are trainable modules attached through ModelPatcher weight wrappers, as ComfyUI's
native LoRA training does: `comfy.ops.cast_bias_weight` calls them on every forward with
the layer's weight, so autograd reaches them and their strength can change between steps.
Every other weight of a model being trained through gets an identity wrapper, which gives
autograd a normal (non-inference) copy; CLIP layers run an out-of-place forward for the
same reason. The loss is DAC's noise-prediction MSE, with the noise prediction recovered
from the model's x0 output: eps = (x_t - x0) / sigma, over the model's own model_sampling.

The input MODEL and CLIP are cloned first; nothing is attached to them.
"""

from __future__ import annotations

import types
import uuid

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy.lora import model_lora_keys_clip, model_lora_keys_unet
from ..dac_core.backend import TEXT_DELTA, TEXT_EXTRA, UNET, DACBackend, LatentDistribution, fingerprint_weights
from ..dac_core.errors import DACError
from ..dac_core.lora import LoRA, LoRALayer, fitting_part, is_text_target, is_unet_target

TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Strength:
    """A LoRA's current strength, shared by all its layers; changed between model calls."""

    def __init__(self, value: float = 1.0):
        self.value = value


class LoRAWrapper(torch.nn.Module):
    """Weight wrapper: W -> W + strength * (alpha / rank) * up @ down (float32 LoRA weights)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, strength: Strength):
        super().__init__()
        self.down = torch.nn.Parameter(down.detach().float().clone(), requires_grad=False)
        self.up = torch.nn.Parameter(up.detach().float().clone(), requires_grad=False)
        self.alpha = float(alpha)
        self.strength = strength

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.strength.value
        if s == 0:
            return weight
        delta = self.up.flatten(1) @ self.down.flatten(1)
        return weight + (delta.reshape(weight.shape) * (s * self.alpha / self.down.shape[0])).to(weight.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.nelement() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


def _identity(weight: torch.Tensor) -> torch.Tensor:
    """A wrapper that changes nothing: ComfyUI then hands the layer a copy of its weight,
    which autograd can save (base weights loaded under inference mode cannot be)."""
    return weight


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without the in-place `x +=` (breaks backward)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _checkpointed(forward):
    """Recompute the block in the backward pass instead of keeping its activations."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def lora_strength_wrapper(strength: Strength, model_sampling, schedule):
    """An APPLY_MODEL wrapper that sets the UNet LoRA strength to schedule(fraction) for the
    sigma of each call (fraction = timestep / 999): DAC's gamma(t) under any sampler."""

    def wrapper(executor, x, t, *args, **kwargs):
        frac = model_sampling.timestep(t).float().cpu() / 999.0
        if bool((frac == frac[0]).all()):
            strength.value = float(schedule(frac[:1])[0])
            return executor(x, t, *args, **kwargs)
        outs = []  # samples at different noise levels in one batch: one call per sample
        for i in range(x.shape[0]):
            strength.value = float(schedule(frac[i : i + 1])[0])
            sub = [a[i : i + 1] if isinstance(a, torch.Tensor) and a.shape[:1] == x.shape[:1] else a for a in args]
            outs.append(executor(x[i : i + 1], t[i : i + 1], *sub, **kwargs))
        return torch.cat(outs)

    return wrapper


def _existing(model: torch.nn.Module, key_map: dict, is_target) -> dict[str, str]:
    """kohya stem -> weight key, for the DAC target layers this model really has."""
    weights = dict(model.named_parameters())
    return {stem: key for stem, key in key_map.items() if isinstance(key, str) and is_target(stem) and key in weights}


class ComfyBackend(DACBackend):
    def __init__(self, model, clip, vae=None, training_dtype: str = "fp32", gradient_checkpointing: bool = False,
                 sampler_name: str = "ddim", scheduler: str = "ddim_uniform"):
        self.model = model.clone()
        self.clip = clip.clone() if clip is not None else None
        self.vae = vae
        self.device = comfy.model_management.get_torch_device()
        self.model_sampling = self.model.get_model_object("model_sampling")
        self.num_train_timesteps = len(self.model_sampling.sigmas)
        self.latent_format = self.model.model.latent_format
        self.latent_channels = self.latent_format.latent_channels
        self.latent_factor = 8
        self.native_side = 512
        self.prediction_type = type(self.model_sampling).__name__
        self.training_dtype = TRAINING_DTYPES[training_dtype]
        self.gradient_checkpointing = gradient_checkpointing
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.positive_extras: dict = {}
        self.negative_extras: dict = {}
        self.strengths = {UNET: Strength(), TEXT_DELTA: Strength(), TEXT_EXTRA: Strength()}
        self.wrappers: dict[str, dict[str, LoRAWrapper]] = {}
        self._identity_keys: dict[int, list[str]] = {}
        self._unet_keys = _existing(self.model.model, model_lora_keys_unet(self.model.model, {}), is_unet_target)
        self._clip_keys = {}
        if self.clip is not None:
            self._clip_keys = _existing(self.clip.cond_stage_model,
                                        model_lora_keys_clip(self.clip.cond_stage_model, {}), is_text_target)
        self._fingerprint: str | None = None
        self._unet_per_sample: torch.Tensor | None = None  # set by set_lora_scale, used by loss()
        self._last_cond: torch.Tensor | None = None  # the conditioning of the last loss, for previews
        if gradient_checkpointing:  # object patches: applied on load, undone on unload
            unet = self.model.model.diffusion_model
            for group in ("input_blocks", "middle_block", "output_blocks"):
                blocks = getattr(unet, group)
                named = [(f"{group}.{i}", b) for i, b in enumerate(blocks)] if group != "middle_block" else [(group, blocks)]
                for name, block in named:
                    self.model.add_object_patch(f"diffusion_model.{name}.forward", _checkpointed(block.forward))

    # --- images and prompts -------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> LatentDistribution:
        """pixels [1, 3, H, W] in [-1, 1]. The VAE's posterior mean and std when it has one
        (SD's KL VAE), else its deterministic latent (std 0)."""
        image = ((pixels + 1) / 2).movedim(1, -1).clamp(0, 1)
        mean = self.vae.encode(image)
        std = torch.zeros_like(mean)
        fsm = self.vae.first_stage_model
        if hasattr(fsm, "regularization") and hasattr(fsm, "encoder"):
            comfy.model_management.load_models_gpu([self.vae.patcher])
            x = self.vae.process_input(self.vae.vae_encode_crop_pixels(image).movedim(-1, 1))
            moments = fsm.encoder(x.to(self.vae.vae_dtype).to(self.vae.device))
            if getattr(fsm, "quant_conv", None) is not None:
                moments = fsm.quant_conv(moments)
            if moments.shape[1] == 2 * mean.shape[1]:
                mean_, logvar = torch.chunk(moments.float().cpu(), 2, dim=1)
                mean, std = mean_, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        scale = self.latent_format.scale_factor
        return LatentDistribution(self.latent_format.process_in(mean).to(self.device),
                                  (std * scale).to(self.device))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.latent_format.process_out(latents))
        return images.movedim(-1, 1) * 2 - 1

    def _tokens(self, prompt: str):
        return self.clip.tokenize(prompt)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self._load(self.clip.patcher)
        conds = [self.clip.encode_from_tokens(self._tokens(p)) for p in prompts]
        return torch.cat(conds).to(self.device)

    def truncated_part(self, prompt: str) -> str:
        return ""  # ComfyUI encodes long prompts in 77-token chunks: nothing is cut

    # --- LoRAs --------------------------------------------------------------------------
    def _patcher_keys(self, name: str):
        if name == UNET:
            return self.model, self._unet_keys
        if self.clip is None:
            raise DACError("a CLIP input is needed for the text-encoder LoRA")
        return self.clip.patcher, self._clip_keys

    def lora_shapes(self, name):
        patcher, keys = self._patcher_keys(name)
        return {stem: comfy.utils.get_attr(patcher.model, key).shape for stem, key in keys.items()}

    def attach_lora(self, name, lora, trainable=False):
        self.detach_lora(name)
        patcher, keys = self._patcher_keys(name)
        layers = fitting_part(lora, name == UNET, self.lora_shapes(name)).layers
        self.strengths[name].value = 1.0
        wrappers = {}
        for stem, layer in layers.items():
            w = LoRAWrapper(layer.down, layer.up, layer.alpha, self.strengths[name])
            w.requires_grad_(trainable)
            patcher.add_weight_wrapper(keys[stem], w)
            wrappers[keys[stem]] = w
        self.wrappers[name] = wrappers
        if trainable:
            for p in (self.model, self.clip.patcher if self.clip is not None else None):
                if p is not None:
                    self._wrap_for_grad(p)
        return [p for w in wrappers.values() for p in w.parameters() if p.requires_grad]

    def _wrap_for_grad(self, patcher) -> None:
        """Identity wrappers on every other weight and bias; out-of-place CLIP layers."""
        if id(patcher) in self._identity_keys:
            return
        added = []
        for n, m in patcher.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                key = f"{n}.{attr}"
                if getattr(m, attr, None) is not None and key not in patcher.weight_wrapper_patches:
                    patcher.add_weight_wrapper(key, _identity)
                    added.append(key)
        for n, m in patcher.model.named_modules():
            if type(m).__name__ == "CLIPLayer":
                patcher.add_object_patch(f"{n}.forward", types.MethodType(_clip_layer_forward, m))
        self._identity_keys[id(patcher)] = added

    def detach_lora(self, name):
        wrappers = self.wrappers.pop(name, None)
        if not wrappers:
            return
        patcher, _ = self._patcher_keys(name)
        for key, w in wrappers.items():
            remaining = [f for f in patcher.weight_wrapper_patches.get(key, []) if f is not w]
            if remaining:
                patcher.weight_wrapper_patches[key] = remaining
            else:
                patcher.weight_wrapper_patches.pop(key, None)
        patcher.patches_uuid = uuid.uuid4()

    def export_lora(self, name) -> LoRA:
        patcher, keys = self._patcher_keys(name)
        stems = {v: k for k, v in keys.items()}
        return LoRA({stems[key]: LoRALayer(w.down.detach().cpu().clone(), w.up.detach().cpu().clone(), w.alpha)
                     for key, w in self.wrappers[name].items()})

    def set_lora_scale(self, name, scale):
        if name == UNET:  # a per-sample [B] strength is applied sample-group by sample-group in loss()
            self._unet_per_sample = scale.detach().float().cpu() if isinstance(scale, torch.Tensor) else None
        self.strengths[name].value = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) else float(scale)

    # --- training and sampling ----------------------------------------------------------
    def _load(self, patcher) -> None:
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)

    def loss(self, latents, noise, timesteps, cond):
        self._load(self.model)
        ms = self.model_sampling
        sigma = ms.sigma(timesteps.float()).to(latents.device)
        per_sample = self._unet_per_sample
        losses = []
        groups = [slice(0, latents.shape[0])]
        if per_sample is not None and per_sample.numel() > 1 and not bool((per_sample == per_sample[0]).all()):
            groups = [slice(i, i + 1) for i in range(latents.shape[0])]
        for g in groups:
            if per_sample is not None:
                self.strengths[UNET].value = float(per_sample[g][0])
            s = sigma[g].view(-1, 1, 1, 1)
            x_t = ms.noise_scaling(sigma[g], noise[g], latents[g])
            with torch.autocast(self.device.type, dtype=self.training_dtype,
                                enabled=self.training_dtype != torch.float32):
                x0 = self.model.model.apply_model(x_t, sigma[g], c_crossattn=cond[g],
                                                  transformer_options=self.model.model_options["transformer_options"])
            eps = (x_t.float() - x0.float()) / s
            self._last_cond = cond.detach()
            losses.append(F.mse_loss(eps, noise[g].float(), reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(losses)

    def sample(self, cond, uncond, noise, steps, cfg, unet_scale, progress=None):
        model = self.model.clone()
        if UNET in self.wrappers:
            model.add_wrapper(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                              lora_strength_wrapper(self.strengths[UNET], self.model_sampling, unet_scale))
        positive = [[cond, dict(self.positive_extras)]]
        negative = [[uncond, dict(self.negative_extras)]]
        latent = torch.zeros_like(noise, device="cpu")

        def callback(step, x0, x, total):
            if progress is not None:
                progress(step + 1, total)

        out = comfy.sample.sample(model, noise.cpu(), steps, cfg, self.sampler_name, self.scheduler, positive,
                                  negative, latent, denoise=1.0, callback=callback, disable_pbar=True, seed=0)
        self.strengths[UNET].value = 1.0
        return self.latent_format.process_in(out.to(self.device))

    @torch.no_grad()
    def preview(self, latents: LatentDistribution):
        """A reconstruction preview: the model's x0 estimate from the photo noised to t = 500,
        with the source conditioning the stage last used (None without a VAE)."""
        if self.vae is None or self._last_cond is None:
            return None
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        noise = torch.randn(latents.mean.shape, generator=g).to(latents.mean)
        sigma = self.model_sampling.sigma(torch.tensor([500.0])).to(latents.mean)
        x_t = self.model_sampling.noise_scaling(sigma, noise, latents.mean)
        x0 = self.model.model.apply_model(x_t, sigma, c_crossattn=self._last_cond[:1],
                                          transformer_options=self.model.model_options["transformer_options"])
        image = (self.decode_latents(x0)[0].clamp(-1, 1) + 1) * 127.5
        return ("JPEG", Image.fromarray(image.round().byte().movedim(0, -1).cpu().numpy()), 512)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_weights(self.model.model.diffusion_model.state_dict().items())
        return self._fingerprint


def release(*patchers) -> None:
    """Unload (and so unpatch) our clones from ComfyUI's loaded-model list, so no model with
    DAC wrappers stays loaded after a node ends, whether it finished, failed or was cancelled."""
    mm = comfy.model_management
    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if any(loaded.model is p for p in patchers if p is not None):
            patcher = loaded.model
            mm.current_loaded_models.pop(i).model_unload()
            # ComfyUI clears weight wrappers at the next load only; clear them now.
            for m in patcher.model.modules():
                if hasattr(m, "weight_function"):
                    m.weight_function, m.bias_function = [], []


def apply_loras(model, clip, unet_lora, text_lora, eta: float, beta: float, extra_text_lora=None):
    """(MODEL, CLIP) clones: the UNet LoRA at gamma(t) under any sampler, the text-encoder
    LoRA at -beta (and T at +1). The inputs are not changed."""
    from ..dac_core.schedule import gamma_at_fraction

    backend = ComfyBackend(model, clip)
    out_model = backend.model
    if unet_lora is not None:
        backend.attach_lora(UNET, unet_lora)
        out_model.add_wrapper(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                              lora_strength_wrapper(backend.strengths[UNET], backend.model_sampling,
                                                    lambda f: gamma_at_fraction(f, eta)))
    for name, lora, strength in ((TEXT_DELTA, text_lora, -beta), (TEXT_EXTRA, extra_text_lora, 1.0)):
        if lora is not None and clip is not None:
            backend.attach_lora(name, lora)
            backend.strengths[name].value = strength
    return out_model, backend.clip
