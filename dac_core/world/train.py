"""Training of the world model (`dac_core.world.model`) from scratch on random scenes, in
three stages: the VAE, an autoencoder on the posterior mean (reconstruction MSE and a small
penalty on the latents' size); the text encoder on captions alone (a linear read-out of its
states must give back every attribute of the scene, as SD's text encoder comes
pre-trained); then the UNet, text encoder frozen, on a fixed set of encoded scenes
(v-prediction, min-SNR-5 weights, the objects' latent pixels weighted 1 + 5 times, 10%
empty captions for classifier-free guidance, EMA weights). Step counts, not time limits,
so the same seed gives the same model on the same torch build.

    python -m dac_core.world.train --out DIR   # --vae-steps 3000 --text-steps 300 --unet-steps 4000 --object-weight 5

The VAE stage is saved in OUT/vae and reused when the command runs again with the same
seed and VAE steps. The shipped model (dac_core/assets/world_model; its training.json is
the record) was trained by this command with the defaults. The design notes and measurements
are in docs/world_model.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import world as W
from ..files import write_json
from .evaluate import evaluate, vae_match_rate
from .model import build_pipeline

log = logging.getLogger("dac_core")

DATASET_SIZE = 16384  # scenes the UNet stage trains on (rendered and encoded once)
OBJECT_WEIGHT = 5.0  # the UNet's loss counts the objects' latent pixels 1 + 5 times (docs/world_model.md)


def batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list]:
    """`size` random scenes, rendered (in [-1, 1], NCHW), and the scenes."""
    scenes = [W.random_scene(rng) for _ in range(size)]
    images = np.stack([np.asarray(W.render(s), np.float32) for s in scenes]) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2), scenes


def _schedule(opt, steps: int, warmup: int = 100):
    """Linear warm-up, then cosine decay to a tenth of the learning rate at `steps`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(pipe, steps: int, batch_size: int = 16, lr: float = 2e-3, latent_weight: float = 1e-4,
              seed: int = 0) -> list[float]:
    """Train the VAE as a plain autoencoder on the posterior mean (reconstruction MSE plus a
    small penalty on the latents' size); the log-variance keeps its initial -10 (why: docs/world_model.md)."""
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    rng, losses = random.Random(seed), []
    torch.manual_seed(seed)
    for step in range(steps):
        x, _ = batch(rng, batch_size)
        z = vae.encode(x).latent_dist.mode()
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + latent_weight * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(mse.item())
        if step % 100 == 0:
            log.info("vae step %d reconstruction mse %.5f", step, mse.item())
    vae.eval().requires_grad_(False)
    return losses


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions as the text encoder takes them: padded to the tokenizer's 77 positions."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_dataset(vae, tokenizer, n: int, seed: int, chunk: int = 64):
    """Render `n` random scenes once and keep what the UNet stage needs: the latents (the
    posterior mean; its std is 0.007), the caption's token ids and the objects' masks at the
    latents' size (`latent_object_mask`)."""
    rng = random.Random(seed)
    latents, ids, masks = [], [], []
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, scenes = batch(rng, min(chunk, n - start))
            latents.append(vae.encode(x).latent_dist.mode())
            ids.append(token_ids(tokenizer, [W.caption(s) for s in scenes]))
            masks += [latent_object_mask(s, latents[-1].shape[-1]) for s in scenes]
    return torch.cat(latents), torch.cat(ids), torch.stack(masks)


