"""The world model: a small Stable-Diffusion-architecture text-to-image model of the
synthetic world, in diffusers format: AutoencoderKL (64x64 pixels <-> 32x32x4 latents),
UNet2DConditionModel, CLIPTextModel, a CLIPTokenizer in which every world word is one token,
and a DDIM scheduler (v-prediction on a zero-terminal-SNR schedule, trailing timesteps).

Here: its configs and its untrained pipeline (`build_pipeline`). `dac_core.world.train`
trains it, `dac_core.world.evaluate` checks what it draws; the trained model ships in
dac_core/assets/world_model (`dac_core.demo.model_path`). The design notes and
measurements are in docs/world_model.md.
"""

from __future__ import annotations

import torch

from .. import world as W
from ..build import build_sd_pipeline, byte_vocab, clip_tokenizer

WORDS = sorted(set(W.SHAPES) | set(W.COLOURS) | set(W.TEXTURES) | set(W.SIZES)
               | {"left", "right", "middle", "on", "the", "in", "a", "and", "background"})

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 32), sample_size=W.SIZE, mid_block_add_attention=False,
)  # 64x64 pixels <-> 32x32x4 latents; one normalisation group keeps the background colour (docs/world_model.md)
UNET_CONFIG = dict(
    sample_size=W.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 96, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=8,
)  # text attention at 16x16 and 8x8 latents; 8 normalisation groups keep colour (see VAE_CONFIG)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, projection_dim=128)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                        rescale_betas_zero_snr=True, timestep_spacing="trailing")


def world_tokenizer():
    """A CLIPTokenizer whose BPE merges make every world word one token (any other text
    still tokenizes, by characters). Merge order is settled so no word's merges block
    another's."""
    def word_merges(w):
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        cur, out = symbols[0], []
        for s in symbols[1:]:
            out.append((cur, s))
            cur = cur + s
        return out

    order = list(WORDS)
    for _ in range(len(WORDS)):
        vocab = byte_vocab()
        merges: list[str] = []
        for w in order:
            for a, b in word_merges(w):
                if f"{a} {b}" not in merges:
                    merges.append(f"{a} {b}")
                vocab.setdefault(a + b, len(vocab))
        tok = clip_tokenizer(vocab, merges)
        split = [w for w in WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tok
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"could not make these words single tokens: {split}")


def build_pipeline(seed: int = 0):
    """The untrained pipeline (random weights from `seed`)."""
    pipe = build_sd_pipeline(UNET_CONFIG, VAE_CONFIG, TEXT_CONFIG, SCHEDULER_CONFIG, world_tokenizer(), seed,
                             order=("vae", "unet", "text_encoder"))
    # posterior std 0.007 everywhere, and it stays there: `train_vae` never samples
    with torch.no_grad():
        pipe.vae.quant_conv.weight[VAE_CONFIG["latent_channels"]:] = 0.0
        pipe.vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = -10.0
    return pipe
