"""`DACBackend` on ComfyUI's own MODEL / CLIP / VAE objects (never converted to diffusers).

LoRAs are trainable modules attached through ModelPatcher weight wrappers, as ComfyUI's
native LoRA training does: `comfy.ops.cast_bias_weight` calls them on every forward with
the layer's weight, so autograd reaches them and their strength can change between steps.
Every other weight of a model being trained through gets an identity wrapper, which gives
autograd a normal (non-inference) copy; CLIP layers run an out-of-place forward for the
same reason.

The loss is the diffusers backend's (and the reference's): the MSE of the UNet's own
output against its target, the noise for epsilon models and the velocity for
v-prediction models. ComfyUI's model call returns x0, so the output is recovered from it
over the model's own model_sampling (in float32):

    epsilon:  eps = (x_t - x0) / sigma
    v:        v   = (x_t / (sigma^2 + 1) - x0) * sqrt(sigma^2 + 1) / sigma,
              target (noise - sigma * x) / sqrt(sigma^2 + 1)

Training dtype: while training, the UNet computes in the chosen dtype whatever dtype the
checkpoint is stored in (ModelPatcher.set_model_compute_dtype, as ComfyUI's own LoRA
training), under autocast for bf16/fp16; the text encoder computes in float32 as ComfyUI
runs it, or under autocast in bf16/fp16. LoRA weights stay float32; fp16 gets loss
scaling in dac_core.stages.

SDXL: the conditioning carries bigG's pooled output, and the UNet gets it with the size ids
as ComfyUI's SDXL conditioning does (original size = `original_size` or the latents' size,
crop 0, target size = the latents'); the text-encoder LoRAs sit on both encoders
(`lora_te1_` CLIP-L without its unread last layer, `lora_te2_` bigG whole).

Two paths for a LoRA, chosen per layer and call: each LoRA'd layer gets an object patch on
its forward (`LayerLoRAs`) that asks dac_core.lora_layers' cost model, for this input's size
and whether the LoRA trains, whether the LoRA is cheaper through the weights (the wrapper
adds the delta to W, as ComfyUI's own LoRAs) or on the activations (the wrapper passes W
through and the patch adds s * (alpha / rank) * up(down(x)) to the layer's output, as peft
and the diffusers backend do). The two are the same function with the same gradients, to
float rounding. The choice is made while gradients flow (Abduction-1 and -2); without them
(sampling, previews) every LoRA goes through the weights, as ComfyUI's own LoRA loader
merges them, so Apply DAC LoRAs samples what the stock loader samples to float rounding of
the same operations (at rank 512 the cost model picks that path on every SD layer but the
small time-embedding projections then anyway). While the UNet LoRA is frozen (U in
Abduction-2 and in sampling) its up @ down is formed once and kept, in the dtype of the
weight it is added to (as large as the layer's weight), so the weight path costs one add
per call, into the copy of W that ComfyUI hands the wrappers. A layer whose weight needs no
gradient (its LoRAs frozen or on the activations) does not keep the weight it computed with
for the backward pass: `_InputGradOnly` forms it again there. `lora_path` forces one path
for every LoRA ("weight": no forward patches, ComfyUI's wrappers alone).

The input MODEL and CLIP are cloned first; nothing is attached to them.
"""

from __future__ import annotations

import contextlib

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import torch
import torch.nn.functional as F

from ..dac_core.backend import (
    TEXT_DELTA,
    TEXT_EXTRA,
    UNET,
    Conditioning,
    DACBackend,
    LatentDistribution,
    fingerprint_weights,
)
from ..dac_core.errors import DACError
from ..dac_core.lora import (
    TEXT1_PREFIX,
    TEXT2_PREFIX,
    TEXT_PREFIX,
    LoRA,
    LoRALayer,
    fitting_part,
    is_text_target,
    is_unet_target,
)
from ..dac_core.lora_layers import PATHS, on_activations, weight_path_cheaper
from . import comfy_internals as internals

TRAINING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Strength:
    """A LoRA's current strength, shared by all its layers; changed between model calls."""

    def __init__(self, value: float = 1.0):
        self.value = value


