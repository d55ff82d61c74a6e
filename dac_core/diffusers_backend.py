"""DAC on diffusers + peft: Stable Diffusion 1.x and 2.x, epsilon and v-prediction.

LoRAs are peft adapters injected into the pipeline's own UNet and CLIP text encoder with
the reference code's target modules. The UNet LoRA's per-sample strength gamma(t) is set
by a forward pre-hook on each LoRA layer, which shapes the [B] strengths to the layer's
input, so one batch can mix timesteps (the reference is limited to batch size 1).
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
import torch.nn.functional as F

from .backend import TEXT_DELTA, TEXT_EXTRA, UNET, DACBackend, LatentDistribution, fingerprint_weights
from .errors import DACError
from .lora import TEXT_TARGETS, UNET_TARGETS, LoRA, LoRALayer, fitting_part, text_encoder_stem, unet_stem

log = logging.getLogger("dac_core")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"  # the paper's model


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


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline from a diffusers folder, a single-file checkpoint
    (.safetensors / .ckpt) or a Hugging Face hub id (needs the network)."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if os.path.isdir(model):
            if not os.path.isfile(os.path.join(model, "model_index.json")):
                raise DACError(f"model folder {model!r} has no model_index.json: it is not a diffusers pipeline folder")
            return StableDiffusionPipeline.from_pretrained(model, local_files_only=True, **kwargs)
        if os.path.isfile(model):
            if not model.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
                raise DACError(f"model file {model!r} is not a .safetensors or .ckpt checkpoint")
            return StableDiffusionPipeline.from_single_file(model, **kwargs)
        if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an "org/name" hub id
            raise DACError(f"model {model!r} does not exist "
                           "(expected a diffusers folder, a checkpoint file or a hub id)")
        return StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except DACError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DACError(
            f"model {model!r} could not be loaded as Stable Diffusion 1.x/2.x "
            f"(a diffusers folder, a .safetensors/.ckpt file, or a hub id when online): {first}"
        ) from None


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class DiffusersBackend(DACBackend):
    def __init__(self, pipe, device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None):
        from diffusers import DDPMScheduler

        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.dtype = resolve_dtype(dtype)
        self.training_dtype = self.dtype  # the model computes in its weights' dtype; LoRAs stay float32
        self.pipe = pipe
        self.unet, self.text_encoder, self.vae, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
        for m in (self.unet, self.text_encoder, self.vae):
            m.requires_grad_(False)
            if m.device != self.device or m.dtype != self.dtype:
                m.to(self.device, self.dtype)
            m.eval()
        self.train_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.scheduler = pipe.scheduler
        self.num_train_timesteps = self.train_scheduler.config.num_train_timesteps
        self.prediction_type = self.train_scheduler.config.prediction_type
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.unet.config.in_channels
        self.native_side = self.unet.config.sample_size * self.latent_factor
        self._unet_scale: float | torch.Tensor = 1.0
        self._hooks: list = []
        self._fingerprint: str | None = None

    @classmethod
    def from_model(cls, model: str, device: str | None = "cpu", dtype: str | None = None) -> DiffusersBackend:
        dt = resolve_dtype(dtype)
        dev = resolve_device(device)
        return cls(load_pipeline(model, dt), dev, dt)

    # --- images and prompts -------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> LatentDistribution:
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        sf = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return LatentDistribution((dist.mean - shift) * sf, dist.std * sf)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        sf = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode((latents / sf + shift).to(self.dtype)).sample.float()

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self._ids(prompts))[0]

    def truncated_part(self, prompt: str) -> str:
        ids = self.tokenizer(prompt, truncation=False).input_ids
        limit = self.tokenizer.model_max_length
        if len(ids) <= limit:
            return ""
        return self.tokenizer.decode(ids[limit - 1 : -1]).strip()

    # --- LoRAs --------------------------------------------------------------------------
    def _model_of(self, name: str) -> torch.nn.Module:
        if name == UNET:
            return self.unet
        if name in (TEXT_DELTA, TEXT_EXTRA):
            return self.text_encoder
        raise ValueError(f"unknown LoRA name {name!r}")

    def _stem(self, name: str, module_name: str) -> str:
        return unet_stem(module_name) if name == UNET else text_encoder_stem(module_name)

    def _targets(self, name: str) -> dict[str, torch.nn.Module]:
        """stem -> base module, for every layer DAC targets in that model."""
        from peft.tuners.lora import LoraLayer

        targets = UNET_TARGETS if name == UNET else TEXT_TARGETS
        out = {}
        for n, m in self._model_of(name).named_modules():
            if isinstance(m, LoraLayer):
                m = m.get_base_layer()
            elif ".base_layer" in n or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if any(n == t or n.endswith("." + t) for t in targets):
                out[self._stem(name, n)] = m
        return out

    def lora_shapes(self, name):
        return {stem: m.weight.shape for stem, m in self._targets(name).items()}

    def attach_lora(self, name, lora, trainable=False):
        from peft import LoraConfig, inject_adapter_in_model

        model = self._model_of(name)
        self.detach_lora(name)
        targets = self._targets(name)
        part = fitting_part(lora, name == UNET, {s: m.weight.shape for s, m in targets.items()})
        modules = {self._module_name(name, s): s for s in part.layers}
        ranks = {n: part.layers[s].rank for n, s in modules.items()}
        alphas = {n: part.layers[s].alpha for n, s in modules.items()}
        r = max(ranks.values())
        config = LoraConfig(
            r=r, lora_alpha=r, target_modules=list(modules), init_lora_weights=True,
            rank_pattern={n: v for n, v in ranks.items() if v != r}, alpha_pattern=alphas,
        )
        with warnings.catch_warnings():  # a second adapter on one model is intended here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, model, adapter_name=name)
        layers = _lora_layers(model)
        active = sorted({a for _, m in layers for a in m.lora_A.keys()})
        for module_name, m in layers:
            if name not in m.lora_A:
                continue
            m.set_adapter(active)  # peft marks every active adapter trainable; fixed below
            layer = part.layers[self._stem(name, module_name)]
            m.lora_A[name].float()  # LoRA weights stay float32 whatever the model's dtype (peft
            m.lora_B[name].float()  # casts the input to them and the sum back to the model's dtype)
            m.lora_A[name].weight.data.copy_(layer.down.to(m.lora_A[name].weight))
            m.lora_B[name].weight.data.copy_(layer.up.to(m.lora_B[name].weight))
        trainable_names = {name} if trainable else set()
        params = []
        for _, m in layers:
            for adapter in m.lora_A.keys():
                for p in (*m.lora_A[adapter].parameters(), *m.lora_B[adapter].parameters()):
                    p.requires_grad_(adapter in trainable_names)
                    if adapter in trainable_names:
                        params.append(p)
        for p in model.parameters():
            if not any(p is q for q in params):
                p.requires_grad_(False)
        if name == UNET:
            self._unet_scale = 1.0
            self._hooks = [m.register_forward_pre_hook(self._scale_hook) for _, m in layers if UNET in m.lora_A]
        return params

    def _module_name(self, name: str, stem: str) -> str:
        for n, _ in self._model_of(name).named_modules():
            if self._stem(name, n) == stem:
                return n
        raise DACError(f"LoRA layer {stem} has no module in this model")

    def _scale_hook(self, module, args):
        scale = self._unet_scale
        base = module.lora_alpha[UNET] / module.r[UNET]
        if isinstance(scale, torch.Tensor):
            x = args[0]
            if scale.shape[0] != x.shape[0]:
                raise ValueError(f"UNet LoRA strength has {scale.shape[0]} entries for a batch of {x.shape[0]}")
            module.scaling[UNET] = base * scale.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        else:
            module.scaling[UNET] = base * scale

    def detach_lora(self, name):
        model = self._model_of(name)
        for _, m in _lora_layers(model):
            if name in m.lora_A:
                m.delete_adapter(name)
        if name == UNET:
            for h in self._hooks:
                h.remove()
            self._hooks = []
        # Layers with no adapter left are unwrapped, so the model is as it was.
        for module_name, m in _lora_layers(model):
            if not m.lora_A:
                parent_name, _, child = module_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, m.get_base_layer())
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs:
                del model.peft_config

    def export_lora(self, name) -> LoRA:
        layers = {}
        for module_name, m in _lora_layers(self._model_of(name)):
            if name in m.lora_A:
                layers[self._stem(name, module_name)] = LoRALayer(
                    m.lora_A[name].weight.detach().float().cpu().clone(),
                    m.lora_B[name].weight.detach().float().cpu().clone(),
                    float(m.lora_alpha[name]),
                )
        if not layers:
            raise ValueError(f"no LoRA {name!r} is attached")
        return LoRA(layers)

    def set_lora_scale(self, name, scale):
        if name == UNET:
            self._unet_scale = scale
            return
        for _, m in _lora_layers(self._model_of(name)):
            if name in m.lora_A:
                m.scaling[name] = float(scale) * m.lora_alpha[name] / m.r[name]

    # --- training and sampling ----------------------------------------------------------
    def loss(self, latents, noise, timesteps, cond):
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(latents, noise, timesteps)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise DACError(f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        pred = self.unet(noisy.to(self.dtype), timesteps, cond.to(self.dtype)).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    @torch.no_grad()
    def sample(self, cond, uncond, noise, steps, cfg, unet_scale, progress=None):
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device, torch.float32) * sched.init_noise_sigma
        guided = cfg != 1.0
        emb = torch.cat([uncond, cond]) if guided else cond
        last = self.num_train_timesteps - 1
        for i, t in enumerate(sched.timesteps):
            x = torch.cat([latents] * 2) if guided else latents
            x = sched.scale_model_input(x, t)
            frac = torch.full((latents.shape[0],), float(t) / last, dtype=torch.float64)
            scale = unet_scale(frac)
            self.set_lora_scale(UNET, torch.cat([scale] * 2) if guided else scale)
            pred = self.unet(x.to(self.dtype), t, emb.to(self.dtype)).sample.float()
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
            for label, m in (("unet", self.unet), ("text_encoder", self.text_encoder), ("vae", self.vae)):
                config = getattr(m, "config", None)
                config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
                configs.append({k: v for k, v in config.items()
                                if not k.startswith("_") and k != "transformers_version"})
                tensors += [(f"{label}.{n.replace('.base_layer', '')}", p) for n, p in m.state_dict().items()
                            if "lora_" not in n]
            self._fingerprint = fingerprint_weights(tensors, json.dumps(configs, sort_keys=True, default=str))
        return self._fingerprint
