"""DAC on diffusers: Stable Diffusion 1.x, 2.x and XL, epsilon and v-prediction.

LoRAs sit on the reference code's target layers of the pipeline's own UNet and CLIP text
encoder, as `lora_layers.LoRAHost` wrappers that apply each LoRA through the weights or on
the activations, whichever is cheaper for the layer, and train with a fused AdamW. With
exact_reference=True the backend computes as the reference scripts do, op for op: every
LoRA on the activations (peft's operations) and torch's default AdamW. The UNet LoRA's
strength gamma(t) may be given per sample, so one batch can mix timesteps (the reference is
limited to batch size 1).

SDXL: the text-encoder LoRAs sit on both encoders (CLIP-L, `lora_te1_`, read at its
penultimate layer so its last layer is left out; OpenCLIP-bigG, `lora_te2_`, every layer,
its last one making the pooled embedding); the UNet gets the pooled embedding and the size
ids (original size = `original_size`, crop 0, target size = the latents').
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
import torch.nn.functional as F

from .backend import TEXT_DELTA, TEXT_EXTRA, UNET, Conditioning, DACBackend, LatentDistribution, fingerprint_weights
from .errors import DACError
from .lora import (
    TEXT1_PREFIX,
    TEXT2_PREFIX,
    TEXT_PREFIX,
    TEXT_TARGETS,
    UNET_TARGETS,
    LoRA,
    fitting_part,
    text_encoder_stem,
    unet_stem,
)
from .lora_layers import LoRAHost, hosts

log = logging.getLogger("dac_core")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"  # the paper's model
_TEXT_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DACError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DACError(f"device {device!r} was asked for, but this torch has no CUDA device; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype not in DTYPES:
        raise DACError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return DTYPES[dtype]


SUPPORTED = "Stable Diffusion 1.x, 2.x and SDXL"
PIPELINE_CLASSES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


def _unsupported(model: str, what: str) -> DACError:
    return DACError(f"model {model!r} is {what}; DAC supports {SUPPORTED} (diffusers StableDiffusionPipeline / "
                    "StableDiffusionXLPipeline folders, their single-file checkpoints, or hub ids)")


def _checkpoint_architecture(path: str) -> str:
    """"sd" or "sdxl" from a single-file checkpoint's keys (a DACError for anything else)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
        except Exception as e:
            raise DACError(f"model file {path!r} is not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            keys = set(sd.get("state_dict", sd))
        except Exception:  # an old pickle that holds more than tensors: diffusers' loader decides
            return "sd"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys) and any(
            k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd"
    for marker, name in (("joint_blocks.", "an SD3 checkpoint"), ("double_blocks.", "a Flux checkpoint"),
                         ("conditioner.embedders.0.", "an SDXL refiner checkpoint")):
        if any(marker in k for k in keys):
            raise _unsupported(path, name)
    raise _unsupported(path, "a checkpoint of an architecture DAC does not know")


def model_architecture(model: str) -> str:
    """"sd" (Stable Diffusion 1.x / 2.x) or "sdxl" for a diffusers folder, a single-file
    checkpoint or a hub id; any other architecture is a DACError naming what is supported."""
    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index):
            raise DACError(f"model folder {model!r} has no model_index.json: it is not a diffusers pipeline folder")
        with open(index, encoding="utf-8") as f:
            cls = json.load(f).get("_class_name", "?")
    elif os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
            raise DACError(f"model file {model!r} is not a .safetensors or .ckpt checkpoint")
        return _checkpoint_architecture(model)
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an "org/name" hub id
        raise DACError(f"model {model!r} does not exist (expected a diffusers folder, a checkpoint file or a hub id)")
    else:
        from diffusers import DiffusionPipeline

        try:
            cls = DiffusionPipeline.load_config(model).get("_class_name", "?")
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DACError(f"model {model!r} could not be found (a hub id needs the network): {first}") from None
    if cls not in PIPELINE_CLASSES:
        raise _unsupported(model, f"a {cls}")
    return PIPELINE_CLASSES[cls]


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline, whichever the model is, from a
    diffusers folder, a single-file checkpoint (.safetensors / .ckpt) or a Hugging Face hub
    id (needs the network)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    architecture = model_architecture(model)
    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    kwargs = dict(torch_dtype=dtype)
    if architecture == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if os.path.isdir(model):
            return cls.from_pretrained(model, local_files_only=True, **kwargs)
        if os.path.isfile(model):
            return cls.from_single_file(model, **kwargs)
        return cls.from_pretrained(model, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DACError(
            f"model {model!r} could not be loaded as {'SDXL' if architecture == 'sdxl' else 'SD 1.x/2.x'} "
            f"(a diffusers folder, a .safetensors/.ckpt file, or a hub id when online): {first}"
        ) from None


def pipeline_architecture(pipe) -> str:
    """"sd" or "sdxl" for a loaded pipeline; a DACError for a UNet whose conditioning DAC
    does not know (class embeddings, other added conditioning, inpainting channels)."""
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)
    if unet is None or vae is None or not hasattr(unet.config, "cross_attention_dim"):
        raise DACError(f"a {type(pipe).__name__} has no UNet2DConditionModel; DAC supports {SUPPORTED}")
    added = getattr(unet.config, "addition_embed_type", None)
    two = getattr(pipe, "text_encoder_2", None) is not None
    if added == "text_time" and two and getattr(pipe, "text_encoder", None) is not None:
        architecture = "sdxl"
    elif added is None and not two and getattr(pipe, "text_encoder", None) is not None:
        architecture = "sd"
    else:
        what = "an SDXL refiner" if added == "text_time" else f"a UNet with {added or 'unknown'} conditioning"
        raise DACError(f"this {type(pipe).__name__} holds {what}; DAC supports {SUPPORTED}")
    extra_input = unet.config.in_channels != vae.config.latent_channels
    if getattr(unet.config, "class_embed_type", None) is not None or extra_input:
        raise DACError(f"this {type(pipe).__name__}'s UNet takes class labels or extra input channels "
                       f"(an upscaler or inpainting model); DAC supports {SUPPORTED} text-to-image models")
    return architecture


