"""The narrow interface DAC's stages are written against.

A backend owns one diffusion model (UNet, text encoder, VAE, noise schedule) and knows how
to attach LoRAs to it, set their strengths, compute the training loss and run a sampler.
`dac_core.stages` holds the algorithm once; `DiffusersBackend` (here) and the ComfyUI
backend (in the node pack) only translate. Timesteps are integers 0 .. 999 in training and
noise-level fractions 0 (clean) .. 1 (pure noise) in sampling, so any sampler fits.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .lora import LoRA

UNET = "unet"
# Names of text-encoder LoRAs: the visual transition Delta (Abduction-2) and the optional
# frozen extra LoRA T fitted on the source prompt (DAC_SPEC.md, "complex images").
TEXT_DELTA = "delta"
TEXT_EXTRA = "extra"


def fingerprint_weights(named_tensors, salt: str = "") -> str:
    """16 hex digits of sha256 over names, shapes and a strided sample of every tensor: cheap
    on multi-GB models, and different for any other base model."""
    h = hashlib.sha256(salt.encode())
    for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = tensor.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the text encoders' hidden
    states [B, tokens, D] and, for SDXL, the pooled text embedding [B, P] (None for SD
    1.x / 2.x). Indexing selects samples, as on a tensor."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, index) -> Conditioning:
        return Conditioning(self.context[index], None if self.pooled is None else self.pooled[index])

    def __len__(self) -> int:
        return self.context.shape[0]

    def detach(self) -> Conditioning:
        return Conditioning(self.context.detach(), None if self.pooled is None else self.pooled.detach())

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        pooled = [c.pooled for c in items]
        return Conditioning(torch.cat([c.context for c in items]),
                            None if any(p is None for p in pooled) else torch.cat(pooled))


@dataclass
class LatentDistribution:
    """The VAE's posterior of the source image, kept so each step re-samples a latent
    (the reference re-encodes the image every step; this is equivalent and cheaper)."""

    mean: torch.Tensor  # [1, C, h, w], already multiplied by the VAE scaling factor
    std: torch.Tensor

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn((batch_size, *self.mean.shape[1:]), generator=generator, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)


class DACBackend(ABC):
    num_train_timesteps: int = 1000
    device: torch.device
    native_side: int  # the model's native image side in pixels (512 for SD 1.5 / 2.1-base)
    latent_factor: int  # pixels per latent pixel (8 for SD)
    latent_channels: int  # 4 for SD 1.x / 2.x and SDXL
    architecture: str = "sd"  # "sd" (1.x / 2.x) or "sdxl"
    # SDXL's size conditioning: the photo's (width, height) before it was resized for the
    # stages (its "original size"; crop 0, target size = the latents' size). None: the
    # latents' size. SD 1.x / 2.x ignore it.
    original_size: tuple[int, int] | None = None
    # What the model computes in while training (LoRA weights stay float32); float16 makes
    # the stages scale the loss (torch.amp.GradScaler).
    training_dtype: torch.dtype = torch.float32
    # AdamW as one fused kernel per step (the same update, rounded differently); False: torch's
    # default implementation, as the reference scripts use it.
    fused_optimizer: bool = True

    # --- images and prompts -------------------------------------------------------------
    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> LatentDistribution:
        """[1, 3, H, W] in [-1, 1] -> the VAE posterior (scaled latents)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, 3, H, W] in [-1, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text-encoder output with the text LoRAs attached at their current strengths.
        Differentiable when a text LoRA is trainable and grad is enabled."""

    @abstractmethod
    def truncated_part(self, prompt: str) -> str:
        """The part of `prompt` beyond the text encoder's token limit ("" if it fits)."""

    # --- LoRAs --------------------------------------------------------------------------
    @abstractmethod
    def lora_shapes(self, name: str) -> dict[str, torch.Size]:
        """kohya stem -> base weight shape, for every layer LoRA `name` targets in this model."""

    @abstractmethod
    def attach_lora(self, name: str, lora: LoRA, trainable: bool = False) -> list[torch.nn.Parameter]:
        """Attach LoRA `name` (UNET, TEXT_DELTA or TEXT_EXTRA) with `lora`'s weights, replacing
        one of that name. Returns the trainable parameters (none unless `trainable`); the
        base weights never train."""

    @abstractmethod
    def detach_lora(self, name: str) -> None:
        """Remove LoRA `name`; the model is as before it was attached."""

    @abstractmethod
    def export_lora(self, name: str) -> LoRA:
        """The current weights of LoRA `name` (detached copies, kohya stems)."""

    @abstractmethod
    def set_lora_scale(self, name: str, scale: float | torch.Tensor) -> None:
        """Strength of LoRA `name`: a number, or for UNET a per-sample tensor [B] that
        applies to the next forward passes of a batch of B."""

    # --- training and sampling ----------------------------------------------------------
    @abstractmethod
    def loss(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """Per-sample diffusion loss [B]: MSE between the UNet's output on the noised
        latents and its target (the noise, or the velocity for v-prediction models)."""

    @abstractmethod
    def sample(
        self,
        cond: Conditioning,
        uncond: Conditioning,
        noise: torch.Tensor,
        steps: int,
        cfg: float,
        unet_scale: Callable[[torch.Tensor], torch.Tensor],
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise `noise` [B, C, h, w] (unit Gaussian) with classifier-free guidance.
        Before every model call the UNet LoRA strength is set to unet_scale(fractions),
        fractions [B] being the current noise level (0 clean .. 1 pure noise)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short hash identifying the base model's weights."""