def latent_object_mask(scene, size: int) -> torch.Tensor:
    """Where the scene's objects are, at latent size (bool [size, size]): a latent pixel
    counts if any pixel it covers is an object's, then grown by one latent pixel so the
    outlines, where shapes differ, are in."""
    m = torch.from_numpy(W.objects_mask(scene))[None, None].float()
    m = F.max_pool2d(m, W.SIZE // size)
    return F.max_pool2d(m, 3, stride=1, padding=1)[0, 0] > 0


def scene_labels(scene) -> list[int]:
    """The class indices `train_text_encoder` predicts from a caption: background colour,
    texture, then per position (left, middle, right) the object's shape, colour and size, 0
    where there is none."""
    slots = {o.position: o for o in scene.objects}
    labels = [BACKGROUND_INDEX[scene.background], W.TEXTURES.index(scene.texture)]
    for position in W.POSITIONS:
        o = slots.get(position)
        labels += [0, 0, 0] if o is None else [1 + W.SHAPES.index(o.shape), 1 + W.OBJECT_COLOURS.index(o.colour),
                                               1 + list(W.SIZES).index(o.size)]
    return labels


BACKGROUND_INDEX = {c: i for i, c in enumerate(W.BACKGROUND_COLOURS)}
LABEL_CLASSES = [len(W.BACKGROUND_COLOURS), len(W.TEXTURES)] + [1 + len(W.SHAPES), 1 + len(W.OBJECT_COLOURS),
                                                                  1 + len(W.SIZES)] * len(W.POSITIONS)


def train_text_encoder(pipe, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Pre-train the text encoder on captions alone, the way SD's text encoder comes
    pre-trained: a linear read-out of its last hidden states, from the end-of-text token on
    (the states the UNet attends to that have seen the whole caption), must give back every
    attribute of the scene. A text encoder trained only through the UNet's loss learnt to
    tell "white" and "gray" apart but not the object colours (docs/world_model.md).
    Returns the losses; the text encoder is frozen afterwards."""
    text_encoder, tokenizer = pipe.text_encoder.train(), pipe.tokenizer
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(text_encoder.config.hidden_size, sum(LABEL_CLASSES))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
        head.bias.zero_()
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps)
    rng, losses = random.Random(seed), []
    for step in range(steps):
        scenes = [W.random_scene(rng) for _ in range(batch_size)]
        ids = token_ids(tokenizer, [W.caption(s) for s in scenes])
        labels = torch.tensor([scene_labels(s) for s in scenes])
        hidden = text_encoder(ids)[0]
        after_end = (ids == tokenizer.eos_token_id).cumsum(1) > 0  # the end token and the padding after it
        logits = head(hidden[after_end]).split(LABEL_CLASSES, dim=-1)
        target = labels[:, None].expand(-1, ids.shape[1], -1)[after_end]
        loss = sum(F.cross_entropy(part, target[:, i]) for i, part in enumerate(logits)) / len(LABEL_CLASSES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            accuracy = torch.stack([part.argmax(-1) == target[:, i] for i, part in enumerate(logits)], 1).all(1)
            log.info("text step %d loss %.5f, captions read back whole: %.3f", step, loss.item(),
                     accuracy.float().mean().item())
    text_encoder.eval().requires_grad_(False)
    return losses


def train_unet(pipe, steps: int, batch_size: int = 16, lr: float = 1e-3, drop_caption: float = 0.1,
               dataset_size: int = DATASET_SIZE, ema_decay: float = 0.995, min_snr: float = 5.0,
               object_weight: float = OBJECT_WEIGHT, seed: int = 0) -> list[float]:
    """Train the UNet on a fixed set of encoded scenes, the text encoder frozen as
    `train_text_encoder` left it; the saved weights are an exponential moving average of the
    trained ones."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder, vae, tokenizer = pipe.unet.train(), pipe.text_encoder, pipe.vae, pipe.tokenizer
    text_encoder.eval().requires_grad_(False)
    latents_all, ids, masks = encode_dataset(vae, tokenizer, dataset_size, seed + 1)
    dataset_size = len(latents_all)
    # latent scale: unit variance of the VAE's latents on the world
    vae.register_to_config(scaling_factor=1.0 / float(latents_all[:1024].std()))
    latents_all = latents_all * vae.config.scaling_factor
    # min-SNR-5 loss weights (Hang et al. 2023), so the noisy steps, where shapes and colours
    # are decided, are not drowned out by the nearly clean ones. In x0 terms: min(SNR + 1, 5)
    # for v (the pure-noise step, where only the caption tells what to draw, keeps weight 1),
    # min(SNR, 5) for epsilon
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    weights = (snr + 1).clamp(max=min_snr) / (snr + 1) if v_prediction else snr.clamp(max=min_snr) / snr
    empty = token_ids(tokenizer, [""])
    params = list(unet.parameters())
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = _schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        pick = torch.randint(0, dataset_size, (batch_size,), generator=gen)
        latents = latents_all[pick]
        drop = torch.rand(batch_size, generator=gen) < drop_caption
        tokens = torch.where(drop[:, None], empty, ids[pick])
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        with torch.no_grad():
            text = text_encoder(tokens)[0]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text).sample
        target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
        error = F.mse_loss(pred, target, reduction="none")
        if object_weight:
            area = 1 + object_weight * masks[pick][:, None].float()
            error = error * area / area.mean()
        loss = (weights[t] * error.mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("unet step %d loss %.5f (mean of last 100: %.5f)", step, loss.item(), np.mean(losses[-100:]))
    with torch.no_grad():
        for q, e in zip(params, ema):
            q.copy_(e)
    unet.eval().requires_grad_(False)
    return losses


def save_model(pipe, out: str) -> None:
    """The pipeline as a diffusers folder with float16 weights (half the size; loaders cast
    them back to the dtype they are asked for)."""
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    for name in ("vae", "unet"):  # a reused VAE remembers the folder it came from: not a thing to ship
        config = _read_record(os.path.join(out, name, "config.json"))
        if config.pop("_name_or_path", None) is not None:
            _write_record(os.path.join(out, name), config, "config.json")


def training_captions(n: int = DATASET_SIZE, seed: int = 1) -> set[str]:
    """The captions of the UNet stage's training scenes (`encode_dataset(..., n, seed)`)."""
    rng = random.Random(seed)
    return {W.caption(W.random_scene(rng)) for _ in range(n)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the world model (see module docstring).")
    p.add_argument("--out", required=True, help="folder for the diffusers pipeline")
    p.add_argument("--vae-steps", type=int, default=3000, help="VAE steps (batch 16)")
    p.add_argument("--text-steps", type=int, default=300, help="text-encoder pre-training steps (batch 64)")
    p.add_argument("--unet-steps", type=int, default=4000, help="UNet steps")
    p.add_argument("--batch-size", type=int, default=16, help="UNet batch size")
    p.add_argument("--dataset-size", type=int, default=DATASET_SIZE, help="encoded scenes the UNet stage trains on")
    p.add_argument("--object-weight", type=float, default=OBJECT_WEIGHT,
                   help="extra loss weight on the objects' latent pixels (0: a plain mean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", type=int, default=50, help="generated images to check at the end (0: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = build_pipeline(args.seed)
    log.info("parameters: vae %.2fM unet %.2fM text %.2fM", *(sum(q.numel() for q in m.parameters()) / 1e6
             for m in (pipe.vae, pipe.unet, pipe.text_encoder)))
    os.makedirs(args.out, exist_ok=True)
    vae_record_path = os.path.join(args.out, "training_vae.json")
    vae_record = {"seed": args.seed, "vae_steps": args.vae_steps}
    saved = _read_record(vae_record_path)
    if saved.get("settings") == vae_record:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae")).requires_grad_(False)
        vae_record = saved
        log.info("reusing the VAE in %s", args.out)
    else:
        start = time.time()
        vae_losses = train_vae(pipe, args.vae_steps, seed=args.seed)
        pipe.vae.save_pretrained(os.path.join(args.out, "vae"))
        vae_record = {"settings": vae_record, "minutes": (time.time() - start) / 60,
                      "final_loss": float(np.mean(vae_losses[-50:])), "match_rate": vae_match_rate(pipe.vae)}
        _write_record(args.out, vae_record, "training_vae.json")
    log.info("VAE: %s", vae_record)
    if not args.unet_steps:
        return
    start = time.time()
    text_losses = train_text_encoder(pipe, args.text_steps, seed=args.seed)
    text_minutes = (time.time() - start) / 60
    start = time.time()
    unet_losses = train_unet(pipe, args.unet_steps, batch_size=args.batch_size, dataset_size=args.dataset_size,
                             object_weight=args.object_weight, seed=args.seed)
    save_model(pipe, args.out)
    record = {"seed": args.seed, "vae": vae_record, "text_steps": args.text_steps, "text_minutes": text_minutes,
              "text_final_loss": float(np.mean(text_losses[-20:])) if text_losses else None,
              "unet_steps": args.unet_steps, "batch_size": args.batch_size,
              "dataset_size": args.dataset_size, "object_weight": args.object_weight,
              "unet_minutes": (time.time() - start) / 60, "unet_final_loss": float(np.mean(unet_losses[-100:])),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    _write_record(args.out, record)  # before the evaluation: a failing evaluation loses nothing
    if args.eval:
        rates = evaluate(pipe, args.eval, exclude=training_captions(args.dataset_size, args.seed + 1))
        record["match_rate"] = rates.pop("all")
        record["attribute_rates"] = rates
        record["eval_images"] = args.eval
        _write_record(args.out, record)
    log.info("done: %s", record)


def _read_record(path: str) -> dict:
    """A saved record, or {} if there is none or it cannot be read (then that stage reruns)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(out: str, record: dict, name: str = "training.json") -> None:
    write_json(os.path.join(out, name), record)


if __name__ == "__main__":
    main()
