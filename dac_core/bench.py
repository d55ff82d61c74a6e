"""Edit-quality benchmark on the synthetic world (issue 4, in progress).

Every method edits the same rendered source image with the same model and seeds; the
checker (`dac_core.world.check`) scores each output against the target spec:

- edit success: the attributes the edit changes are as the target says;
- preservation: every other object and the background are as the source says, and the
  PSNR outside both specs' objects (against the source image) is at least PSNR_MIN
  (not for style edits, which change that region by design);
- joint success: both.

Thresholds are fixed here, before any run: PSNR_MIN = 20 dB.

    python -m dac_core.bench --model PATH [--cases FILE] [--seeds K] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import world as W
from .image import image_to_tensor, tensor_to_images
from .stages import TrainSettings, abduct_text_lora, abduct_unet_lora, counterfactual_sample

log = logging.getLogger("dac_core")
PSNR_MIN = 20.0


@dataclass
class Score:
    edit_ok: bool
    preserved: bool
    psnr: float

    @property
    def joint(self) -> bool:
        return self.edit_ok and self.preserved


def score(case: W.Case, image) -> Score:
    """Edit success and preservation of one output image for one case."""
    source_img = W.render(case.source)
    report = W.check(case.target, image, reference=source_img, reference_scene=case.source)
    changed_positions = {o.position for o in case.target.objects} ^ {o.position for o in case.source.objects}
    changed_positions |= {t.position for t in case.target.objects for s in case.source.objects
                          if t.position == s.position and t != s}
    by_pos = {o.expected.position: o for o in report.objects}
    if case.edit == "style":
        edit_ok = report.texture_ok
    elif case.edit == "removal":
        removed = {o.position for o in case.source.objects} - {o.position for o in case.target.objects}
        edit_ok = not (set(report.extra_objects) & removed)
    else:
        edit_ok = all(by_pos[p].ok for p in changed_positions if p in by_pos)
    kept = [o for p, o in by_pos.items() if p not in changed_positions]
    background = report.background_ok and (report.texture_ok or case.edit == "style")
    extras = set(report.extra_objects) - ({o.position for o in case.source.objects} if case.edit == "removal" else set())
    # a style edit changes the whole background by design: there the PSNR outside the objects
    # measures the edit, not preservation, and is not required
    psnr_ok = case.edit == "style" or (report.psnr or 0) >= PSNR_MIN
    preserved = all(o.ok for o in kept) and background and not extras and psnr_ok
    return Score(edit_ok, preserved, report.psnr if report.psnr is not None else float("nan"))


@dataclass
class Settings:
    unet_steps: int = 300
    te_steps: int = 300
    unet_rank: int = 32
    te_rank: int = 4
    lr: float = 1e-4
    eta: float = 0.8
    sample_steps: int = 30
    cfg: float = 4.0


def run_methods(backend, case: W.Case, s: Settings, seeds: list[int]) -> dict[str, list]:
    """Images (one per seed) of every method for one case."""
    pixels = image_to_tensor(W.render(case.source), (W.SIZE, W.SIZE))
    latents = backend.encode_image(pixels)
    size = (W.SIZE, W.SIZE)
    u = abduct_unet_lora(backend, latents, case.source_prompt, TrainSettings(s.unet_steps, s.lr, s.unet_rank)).lora
    delta = abduct_text_lora(backend, latents, case.target_prompt, u, TrainSettings(s.te_steps, s.lr, s.te_rank),
                             eta=s.eta).lora
    delta_no_anneal = abduct_text_lora(backend, latents, case.target_prompt, u,
                                       TrainSettings(s.te_steps, s.lr, s.te_rank), eta=1.0).lora
    out: dict[str, list] = {}

    def sample(name, unet_lora, text_lora, eta=s.eta, beta=1.0):
        images = []
        for seed in seeds:
            images += tensor_to_images(counterfactual_sample(
                backend, case.target_prompt, unet_lora, text_lora, size, eta=eta, beta=beta, steps=s.sample_steps,
                cfg=s.cfg, seed=seed))
        out[name] = images

    sample("DAC", u, delta)
    sample("target prompt only", None, None)
    sample("Abduction-1 only", u, None, eta=1.0)
    sample("DAC, no annealing (eta=1)", u, delta_no_anneal, eta=1.0)
    sample("DAC, beta=0", u, delta, beta=0.0)
    for strength in (0.5, 0.75):
        out[f"SDEdit {strength}"] = [img2img(backend, case, pixels, strength, seed, s) for seed in seeds]
    return out


@torch.no_grad()
def img2img(backend, case: W.Case, pixels, strength: float, seed: int, s: Settings):
    """SDEdit: noise the source latent to `strength` and denoise with the target prompt."""
    from diffusers import StableDiffusionImg2ImgPipeline

    for name in ("unet", "delta", "extra"):
        backend.detach_lora(name)
    pipe = StableDiffusionImg2ImgPipeline(**backend.pipe.components)
    image = tensor_to_images(pixels)[0]
    return pipe(case.target_prompt, image=image, strength=strength, num_inference_steps=s.sample_steps,
                guidance_scale=s.cfg, generator=torch.Generator().manual_seed(seed)).images[0]


def run(model: str, cases: list[W.Case], s: Settings, seeds: int = 1, device: str = "cpu") -> dict:
    from .diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_model(model, device=device)
    results: dict[str, dict[str, list]] = {}
    start = time.time()
    for k, case in enumerate(cases):
        log.info("case %d/%d (%s): %s -> %s", k + 1, len(cases), case.edit, case.source_prompt, case.target_prompt)
        for method, images in run_methods(backend, case, s, list(range(seeds))).items():
            scores = [score(case, img) for img in images]
            results.setdefault(method, {}).setdefault(case.edit, []).append(
                {"single": scores[0].__dict__ | {"joint": scores[0].joint},
                 "best_joint": any(sc.joint for sc in scores)})
        log.info("%.0f s so far", time.time() - start)
    return results


def table(results: dict) -> str:
    lines = [f"{'method':<28}{'edit type':<14}{'edit':>7}{'keep':>7}{'joint':>7}{'best-of-K joint':>17}"]
    for method, per_type in results.items():
        for edit, rows in list(per_type.items()) + [("overall", [r for rs in per_type.values() for r in rs])]:
            n = len(rows)
            e = np.mean([r["single"]["edit_ok"] for r in rows])
            p = np.mean([r["single"]["preserved"] for r in rows])
            j = np.mean([r["single"]["joint"] for r in rows])
            b = np.mean([r["best_joint"] for r in rows])
            lines.append(f"{method:<28}{edit:<14}{e:>7.2f}{p:>7.2f}{j:>7.2f}{b:>17.2f}   (n={n})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="DAC edit-quality benchmark on the synthetic world")
    p.add_argument("--model", required=True, help="diffusers folder of a world model")
    p.add_argument("--cases", help="case file (JSON list; see dac_core.world.Case); default: 6 per edit type")
    p.add_argument("--seeds", type=int, default=1, help="K seeds per method for best-of-K")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--unet-steps", type=int, default=Settings.unet_steps)
    p.add_argument("--te-steps", type=int, default=Settings.te_steps)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cases = W.load_cases(args.cases) if args.cases else W.default_cases()
    results = run(args.model, cases, Settings(unet_steps=args.unet_steps, te_steps=args.te_steps), args.seeds)
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