def _replace(model: torch.nn.Module, module_name: str, module: torch.nn.Module) -> None:
    """Put `module` where `module_name` is in `model`."""
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class DiffusersBackend(DACBackend):
    def __init__(self, pipe, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None,
                 exact_reference: bool = False, gradient_checkpointing: bool = False):
        """exact_reference: compute as the reference scripts, op for op (slower; for comparisons).
        gradient_checkpointing: the UNet's blocks recompute their activations in the backward
        pass (less memory in both abductions, about a third more time)."""
        from diffusers import DDPMScheduler

        self.lora_path = "activation" if exact_reference else "auto"
        self.fused_optimizer = not exact_reference
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.dtype = resolve_dtype(dtype)
        self.training_dtype = self.dtype  # the model computes in its weights' dtype; LoRAs stay float32
        self.pipe = pipe
        self.architecture = pipeline_architecture(pipe)
        sdxl = self.architecture == "sdxl"
        self.unet, self.text_encoder, self.vae, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
        self.text_encoder_2 = pipe.text_encoder_2 if sdxl else None
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
        # The text encoders as one module, by kohya prefix: the text LoRAs' root. SDXL reads
        # CLIP-L's penultimate layer (its last one never matters) and all of bigG's (its last
        # layer makes the pooled embedding).
        encoders = {TEXT1_PREFIX: self.text_encoder, TEXT2_PREFIX: self.text_encoder_2} if sdxl else {
            TEXT_PREFIX: self.text_encoder}
        self.text_encoders = torch.nn.ModuleDict(encoders)
        self._text_layers_used = {prefix: te.config.num_hidden_layers - (sdxl and prefix == TEXT1_PREFIX)
                                  for prefix, te in encoders.items()}
        # SDXL's VAE overflows in float16 (its config says force_upcast): it runs in float32.
        self.vae_dtype = torch.float32 if (self.dtype == torch.float16 and getattr(
            pipe.vae.config, "force_upcast", False)) else self.dtype
        for m in (self.unet, *encoders.values(), self.vae):
            m.requires_grad_(False)
            dtype = self.vae_dtype if m is self.vae else self.dtype
            if m.device != self.device or m.dtype != dtype:
                m.to(self.device, dtype)
            m.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        schedule = {k: v for k, v in pipe.scheduler.config.items() if k in DDPMScheduler._get_init_keys(DDPMScheduler)}
        self.train_scheduler = DDPMScheduler.from_config(schedule)
        self.scheduler = pipe.scheduler
        self.num_train_timesteps = self.train_scheduler.config.num_train_timesteps
        self.prediction_type = self.train_scheduler.config.prediction_type
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.native_side = self.unet.config.sample_size * self.latent_factor
        self._module_names: dict[str, dict[str, str]] = {}  # LoRA name -> stem -> module name
        self._carriers: dict[str, list[LoRAHost]] = {}  # LoRA name -> the layers that carry it
        self._fingerprint: str | None = None

    @classmethod
    def from_model(cls, model: str, device: str | None = "cpu", dtype: str | None = None,
                   exact_reference: bool = False, gradient_checkpointing: bool = False) -> DiffusersBackend:
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        return cls(load_pipeline(model, dt), dev, dt, exact_reference, gradient_checkpointing)

    # --- images and prompts -------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> LatentDistribution:
        dist = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist
        sf = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return LatentDistribution((dist.mean - shift) * sf, dist.std * sf)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        sf = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode((latents / sf + shift).to(self.vae_dtype)).sample.float()

    def _ids(self, prompts: list[str], tokenizer) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self.architecture == "sd":
            return Conditioning(self.text_encoder(self._ids(prompts, self.tokenizer))[0])
        hidden = []
        for encoder, tokenizer in zip(self.text_encoders.values(), self.tokenizers):
            out = encoder(self._ids(prompts, tokenizer), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return Conditioning(torch.cat(hidden, dim=-1), out[0])  # out[0]: bigG's projected pooled embedding

    def truncated_part(self, prompt: str) -> str:
        ids = self.tokenizer(prompt, truncation=False).input_ids
        limit = self.tokenizer.model_max_length
        if len(ids) <= limit:
            return ""
        return self.tokenizer.decode(ids[limit - 1 : -1]).strip()

    # --- LoRAs --------------------------------------------------------------------------
    def _model_of(self, name: str) -> torch.nn.Module:
        """The module LoRA `name` lives in: the UNet, or the text encoder(s) by kohya prefix."""
        if name == UNET:
            return self.unet
        if name in (TEXT_DELTA, TEXT_EXTRA):
            return self.text_encoders
        raise ValueError(f"unknown LoRA name {name!r}")

    def _stem(self, name: str, module_name: str) -> str:
        if name == UNET:
            return unet_stem(module_name)
        prefix, _, rest = module_name.partition(".")
        return text_encoder_stem(rest, prefix)

    def _reaches_output(self, name: str, module_name: str) -> bool:
        """Whether a text-encoder layer's output reaches what the UNet reads."""
        if name == UNET:
            return True
        prefix, _, rest = module_name.partition(".")
        m = _TEXT_LAYER.search(rest)
        return m is None or int(m.group(1)) < self._text_layers_used[prefix]

    def _targets(self, name: str) -> dict[str, str]:
        """stem -> module name, for every layer DAC targets in that model."""
        if name not in self._module_names:
            targets = UNET_TARGETS if name == UNET else TEXT_TARGETS
            out = {}
            for n, m in self._model_of(name).named_modules():
                if ".base_layer" in n or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, LoRAHost)):
                    continue
                if any(n == t or n.endswith("." + t) for t in targets) and self._reaches_output(name, n):
                    out[self._stem(name, n)] = n
            self._module_names[name] = out
        return self._module_names[name]

    def lora_shapes(self, name):
        model = self._model_of(name)
        return {stem: model.get_submodule(n).weight.shape for stem, n in self._targets(name).items()}

    def attach_lora(self, name, lora, trainable=False):
        model = self._model_of(name)
        self.detach_lora(name)
        targets = self._targets(name)
        part = fitting_part(lora, name == UNET, self.lora_shapes(name))
        params = []
        for stem, module_name in targets.items():  # in the model's order, whatever the LoRA's
            layer = part.layers.get(stem)
            if layer is None:
                continue
            host = model.get_submodule(module_name)
            if not isinstance(host, LoRAHost):
                host = LoRAHost(host, self.lora_path)
                _replace(model, module_name, host)
            params += host.add(name, layer, trainable)
            self._carriers.setdefault(name, []).append(host)
        training = {id(p) for p in params}
        for p in model.parameters():  # only this LoRA trains, if it does
            if id(p) not in training:
                p.requires_grad_(False)
        return params

    def detach_lora(self, name):
        model = self._model_of(name)
        for module_name, host in hosts(model):
            host.remove(name)
            if not host.names():  # a layer with no LoRA left is unwrapped: the model is as it was
                _replace(model, module_name, host.base_layer)
        self._carriers.pop(name, None)

    def export_lora(self, name) -> LoRA:
        layers = {self._stem(name, n): host.export(name) for n, host in hosts(self._model_of(name))
                  if name in host.names()}
        if not layers:
            raise ValueError(f"no LoRA {name!r} is attached")
        return LoRA(layers)

    def set_lora_scale(self, name, scale):
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = float(scale)  # one strength for the batch: once here, not in every layer
        for host in self._carriers.get(name, ()):  # every step: no walk over the model's modules
            host.set_strength(name, scale)

    # --- training and sampling ----------------------------------------------------------
    def loss(self, latents, noise, timesteps, cond):
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(latents, noise, timesteps)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise DACError(f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        pred = self._unet(noisy, timesteps, cond)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    def _unet(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        kwargs = {}
        if self.architecture == "sdxl":
            h, w = x.shape[-2] * self.latent_factor, x.shape[-1] * self.latent_factor
            ow, oh = self.original_size or (w, h)
            ids = torch.tensor([[oh, ow, 0, 0, h, w]], dtype=self.dtype, device=self.device).expand(x.shape[0], 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": ids}
        return self.unet(x.to(self.dtype), t, cond.context.to(self.dtype), **kwargs).sample

    @torch.no_grad()
    def sample(self, cond, uncond, noise, steps, cfg, unet_scale, progress=None):
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device, torch.float32) * sched.init_noise_sigma
        guided = cfg != 1.0
        emb = Conditioning.cat([uncond, cond]) if guided else cond
        last = self.num_train_timesteps - 1
        for i, t in enumerate(sched.timesteps):
            x = torch.cat([latents] * 2) if guided else latents
            x = sched.scale_model_input(x, t)
            # one timestep for the whole batch: one strength, so U can be merged into the weights
            self.set_lora_scale(UNET, unet_scale(torch.full((1,), float(t) / last, dtype=torch.float64)))
            pred = self._unet(x, t, emb).float()
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + cfg * (pred_cond - pred_uncond)
            latents = sched.step(pred, t, latents).prev_sample
            if progress is not None:
                progress(i + 1, len(sched.timesteps))
        self.set_lora_scale(UNET, 1.0)
        return latents

    def fingerprint(self) -> str:
        """Of the configs and weights of UNet, text encoder and VAE (LoRAs excluded)."""
        if self._fingerprint is None:
            configs, tensors = [], []
            models = [("unet", self.unet), ("text_encoder", self.text_encoder), ("vae", self.vae)]
            if self.text_encoder_2 is not None:
                models.append(("text_encoder_2", self.text_encoder_2))
            for label, m in models:
                config = getattr(m, "config", None)
                config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
                configs.append({k: v for k, v in config.items()
                                if not k.startswith("_") and k != "transformers_version"})
                tensors += [(f"{label}.{n.replace('.base_layer', '')}", p) for n, p in m.state_dict().items()
                            if "lora_" not in n]  # LoRAHost keeps the base weights under base_layer
            self._fingerprint = fingerprint_weights(tensors, json.dumps(configs, sort_keys=True, default=str))
        return self._fingerprint
