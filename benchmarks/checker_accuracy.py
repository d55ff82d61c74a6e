"""Accuracy of the synthetic world's checker (dac_core.world.check) on held-out renders.

Scenes are drawn from a seed the checker was never looked at with; each image is degraded
the way a generated image might be (Gaussian pixel noise, a slight blur, JPEG), then:
- matching pairs: the checker must pass the scene's own image on every attribute;
- mismatching pairs: the image of an edited scene (one edit of each type) must fail.
Accuracy = correct verdicts / pairs, printed per degradation.

    python benchmarks/checker_accuracy.py [--scenes 500]
"""

from __future__ import annotations

import argparse
import io
import random

import numpy as np
from PIL import Image, ImageFilter

from dac_core import world as W


def degrade(img, noise: float, blur: float, jpeg: int | None, seed: int):
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    arr = np.asarray(img).astype(float)
    arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def accuracy(n_scenes: int, noise: float, blur: float, jpeg: int | None, seed: int = 12345) -> tuple[float, float]:
    rng = random.Random(seed)
    match_ok = mismatch_ok = mismatches = 0
    for k in range(n_scenes):
        scene = W.random_scene(rng)
        match_ok += W.check(scene, degrade(W.render(scene), noise, blur, jpeg, k)).all_ok
        edit = W.EDIT_TYPES[k % len(W.EDIT_TYPES)]
        try:
            case = W.make_edit(edit, scene, rng)
        except ValueError:  # e.g. removal needs two objects
            continue
        mismatches += 1
        mismatch_ok += not W.check(scene, degrade(W.render(case.target), noise, blur, jpeg, k)).all_ok
    return match_ok / n_scenes, mismatch_ok / max(mismatches, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500)
    args = parser.parse_args()
    print(f"{args.scenes} held-out scenes (seed 12345), 64x64")
    print(f"{'degradation':<34}{'match acc.':>12}{'mismatch acc.':>15}")
    degradations = (("none", 0, 0, None), ("noise 8", 8, 0, None), ("noise 12 + blur 0.6", 12, 0.6, None),
                    ("noise 8 + blur 0.6 + JPEG 75", 8, 0.6, 75))
    for label, noise, blur, jpeg in degradations:
        m, mm = accuracy(args.scenes, noise, blur, jpeg)
        print(f"{label:<34}{m:>12.3f}{mm:>15.3f}")


if __name__ == "__main__":
    main()
