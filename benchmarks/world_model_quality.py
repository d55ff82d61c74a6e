"""How often a world model draws unseen captions right, on more captions than `training.json`.

The training run checks 50 generated images; a share of 50 is known to about +-11 points
(95%), too coarse to tell 80% from 90%. This draws `--captions` unseen scene captions (none
in the UNet's training set; seed 999 gives the same first 50 as the training run), samples
one image each and prints the share the checker passes on every attribute, with its 95%
Wilson interval, and the share right per attribute.

    python benchmarks/world_model_quality.py [--model DIR] [--captions 200] [--sampler ddim|euler-ancestral] [--why]

`--why` also sorts the images that fail: an object drawn twice (two separate patches of
object colour in its column, `world.blobs`), an object of the wrong shape, size or colour,
or only the background wrong.
"""

from __future__ import annotations

import argparse
import collections
import math
import time

from dac_core import world as W
from dac_core.demo import model_path
from dac_core.diffusers_backend import load_pipeline
from dac_core.files import write_json
from dac_core.world import bench as B
from dac_core.world.evaluate import evaluate
from dac_core.world.train import training_captions


def wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a binomial share (Wilson score interval)."""
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


class Failures:
    """Tally of why images fail the checker (`on_image` for `dac_core.world.evaluate.evaluate`)."""

    def __init__(self):
        self.images = collections.Counter()  # failed images by what is wrong in them
        self.objects = collections.Counter()  # wrong objects by size and what is wrong
        self.passed_twice = 0  # images the checker passes with an object drawn twice

    def __call__(self, scene, image, report) -> None:
        if report.all_ok:
            # two copies each half the blob can still match one template at the IoU bound (0.5)
            self.passed_twice += any(self._twice(scene, image, o.position) for o in scene.objects)
            return
        kinds = set()
        for o in report.objects:
            if o.ok:
                continue
            kind = "drawn twice" if self._twice(scene, image, o.expected.position) else "wrong"
            kinds.add(kind)
            self.objects[f"{o.expected.size} {o.expected.shape}: {kind}"] += 1
        self.images[" and ".join(sorted(kinds)) + " object" if kinds else "background or texture"] += 1

    @staticmethod
    def _twice(scene, image, position: str) -> bool:
        return len(W.blobs(scene, image, position)) >= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a world model folder (default: the shipped one)")
    parser.add_argument("--captions", type=int, default=200, help="unseen captions, one image each")
    parser.add_argument("--seed", type=int, default=999, help="caption seed (999: the training run's 50 first)")
    parser.add_argument("--sampler", choices=("ddim", "euler-ancestral"), default="ddim")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--why", action="store_true", help="also sort the failed images by what is wrong")
    args = parser.parse_args()

    pipe = load_pipeline(args.model or model_path())
    if args.sampler == "euler-ancestral":
        from diffusers import EulerAncestralDiscreteScheduler

        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    unseen_only = training_captions()
    start = time.time()
    failures = Failures() if args.why else None
    rates = evaluate(pipe, n=args.captions, seed=args.seed, steps=args.steps, cfg=args.guidance, exclude=unseen_only,
                     on_image=failures)
    seconds = time.time() - start
    low, high = wilson(rates["all"], args.captions)
    env = B.environment("cpu")
    print(f"{args.captions} unseen captions (seed {args.seed}), {args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance}, {seconds:.0f} s; {env}")
    print(f"every attribute right: {rates['all']:.1%} (95% interval {low:.1%} - {high:.1%})")
    print("per attribute: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items() if k != "all"))
    if failures is not None:
        print("failed images: " + ", ".join(f"{n} {k}" for k, n in failures.images.most_common()))
        print("wrong objects: " + ", ".join(f"{n} {k}" for k, n in failures.objects.most_common()))
        print(f"passed, but with an object drawn twice: {failures.passed_twice}")
    if args.json:
        record = {**vars(args), **env, "seconds": seconds, "interval_95": [low, high], **rates}
        if failures is not None:
            record.update(failed_images=dict(failures.images), wrong_objects=dict(failures.objects),
                          passed_twice=failures.passed_twice)
        write_json(args.json, record)


if __name__ == "__main__":
    main()
