"""How often a world model draws what captions say: images generated from the captions of
unseen scenes, checked by `dac_core.world.check`; and the VAE's ceiling on that
(`vae_match_rate`). `benchmarks/world_model_quality.py` runs `evaluate` on more captions.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .. import world as W


@torch.no_grad()
def vae_match_rate(vae, n: int = 50, seed: int = 998) -> float:
    """Fraction of unseen scenes whose VAE reconstruction passes the checker: the ceiling for
    anything generated through this VAE."""
    from PIL import Image

    rng = random.Random(seed)
    ok = 0
    for _ in range(n):
        scene = W.random_scene(rng)
        x = torch.from_numpy(np.asarray(W.render(scene), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample[0]
        image = Image.fromarray(((rec.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
        ok += W.check(scene, image).all_ok
    return ok / n


def evaluate(pipe, n: int = 50, seed: int = 999, steps: int = 30, cfg: float = 4.0,
             exclude: set[str] = frozenset(), chunk: int = 10, on_image=None) -> dict[str, float]:
    """Check images generated from captions of `n` unseen scenes (none in `exclude`): the
    fraction that match every attribute (`all`), and per attribute the fraction of objects
    (shape, colour, size, position) or images (background, texture, no extra objects) right.
    `on_image(scene, image, report)`, if given, sees each image and its checker report."""
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    scenes: list = []
    while len(scenes) < n:
        scene = W.random_scene(rng)
        if W.caption(scene) not in exclude:
            scenes.append(scene)
    per_object = ("shape", "colour", "size", "position")
    counts = dict.fromkeys(("all", *per_object, "background", "texture", "no_extra"), 0)
    objects = 0
    for start in range(0, n, chunk):
        part = scenes[start:start + chunk]
        images = pipe([W.caption(s) for s in part], num_inference_steps=steps, guidance_scale=cfg, height=W.SIZE,
                      width=W.SIZE, generator=[torch.Generator().manual_seed(start + i) for i in range(len(part))]
                      ).images
        for scene, image in zip(part, images):
            report = W.check(scene, image)
            if on_image is not None:
                on_image(scene, image, report)
            counts["all"] += report.all_ok
            counts["background"] += report.background_ok
            counts["texture"] += report.texture_ok
            counts["no_extra"] += not report.extra_objects
            for o in report.objects:
                objects += 1
                for key in per_object:
                    counts[key] += getattr(o, f"{key}_ok")
    return {k: v / (objects if k in per_object else n) for k, v in counts.items()}
