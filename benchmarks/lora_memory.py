"""LoRA sizes and training memory of DAC's two LoRAs on real Stable Diffusion shapes.

Counts parameters exactly from the models' architectures (built on PyTorch's meta device:
no weights, nothing downloaded) and prints the memory the LoRA alone needs while training
with AdamW in float32: weights + gradients + two Adam moments = 16 bytes per parameter.
The base model comes on top (SD 1.5 fp32 about 4 GB for UNet + text encoder + VAE).

    python benchmarks/lora_memory.py
"""

from __future__ import annotations

import torch
from sd_shapes import CLIP_L, OPENCLIP_H, SD15, SD21

from dac_core.lora import TEXT_TARGETS, UNET_TARGETS


def lora_parameters(model: torch.nn.Module, targets, rank: int) -> int:
    total = 0
    for name, m in model.named_modules():
        targeted = any(name == t or name.endswith("." + t) for t in targets)
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and targeted:
            w = m.weight
            total += rank * (w[0].numel() + w.shape[0])  # down [r, in*k*k] + up [out, r]
    return total


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


if __name__ == "__main__":
    main()
