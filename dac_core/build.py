"""Stable Diffusion (1.x / 2.x and XL) pipelines made from configs with seeded random
weights, and CLIP tokenizers made from a vocabulary: the one builder behind the tiny test
models (`dac_core.tiny`) and the world model before its training (`dac_core.world.model`)."""

from __future__ import annotations

import json
import os
import tempfile

import torch

MODELS = ("unet", "vae", "text_encoder")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-level base vocabulary: every byte, alone and word-final ("</w>")."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    return vocab


def clip_tokenizer(vocab: dict[str, int], merges: list[str]):
    """A CLIPTokenizer (77 tokens) from a vocabulary and BPE merges; adds the two specials."""
    from transformers import CLIPTokenizer

    vocab = {**vocab, "<|startoftext|>": len(vocab)}
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
    tok.model_max_length = 77
    return tok


def build_sd_pipeline(unet_config: dict, vae_config: dict, text_config: dict, scheduler_config: dict, tokenizer,
                      seed: int = 0, order: tuple[str, ...] = MODELS):
    """A StableDiffusionPipeline (DDIM scheduler, no safety checker) of a UNet2DConditionModel,
    an AutoencoderKL and a CLIPTextModel made from their configs, with random weights drawn
    from `seed` (the global random state is left as it was). The text encoder gets the
    tokenizer's vocabulary size and special tokens. The three models draw their weights in
    turn from one random stream, in `order` (a permutation of MODELS), so the order is part
    of the weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if sorted(order) != sorted(MODELS):
        raise ValueError(f"order must name each of {MODELS} once, got {order}")
    make = {
        "unet": lambda: UNet2DConditionModel(**unet_config),
        "vae": lambda: AutoencoderKL(**vae_config),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(
            **text_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {name: make[name]() for name in order}
    return StableDiffusionPipeline(**models, tokenizer=tokenizer, scheduler=DDIMScheduler(**scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl_pipeline(unet_config: dict, vae_config: dict, text_config: dict, text2_config: dict,
                        scheduler_config: dict, tokenizer, tokenizer_2, seed: int = 0):
    """A StableDiffusionXLPipeline (Euler scheduler, as SDXL base) of a UNet2DConditionModel
    with SDXL's added conditioning, an AutoencoderKL, a CLIPTextModel and a
    CLIPTextModelWithProjection made from their configs, random weights drawn from `seed`
    in that order (the global random state is left as it was)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config_for(config, tok):
        return CLIPTextConfig(**config, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(text_config_for(text_config, tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(text_config_for(text2_config, tokenizer_2))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**scheduler_config),
        add_watermarker=False)