class LoRAWrapper(torch.nn.Module):
    """Weight wrapper: W -> W + strength * (alpha / rank) * up @ down (float32 LoRA weights).

    With `cache` (UNet LoRAs: called at every step), a frozen LoRA's up @ down is formed once
    (in float32, outside autocast) and kept in the dtype of the weight it is added to. While
    `on_activations` is set (by the layer's LayerLoRAs, for one call) the wrapper passes W
    through unchanged: the layer's forward then adds the LoRA on the activations."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, strength: Strength, cache: bool = False):
        super().__init__()
        self.down = torch.nn.Parameter(down.detach().float().clone(), requires_grad=False)
        self.up = torch.nn.Parameter(up.detach().float().clone(), requires_grad=False)
        self.alpha = float(alpha)
        self.strength = strength
        self.cache = cache
        self.on_activations = False
        self._product: torch.Tensor | None = None  # up @ down of the frozen LoRA, shaped and typed like W

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def trains(self) -> bool:
        return self.down.requires_grad or self.up.requires_grad

    def scaling(self) -> float:
        return self.strength.value * self.alpha / self.rank

    def _cached_product(self, weight: torch.Tensor) -> torch.Tensor:
        p = self._product
        if p is None or p.device != weight.device or p.dtype != weight.dtype:
            with torch.autocast(self.up.device.type, enabled=False):
                d = self.up.flatten(1) @ self.down.flatten(1)
            p = self._product = d.detach().reshape(weight.shape).to(weight.device, weight.dtype)
        return p

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.strength.value
        if s == 0 or self.on_activations:
            return weight
        c = s * self.alpha / self.rank
        if self.cache and not self.trains():
            p = self._cached_product(weight)
            if weight.requires_grad:
                return weight + p * c
            # ComfyUI hands the weight functions a copy of W (cast_to(copy=True)): the add
            # goes into it rather than into two more tensors as large as the layer's weight
            return weight.add_(p, alpha=c)
        self._product = None
        delta = self.up.flatten(1) @ self.down.flatten(1)
        return weight + (delta.reshape(weight.shape) * c).to(weight.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.nelement() * p.element_size() for p in self.parameters())

    def move_to(self, device) -> int:
        self.to(device=device)
        self._product = None
        return self.passive_memory_usage()


@contextlib.contextmanager
def _left_out(wrappers: list[LoRAWrapper]):
    """The wrappers pass the weight through (their LoRAs go on the activations)."""
    for w in wrappers:
        w.on_activations = True
    try:
        yield
    finally:
        for w in wrappers:
            w.on_activations = False


@contextlib.contextmanager
def _strengths_at(values: list[tuple[Strength, float]]):
    """Each Strength at the value given, then back at its own."""
    now = [(s, s.value) for s, _ in values]
    try:
        for s, value in values:
            s.value = value
        yield
    finally:
        for s, value in now:
            s.value = value


class _InputGradOnly(torch.autograd.Function):
    """The base forward of a LoRA'd layer whose weight needs no gradient (its LoRAs frozen,
    or trained on the activations: U in Abduction-2, SD's deep layers in Abduction-1),
    differentiable in its input only. It runs as ComfyUI runs the layer, without keeping the
    weight it computed with (a copy of W, or W + gamma * dU: as large as the layer's weight)
    for the backward pass, which forms it again (ComfyUI's cast, the wrappers applied at the
    call's own strengths) for the input's gradient. Autograd would keep one for every layer:
    the size of the adapted weights (3.2 GB at SD 2.1 size, float32)."""

    @staticmethod
    def forward(ctx, x, patch, separate, args, kwargs):
        ctx.patch, ctx.separate, ctx.x_shape, ctx.x_dtype = patch, separate, x.shape, x.dtype
        # the strengths of this call (gamma(t) changes between the calls of one batch)
        ctx.strengths = [(f.strength, f.strength.value) for f in internals.weight_functions(patch.layer)]
        return patch.base(x, separate, args, kwargs)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.patch.layer
        with _strengths_at(ctx.strengths), _left_out(ctx.separate), torch.no_grad():
            # the weight in the dtype the forward computed in (the output's, under autocast too)
            w = internals.layer_weight(layer, grad.new_empty(0, dtype=ctx.x_dtype)).to(grad.dtype)
        with torch.no_grad():
            if isinstance(layer, torch.nn.Linear):
                dx = grad @ w
            else:
                dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, layer.stride, layer.padding, layer.dilation,
                                                layer.groups)
        return dx.to(ctx.x_dtype), None, None, None, None


class LayerLoRAs:
    """The forward of one LoRA'd Linear or Conv2d (an object patch): for each of its LoRAs
    (wrappers), the path that dac_core.lora_layers' cost model finds cheaper for this input
    (or the one `path` forces). LoRAs on the activations: their wrappers pass the weight
    through during the layer's own forward, and s * (alpha / rank) * up(down(x)) is added to
    its output (computed from x in float32 LoRA weights, as the diffusers backend does)."""

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d, original, path: str):
        self.layer, self.original, self.path = layer, original, path
        self.wrappers: list[LoRAWrapper] = []
        self.last_paths: list[str] = []  # per wrapper, the path of the last call (for tests)

    def _on_activations(self, w: LoRAWrapper, x: torch.Tensor) -> bool:
        if self.path != "auto":
            return self.path == "activation"
        # without gradients (sampling, previews) every LoRA goes through the weights, as
        # ComfyUI's own LoRA loader merges them (see the module's docstring)
        return torch.is_grad_enabled() and not weight_path_cheaper(self.layer, x, w.rank, w.trains())

    def _input_grad_only(self, separate: list[LoRAWrapper]) -> bool:
        """Every weight function of the layer is a LoRA of this backend that gives the weight
        no gradient (frozen, on the activations for this call, or at strength 0), nothing
        unknown that might need one."""
        functions = internals.weight_functions(self.layer)
        return bool(functions) and all(
            isinstance(f, LoRAWrapper) and (not f.trains() or f in separate or f.strength.value == 0)
            for f in functions)

    def base(self, x: torch.Tensor, separate: list[LoRAWrapper], args, kwargs) -> torch.Tensor:
        """The layer's own forward, the `separate` LoRAs left out of its weight."""
        with _left_out(separate):
            return self.original(x, *args, **kwargs)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [w for w in self.wrappers if w.strength.value != 0]
        separate = [w for w in active if self._on_activations(w, x)]
        self.last_paths = ["activation" if w in separate else "weight" for w in active]
        if x.requires_grad and torch.is_grad_enabled() and self._input_grad_only(separate):
            y = _InputGradOnly.apply(x, self, separate, args, kwargs)
        else:
            y = self.base(x, separate, args, kwargs)
        if not separate:
            return y
        out_dtype = y.dtype
        for w in separate:
            y = y + on_activations(self.layer, x, w.down, w.up) * w.scaling()
        return y.to(out_dtype)


def _identity(weight: torch.Tensor) -> torch.Tensor:
    """A wrapper that changes nothing: ComfyUI then hands the layer a copy of its weight,
    which autograd can save (base weights loaded under inference mode cannot be)."""
    return weight


def lora_strength_wrapper(strength: Strength, model_sampling, schedule):
    """An APPLY_MODEL wrapper that sets the UNet LoRA strength to schedule(fraction) for the
    sigma of each call (fraction = timestep / 999): DAC's gamma(t) under any sampler."""

    def wrapper(executor, x, t, *args, **kwargs):
        frac = model_sampling.timestep(t).double().cpu() / 999.0  # gamma in float64, as the reference
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


def _one_name_per_text_layer(keys: dict[str, str]) -> dict[str, str]:
    """ComfyUI maps both lora_te_ and lora_te1_ to the first encoder: keep SDXL's
    lora_te1_ / lora_te2_ where there is a second encoder, lora_te_ otherwise."""
    two = any(stem.startswith(TEXT2_PREFIX) for stem in keys)
    drop = TEXT_PREFIX if two else TEXT1_PREFIX
    return {stem: key for stem, key in keys.items() if not stem.startswith(drop)}


def _model_output_and_target(kind: str, sigma, x_t, x0, noise, latents):
    """The UNet's own output (recovered from ComfyUI's x0) and its training target."""
    s = sigma.view(-1, 1, 1, 1).float()
    x_t, x0, noise, latents = x_t.float(), x0.float(), noise.float(), latents.float()
    if kind == "v_prediction":
        norm = (s**2 + 1).sqrt()
        return (x_t / (s**2 + 1) - x0) * norm / s, (noise - s * latents) / norm
    return (x_t - x0) / s, noise


class ComfyBackend(DACBackend):
    def __init__(self, model, clip, vae=None, training_dtype: str = "fp32", gradient_checkpointing: bool = False,
                 sampler_name: str = "ddim", scheduler: str = "ddim_uniform", positive_extras: dict | None = None,
                 negative_extras: dict | None = None, lora_path: str = "auto"):
        """`positive_extras` / `negative_extras`: what the sampled conditionings carry beside
        the text embedding (a ControlNet's "control", areas, masks), kept as given.
        `lora_path`: "auto" (each LoRA'd layer the cheaper path, per call), "weight" or
        "activation" (every LoRA that way; for tests and benchmarks)."""
        if lora_path not in PATHS:
            raise ValueError(f"lora_path must be one of {PATHS}, got {lora_path!r}")
        self.lora_path = lora_path
        self._layers: dict[tuple[int, str], LayerLoRAs] = {}  # (id(patcher), weight key) -> its forward patch
        self.model = model.clone()
        self.clip = clip.clone() if clip is not None else None
        self.vae = vae
        self.device = comfy.model_management.get_torch_device()
        self.model_sampling = self.model.get_model_object("model_sampling")
        self.prediction_type = internals.prediction_type(self.model_sampling)
        architecture = internals.architecture(self.model)
        if self.prediction_type is None or architecture is None:
            what = (f"its sampling ({type(self.model_sampling).__name__})" if self.prediction_type is None
                    else f"its conditioning ({type(self.model.model).__name__})")
            raise DACError(f"this model is not supported ({what}): DAC works on Stable Diffusion 1.x, 2.x and SDXL "
                           "checkpoints (epsilon or v-prediction)")
        self.architecture = architecture
        self.num_train_timesteps = len(self.model_sampling.sigmas)
        self.latent_format = self.model.get_model_object("latent_format")
        self.latent_channels = self.latent_format.latent_channels
        self.latent_factor = 8
        self.native_side = 1024 if architecture == "sdxl" else 512
        if training_dtype not in TRAINING_DTYPES:
            raise DACError(f"training_dtype {training_dtype!r} is not one of {', '.join(TRAINING_DTYPES)}")
        self.training_dtype = TRAINING_DTYPES[training_dtype]
        self.gradient_checkpointing = gradient_checkpointing
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.positive_extras = dict(positive_extras or {})
        self.negative_extras = dict(negative_extras or {})
        self.strengths = {UNET: Strength(), TEXT_DELTA: Strength(), TEXT_EXTRA: Strength()}
        self.wrappers: dict[str, dict[str, LoRAWrapper]] = {}
        self._frozen: dict[str, LoRA] = {}  # the LoRA object each frozen attachment was made from
        self._prepared: set[int] = set()  # ids of the patchers made trainable-through
        self._unet_keys = _existing(self.model.model, internals.unet_lora_keys(self.model), is_unet_target)
        # Text-encoder layers a LoRA may patch, and the subset a new LoRA trains (those that
        # reach the output); a file holding the others too (made before) still attaches.
        self._clip_keys: dict[str, str] = {}
        self._clip_trained_keys: dict[str, str] = {}
        if self.clip is not None:
            self._clip_keys = _one_name_per_text_layer(_existing(self.clip.cond_stage_model,
                                                                 internals.text_lora_keys(self.clip), is_text_target))
            pooled_from = "clip_g" if architecture == "sdxl" else None
            self._clip_trained_keys = internals.keys_reaching_output(self._clip_keys, self.clip, pooled_from)
        self._fingerprint: str | None = None
        self._unet_per_sample: torch.Tensor | None = None  # set by set_lora_scale, used by loss()
        self._last_cond: Conditioning | None = None  # the conditioning of the last loss, for previews
        if gradient_checkpointing:
            internals.checkpoint_unet_blocks(self.model)

    # --- images and prompts -------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> LatentDistribution:
        """pixels [1, 3, H, W] in [-1, 1]. The VAE's posterior mean and std when it has one
        (SD's KL VAE), else its deterministic latent (std 0)."""
        image = ((pixels + 1) / 2).movedim(1, -1).clamp(0, 1)
        mean = self.vae.encode(image)
        std = torch.zeros_like(mean)
        posterior = internals.vae_posterior(self.vae, image, mean.shape[1])
        if posterior is not None:
            mean, std = posterior
        scale = self.latent_format.scale_factor
        return LatentDistribution(self.latent_format.process_in(mean).to(self.device),
                                  (std * scale).to(self.device))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.latent_format.process_out(latents))
        return images.movedim(-1, 1) * 2 - 1

    def _tokens(self, prompt: str):
        return self.clip.tokenize(prompt)

    def _autocast(self):
        """bf16 / fp16 compute for the matrix products (float32 elsewhere); off for fp32."""
        return torch.autocast(self.device.type, dtype=self.training_dtype,
                              enabled=self.training_dtype != torch.float32)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        self._load(self.clip.patcher)
        with self._autocast():
            conds = [self.clip.encode_from_tokens(self._tokens(p), return_pooled=True) for p in prompts]
        context = torch.cat([c for c, _ in conds]).float().to(self.device)
        if self.architecture != "sdxl":
            return Conditioning(context)
        return Conditioning(context, torch.cat([p for _, p in conds]).float().to(self.device))

    def _sizes(self, latents: torch.Tensor) -> dict[str, int]:
        """SDXL's size conditioning for latents of this shape (ComfyUI's names)."""
        h, w = latents.shape[-2] * self.latent_factor, latents.shape[-1] * self.latent_factor
        ow, oh = self.original_size or (w, h)
        return {"width": ow, "height": oh, "target_width": w, "target_height": h}

    def _adm(self, cond: Conditioning, latents: torch.Tensor) -> torch.Tensor | None:
        if self.architecture != "sdxl":
            return None
        return internals.sdxl_adm(self.model, cond.pooled, **self._sizes(latents))

    def truncated_part(self, prompt: str) -> str:
        return ""  # ComfyUI encodes long prompts in 77-token chunks: nothing is cut

    # --- LoRAs --------------------------------------------------------------------------
    def _patcher_keys(self, name: str):
        if name == UNET:
            return self.model, self._unet_keys
        if self.clip is None:
            raise DACError("a CLIP input is needed for the text-encoder LoRA")
        return self.clip.patcher, self._clip_keys

    def _shapes(self, patcher, keys: dict[str, str]) -> dict[str, torch.Size]:
        return {stem: internals.get_weight(patcher.model, key).shape for stem, key in keys.items()}

    def lora_shapes(self, name):
        """The layers a new LoRA `name` trains: for the text encoder only those whose output
        reaches the UNet, so the file fits every other tool's encoder (diffusers' SD 2.x)."""
        patcher, keys = self._patcher_keys(name)
        return self._shapes(patcher, keys if name == UNET else self._clip_trained_keys)

    def attach_lora(self, name, lora, trainable=False):
        if not trainable and name in self.wrappers and self._frozen.get(name) is lora:
            self.strengths[name].value = 1.0  # already attached, frozen (DAC Sweep's cells share U and Delta)
            return []
        self.detach_lora(name)
        patcher, keys = self._patcher_keys(name)
        layers = fitting_part(lora, name == UNET, self._shapes(patcher, keys)).layers
        self.strengths[name].value = 1.0
        wrappers = {}
        for stem, layer in layers.items():
            w = LoRAWrapper(layer.down, layer.up, layer.alpha, self.strengths[name], cache=name == UNET)
            w.requires_grad_(trainable)
            patcher.add_weight_wrapper(keys[stem], w)
            wrappers[keys[stem]] = w
            patch = self._layer_patch(patcher, keys[stem])
            if patch is not None:
                patch.wrappers.append(w)
        self.wrappers[name] = wrappers
        if not trainable:
            self._frozen[name] = lora
        else:
            self.model.set_model_compute_dtype(self.training_dtype)  # whatever the checkpoint's storage dtype
            for p in (self.model, self.clip.patcher if self.clip is not None else None):
                if p is not None:
                    self._wrap_for_grad(p)
        return [p for w in wrappers.values() for p in w.parameters() if p.requires_grad]

    def _layer_patch(self, patcher, key: str) -> LayerLoRAs | None:
        """The forward patch of the layer holding weight `key` (made on first use; None for
        lora_path "weight" or a layer the activation path cannot compute: see
        comfy_internals.lora_layer)."""
        if self.lora_path == "weight":
            return None
        if (id(patcher), key) not in self._layers:
            if internals.lora_layer(patcher, key) is None:
                return None
            self._layers[(id(patcher), key)] = internals.patch_layer_forward(
                patcher, key, lambda layer, original: LayerLoRAs(layer, original, self.lora_path))
        return self._layers[(id(patcher), key)]

    def _wrap_for_grad(self, patcher) -> None:
        """Identity wrappers on every other weight and bias; out-of-place CLIP layers."""
        if id(patcher) in self._prepared:
            return
        wrapped = internals.wrapped_keys(patcher)
        for n, m in patcher.model.named_modules():
            if not internals.has_weight_function(m):
                continue
            for attr in ("weight", "bias"):
                key = f"{n}.{attr}"
                if getattr(m, attr, None) is not None and key not in wrapped:
                    patcher.add_weight_wrapper(key, _identity)
        internals.patch_clip_layers_out_of_place(patcher)
        self._prepared.add(id(patcher))

    def detach_lora(self, name):
        self._frozen.pop(name, None)
        wrappers = self.wrappers.pop(name, None)
        if not wrappers:
            return
        patcher, _ = self._patcher_keys(name)
        for key, w in wrappers.items():
            internals.remove_weight_wrapper(patcher, key, w)
            patch = self._layers.get((id(patcher), key))
            if patch is not None:
                patch.wrappers = [x for x in patch.wrappers if x is not w]

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
            x_t = ms.noise_scaling(sigma[g], noise[g], latents[g])
            with self._autocast():
                x0 = internals.apply_model(self.model, x_t, sigma[g], cond[g].context, self._adm(cond[g], x_t))
            pred, target = _model_output_and_target(self.prediction_type, sigma[g], x_t, x0, noise[g], latents[g])
            self._last_cond = cond.detach()
            losses.append(F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
        return torch.cat(losses)

    def sample(self, cond, uncond, noise, steps, cfg, unet_scale, progress=None):
        model = self.model.clone()
        if UNET in self.wrappers:
            model.add_wrapper(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                              lora_strength_wrapper(self.strengths[UNET], self.model_sampling, unet_scale))
        positive = [[cond.context, dict(self.positive_extras)]]
        negative = [[uncond.context, dict(self.negative_extras)]]
        if self.architecture == "sdxl":  # the pooled output with Delta at -beta, whatever the extras carried
            for (_, extras), c in ((positive[0], cond), (negative[0], uncond)):
                extras.update({**self._sizes(noise), **extras, "pooled_output": c.pooled})
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
        cond = self._last_cond[:1]
        x0 = internals.apply_model(self.model, x_t, sigma, cond.context, self._adm(cond, x_t))
        image = (self.decode_latents(x0)[0].clamp(-1, 1) + 1) * 127.5
        return ("JPEG", Image.fromarray(image.round().byte().movedim(0, -1).cpu().numpy()), 512)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_weights(internals.unet_state_dict(self.model).items())
        return self._fingerprint


def release(*patchers) -> None:
    """Unload (and so unpatch) our clones, so no model with DAC wrappers stays loaded after
    a node ends, whether it finished, failed or was cancelled."""
    internals.unload(*patchers)


def apply_loras(model, clip, unet_lora, text_lora, eta: float, beta: float, extra_text_lora=None):
    """(MODEL, CLIP) clones: the UNet LoRA at gamma(t) under any sampler, the text-encoder
    LoRA at -beta (and T at +1), as dac_core.stages.counterfactual_strengths says. The inputs
    are not changed."""
    from ..dac_core.stages import counterfactual_strengths

    strengths = counterfactual_strengths(eta, beta)
    backend = ComfyBackend(model, clip)
    out_model = backend.model
    if unet_lora is not None:
        backend.attach_lora(UNET, unet_lora)
        out_model.add_wrapper(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                              lora_strength_wrapper(backend.strengths[UNET], backend.model_sampling, strengths[UNET]))
    for name, lora in ((TEXT_DELTA, text_lora), (TEXT_EXTRA, extra_text_lora)):
        if lora is not None and clip is not None:
            backend.attach_lora(name, lora)
            backend.set_lora_scale(name, strengths[name])
    return out_model, backend.clip
