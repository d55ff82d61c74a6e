"""Tiny Stable-Diffusion-shaped models, built from configs with seeded random weights.

The test suite's models (built by `dac_core.build`). Their output is noise: the weights are
random (the trained model of the synthetic world, which `dac-edit --demo` uses, is
`dac_core.world.model`'s). They exercise every code path of the real SD 1.x / 2.x and SDXL
pipelines (same classes, same LoRA target layers, SDXL's two text encoders, pooled
embedding and size conditioning) at a size that trains at ~50 steps/s on a CPU.
"""

from __future__ import annotations

from .build import build_sd_pipeline, build_sdxl_pipeline, byte_vocab, clip_tokenizer

# SD 1.x-style: epsilon prediction, Conv2d proj_in/proj_out. SD 2.x-style: v-prediction,
# linear projections. Both have every layer type DAC's UNet LoRA targets.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,  # ComfyUI's UNet has 32 groups everywhere: the same weights load in both
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# SDXL-style: linear projections, two transformer blocks in the second level (SDXL's
# transformer_layers_per_block > 1), added conditioning of the pooled embedding of the
# second text encoder and six size ids, each embedded in 256 channels as in SDXL (and as
# ComfyUI fixes it), cross-attention over both encoders' hidden states concatenated.
# (CLIP-L read at its penultimate layer needs three layers in ComfyUI.)
SDXL_TEXT1_CONFIG = dict(TEXT_CONFIG, num_hidden_layers=3)
SDXL_TEXT_CONFIG = dict(TEXT_CONFIG, hidden_act="gelu", num_hidden_layers=3)
SDXL_TIME_EMBED_DIM = 256
SDXL_UNET_CONFIG = dict(
    UNET_CONFIG,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=SDXL_TEXT1_CONFIG["hidden_size"] + SDXL_TEXT_CONFIG["hidden_size"],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=SDXL_TEXT_CONFIG["projection_dim"] + 6 * SDXL_TIME_EMBED_DIM,
)
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
FLAVOURS = ("sd1", "sd2", "sdxl")


def tiny_tokenizer():
    """A CLIPTokenizer over single bytes (no merges): one token per character, 77 max."""
    return clip_tokenizer(byte_vocab(), [])


def tiny_pipeline(flavour: str = "sd1", seed: int = 0):
    """A pipeline of tiny random models: `flavour` "sd1" (epsilon) or "sd2" (v), a
    StableDiffusionPipeline; "sdxl", a StableDiffusionXLPipeline."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    if flavour == "sdxl":
        tokenizer_2 = tiny_tokenizer()
        tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer
        return build_sdxl_pipeline(SDXL_UNET_CONFIG, {**VAE_CONFIG, "scaling_factor": 0.13025}, SDXL_TEXT1_CONFIG,
                                   SDXL_TEXT_CONFIG, SDXL_SCHEDULER_CONFIG, tiny_tokenizer(), tokenizer_2, seed)
    sd2 = flavour == "sd2"
    return build_sd_pipeline({**UNET_CONFIG, "use_linear_projection": sd2}, VAE_CONFIG, TEXT_CONFIG,
                             {**SCHEDULER_CONFIG, "prediction_type": "v_prediction" if sd2 else "epsilon"},
                             tiny_tokenizer(), seed, order=("unet", "vae", "text_encoder"))


def save_tiny_model(path: str, flavour: str = "sd1", seed: int = 0) -> str:
    """Write a tiny pipeline as a diffusers folder at `path` (what `--model` accepts)."""
    tiny_pipeline(flavour, seed).save_pretrained(path, safe_serialization=True)
    return path


def demo_image(size: tuple[int, int] = (96, 64)):
    """A test photo: a red disc on a blue-green ground (made in code, no file)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (40, 110, 160))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, h * 2 // 3, w, h], fill=(60, 150, 70))
    r = h // 4
    draw.ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=(210, 40, 40))
    return img
