"""LoRA sizes and training memory of DAC's two LoRAs on real Stable Diffusion shapes.

Counts parameters exactly from the models' architectures (built on PyTorch's meta device:
no weights, nothing downloaded) and prints the memory the LoRA alone needs while training
with AdamW in float32: weights + gradients + two Adam moments = 16 bytes per parameter.
The base model comes on top (SD 1.5 fp32 about 4 GB for UNet + text encoder + VAE).

For SDXL base 1.0 it also prints the base model (UNet, both text encoders, VAE) in bf16 and
fp32, and a "LoRA training total": the bf16 base + the LoRA at 16 bytes per parameter, without
activations. Only the text-LoRA layers that reach the UNet are counted: CLIP-L's first 11 of
12 (SDXL reads its penultimate hidden state), all 32 of bigG's (its pooled output, which the
UNet also reads, comes from the last layer). G is GiB (2**30 bytes).

    python benchmarks/lora_memory.py
"""

from __future__ import annotations

import torch
from sd_shapes import CLIP_L, CLIP_L_SDXL, OPENCLIP_BIGG, OPENCLIP_H, SD15, SD21, SDXL, SDXL_VAE

from dac_core.lora import TEXT_TARGETS, UNET_TARGETS


def lora_parameters(model: torch.nn.Module, targets, rank: int) -> int:
    total = 0
    for name, m in model.named_modules():
        targeted = any(name == t or name.endswith("." + t) for t in targets)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and targeted:
            w = m.weight
            total += rank * (w[0].numel() + w.shape[0])  # down [r, in*k*k] + up [out, r]
    return total


def text_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """A CLIP text encoder's transformer layers (transformers 5.x dropped CLIPTextModel's `text_model`)."""
    return getattr(model, "text_model", model).encoder.layers


def sdxl() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_SDXL))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
        vae = AutoencoderKL(**SDXL_VAE)
    print("\nSDXL base 1.0, base model (weights only)")
    print(f"{'model':<30}{'parameters':>16}{'bf16':>12}{'fp32':>12}")
    base = {"UNet": unet, "text encoder (CLIP-L)": clip_l, "text encoder 2 (OpenCLIP bigG)": bigg, "VAE": vae}
    counts = {label: sum(p.numel() for p in m.parameters()) for label, m in base.items()}
    for label, n in (*counts.items(), ("total", sum(counts.values()))):
        print(f"{label:<30}{n:>16,}{n * 2 / 2**30:>10.2f} G{n * 4 / 2**30:>10.2f} G")
    base_bf16 = sum(counts.values()) * 2

    print("\nSDXL base 1.0, LoRAs; LoRA training total = bf16 base + LoRA training, activations not included")
    print(f"{'LoRA':<40}{'rank':>6}{'parameters':>16}{'fp32 file':>12}{'training':>12}{'LoRA training total':>22}")
    layers_l, layers_g = text_layers(clip_l), text_layers(bigg)
    text_l = lora_parameters(layers_l[:-1], TEXT_TARGETS, 4)  # the last layer's output is never read
    text_g = lora_parameters(layers_g, TEXT_TARGETS, 4)
    rows = [("UNet (U)", rank, lora_parameters(unet, UNET_TARGETS, rank)) for rank in (16, 32, 64, 128, 256, 512)]
    rows += [(f"text (Delta) CLIP-L, layers 1-{len(layers_l) - 1} of {len(layers_l)}", 4, text_l),
             (f"text (Delta) bigG, layers 1-{len(layers_g)} of {len(layers_g)}", 4, text_g),
             ("text (Delta) both encoders", 4, text_l + text_g)]
    for what, rank, n in rows:
        print(f"{what:<40}{rank:>6}{n:>16,}{n * 4 / 2**30:>10.2f} G{n * 16 / 2**30:>10.2f} G"
              f"{(base_bf16 + n * 16) / 2**30:>20.2f} G")


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    print(f"torch {torch.__version__}; parameter counts are exact, memory is computed (fp32, AdamW), not measured")
    print(f"{'model':<22}{'LoRA':<14}{'rank':>6}{'parameters':>14}{'fp32 file':>12}{'training':>12}")
    with torch.device("meta"):
        models = {
            "SD 1.5": (UNet2DConditionModel(**SD15), CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "SD 2.1 (base / 768)": (UNet2DConditionModel(**SD21), CLIPTextModel(CLIPTextConfig(**OPENCLIP_H))),
        }
    for label, (unet, text) in models.items():
        for what, model, targets, ranks in (("UNet (U)", unet, UNET_TARGETS, (64, 128, 256, 512)),
                                            ("text (Delta)", text, TEXT_TARGETS, (4,))):
            for rank in ranks:
                n = lora_parameters(model, targets, rank)
                print(f"{label:<22}{what:<14}{rank:>6}{n:>14,}{n * 4 / 2**30:>10.2f} G{n * 16 / 2**30:>10.2f} G")
    sdxl()


if __name__ == "__main__":
    main()
