"""Edit-quality benchmark on the synthetic world.

Every method edits the same rendered source image with the same model and seeds; the
checker (`dac_core.world.check`) scores each output against the target spec:

- edit success: the attributes the edit changes are as the target says;
- preservation: every other object and the background are as the source says, and the
  PSNR outside both specs' objects (against the source image) is at least PSNR_MIN
  (not for style edits, which change that region by design);
- joint success: both.

Thresholds are fixed here, before any run: PSNR_MIN = 20 dB.

    python -m dac_core.world.bench [--model PATH] [--cases FILE] [--seeds K] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from .. import world as W
from ..demo import SETTINGS, model_path
from ..errors import DACError
from ..files import atomic_path, write_json
from ..image import image_to_tensor, tensor_to_images, wrap
from ..stages import TrainSettings, abduct_text_lora, abduct_unet_lora, counterfactual_sample

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
    removed = {o.position for o in case.source.objects} if case.edit == "removal" else set()
    extras = set(report.extra_objects) - removed
    # a style edit changes the whole background by design: there the PSNR outside the objects
    # measures the edit, not preservation, and is not required
    psnr_ok = case.edit == "style" or (report.psnr or 0) >= PSNR_MIN
    preserved = all(o.ok for o in kept) and background and not extras and psnr_ok
    return Score(edit_ok, preserved, report.psnr if report.psnr is not None else float("nan"))


@dataclass
class Settings:
    """DAC's settings on the world model (defaults: `dac_core.demo.SETTINGS`); every method
    samples with the same steps and guidance."""

    unet_steps: int = SETTINGS["unet_steps"]
    text_steps: int = SETTINGS["text_steps"]
    unet_rank: int = SETTINGS["unet_rank"]
    text_rank: int = SETTINGS["text_rank"]
    learning_rate: float = SETTINGS["learning_rate"]
    max_grad_norm: float = SETTINGS["max_grad_norm"]
    eta: float = SETTINGS["eta"]
    sample_steps: int = SETTINGS["sample_steps"]
    cfg: float = SETTINGS["cfg"]


METHODS = ("DAC", "target prompt only", "Abduction-1 only", "DAC eta=1 (no annealing)", "DAC beta=0 (no subtraction)",
           "SDEdit 0.5", "SDEdit 0.75")


def run_methods(backend, case: W.Case, s: Settings, seeds: list[int], methods=METHODS,
                unet_loras: dict | None = None) -> dict[str, list]:
    """Images (one per seed) of each of `methods` for one case; `seeds` are consecutive.

    `unet_loras` keeps the UNet LoRA of each source across calls: Abduction-1 depends only on
    the source image and prompt (and its fixed seed), so cases that share a source share it.
    """
    if list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds must be consecutive integers, got {seeds}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")
    pixels = image_to_tensor(W.render(case.source), (W.SIZE, W.SIZE))
    latents = backend.encode_image(pixels)
    size = (W.SIZE, W.SIZE)
    train_u = TrainSettings(s.unet_steps, s.learning_rate, s.unet_rank, max_grad_norm=s.max_grad_norm)
    train_delta = TrainSettings(s.text_steps, s.learning_rate, s.text_rank, max_grad_norm=s.max_grad_norm)
    needs_u = {"DAC", "Abduction-1 only", "DAC eta=1 (no annealing)", "DAC beta=0 (no subtraction)"} & set(methods)
    u = None
    if needs_u:
        key = json.dumps([case.source.to_json(), asdict(train_u)], sort_keys=True)
        cache = unet_loras if unet_loras is not None else {}
        if key not in cache:
            cache[key] = abduct_unet_lora(backend, latents, case.source_prompt, train_u).lora
        u = cache[key]
    delta = None
    if {"DAC", "DAC beta=0 (no subtraction)"} & set(methods):
        delta = abduct_text_lora(backend, latents, case.target_prompt, u, train_delta, eta=s.eta).lora
    out: dict[str, list] = {}

    def sample(unet_lora, text_lora, eta=s.eta, beta=1.0):
        # one batch: image i has seed seeds[0] + i, as if sampled alone
        return tensor_to_images(counterfactual_sample(
            backend, case.target_prompt, unet_lora, text_lora, size, eta=eta, beta=beta, steps=s.sample_steps,
            cfg=s.cfg, seed=seeds[0], batch_size=len(seeds)))

    for method in methods:
        if method == "DAC":
            out[method] = sample(u, delta)
        elif method == "target prompt only":
            out[method] = sample(None, None)
        elif method == "Abduction-1 only":
            out[method] = sample(u, None, eta=1.0)
        elif method == "DAC eta=1 (no annealing)":  # Abduction-2 and sampling both without annealing
            delta_1 = abduct_text_lora(backend, latents, case.target_prompt, u, train_delta, eta=1.0).lora
            out[method] = sample(u, delta_1, eta=1.0)
        elif method == "DAC beta=0 (no subtraction)":
            out[method] = sample(u, delta, beta=0.0)
        else:
            strength = float(method.split()[1])
            out[method] = img2img(backend, case, pixels, strength, seeds, s)
    return out


@torch.no_grad()
def img2img(backend, case: W.Case, pixels, strength: float, seeds: list[int], s: Settings) -> list:
    """SDEdit: noise the source latent to `strength` and denoise with the target prompt; one
    image per seed, in one batch."""
    from diffusers import StableDiffusionImg2ImgPipeline

    for name in ("unet", "delta", "extra"):
        backend.detach_lora(name)
    pipe = StableDiffusionImg2ImgPipeline(**backend.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = tensor_to_images(pixels)[0]
    return pipe(case.target_prompt, image=image, strength=strength, num_inference_steps=s.sample_steps,
                guidance_scale=s.cfg, num_images_per_prompt=len(seeds),
                generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images


def run(model: str, cases: list[W.Case], s: Settings, seeds: int = 1, device: str = "cpu",
        methods=METHODS) -> dict:
    """Every method on every case; returns the scores (and, per case, the first seed's images
    under "images", for the picture grid)."""
    from ..diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_model(model, device=device)
    results: dict = {"settings": asdict(s), "seeds": seeds, "model": os.path.basename(os.path.normpath(model)),
                     "environment": environment(device), "cases": []}
    images = []
    unet_loras: dict = {}
    start = time.time()
    for k, case in enumerate(cases):
        outputs = run_methods(backend, case, s, list(range(seeds)), methods, unet_loras)
        row = {"edit": case.edit, "source": case.source_prompt, "target": case.target_prompt, "methods": {}}
        for method, imgs in outputs.items():
            scores = [score(case, img) for img in imgs]
            row["methods"][method] = {"single": asdict(scores[0]) | {"joint": scores[0].joint},
                                      "best_joint": any(sc.joint for sc in scores),
                                      "best_edit": any(sc.edit_ok for sc in scores)}
        results["cases"].append(row)
        images.append({m: imgs[0] for m, imgs in outputs.items()})
        done = time.time() - start
        joint = " ".join(f"{m}: {'yes' if r['single']['joint'] else 'no'}" for m, r in row["methods"].items())
        log.info("case %d/%d (%s) joint success: %s | %.0f s so far, about %.0f s left", k + 1, len(cases),
                 case.edit, joint, done, done / (k + 1) * (len(cases) - k - 1))
    results["seconds"] = time.time() - start
    results["images"] = images
    return results


def environment(device: str) -> dict:
    import platform

    return {"device": device if device != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
            "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__}


def summary(results: dict) -> dict:
    """method -> edit type (and "overall") -> rates."""
    out: dict = {}
    methods = list(results["cases"][0]["methods"]) if results["cases"] else []
    for method in methods:
        rows_by_type: dict[str, list] = {}
        for row in results["cases"]:
            rows_by_type.setdefault(row["edit"], []).append(row["methods"][method])
        rows_by_type["overall"] = [r for rs in rows_by_type.values() for r in rs]
        out[method] = {
            edit: {"n": len(rows), "edit": float(np.mean([r["single"]["edit_ok"] for r in rows])),
                   "keep": float(np.mean([r["single"]["preserved"] for r in rows])),
                   "joint": float(np.mean([r["single"]["joint"] for r in rows])),
                   "best_joint": float(np.mean([r["best_joint"] for r in rows])),
                   "psnr": float(np.nanmean([r["single"]["psnr"] for r in rows]))}
            for edit, rows in rows_by_type.items()}
    return out


def table(results: dict) -> str:
    """Plain-text table: per method, per edit type and overall."""
    k = results["seeds"]
    lines = [f"{'method':<28}{'edit type':<14}{'edit':>7}{'keep':>7}{'joint':>7}{f'best-of-{k} joint':>17}{'PSNR':>7}"]
    for method, per_type in summary(results).items():
        for edit, r in per_type.items():
            lines.append(f"{method:<28}{edit:<14}{r['edit']:>7.2f}{r['keep']:>7.2f}{r['joint']:>7.2f}"
                         f"{r['best_joint']:>17.2f}{r['psnr']:>7.1f}   (n={r['n']})")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The README table: joint success per edit type (single seed), then overall figures."""
    k = results["seeds"]
    summ = summary(results)
    types = [t for t in W.EDIT_TYPES if any(row["edit"] == t for row in results["cases"])]
    head = ["method", *types, "overall edit", "overall keep", "overall joint", f"best-of-{k} joint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, per_type in summ.items():
        o = per_type["overall"]
        cells = [method, *(f"{per_type[t]['joint']:.2f}" for t in types),
                 f"{o['edit']:.2f}", f"{o['keep']:.2f}", f"**{o['joint']:.2f}**", f"{o['best_joint']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(results: dict, cases: list[W.Case], per_type: int = 1, scale: int = 2):
    """A picture: per edit type `per_type` cases; each row the source, then every method's
    first-seed output, with the target caption above."""
    from PIL import Image, ImageDraw

    methods = list(results["images"][0]) if results["images"] else []
    picked = []
    for edit in W.EDIT_TYPES:
        picked += [k for k, c in enumerate(cases) if c.edit == edit][:per_type]
    cell, label_h, text_h, pad = W.SIZE * scale, 24, 14, 4
    width = pad + (1 + len(methods)) * (cell + pad)
    height = label_h + len(picked) * (text_h + cell + pad)
    out = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(out)
    for j, name in enumerate(["source", *methods]):
        x = pad + j * (cell + pad)
        draw.multiline_text((x, 0), "\n".join(wrap(draw, name, cell)[:2]), fill="black", spacing=0)
    for i, k in enumerate(picked):
        y = label_h + i * (text_h + cell + pad)
        case, row = cases[k], results["cases"][k]
        draw.text((pad, y), f"{case.edit}: {case.target_prompt}", fill="black")
        tiles = [W.render(case.source), *(results["images"][k][m] for m in methods)]
        for j, tile in enumerate(tiles):
            x = pad + j * (cell + pad)
            out.paste(tile.resize((cell, cell), Image.NEAREST), (x, y + text_h))
            if j:
                ok = row["methods"][methods[j - 1]]["single"]["joint"]
                draw.rectangle((x, y + text_h, x + cell - 1, y + text_h + cell - 1),
                               outline=(30, 160, 60) if ok else (200, 40, 40), width=2)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="DAC edit-quality benchmark on the synthetic world")
    p.add_argument("--model", default=None,
                   help="diffusers folder of a world model (default: the one shipped in dac_core/assets/world_model)")
    p.add_argument("--cases", help="case file (JSON list; see dac_core.world.Case); default: 6 per edit type")
    p.add_argument("--case-seed", type=int, default=0, help="seed of the default case set (default 0)")
    p.add_argument("--per-type", type=int, default=6, help="cases per edit type of the default set (default 6)")
    p.add_argument("--seeds", type=int, default=2, help="K sampling seeds per method for best-of-K (default 2)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the README table here")
    p.add_argument("--grid", help="write the picture grid here (PNG)")
    for f in fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"(default {f.default})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cases = W.load_cases(args.cases) if args.cases else W.default_cases(args.per_type, seed=args.case_seed)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}")
    try:
        model = args.model or model_path()
    except DACError as e:
        p.error(str(e))
    results = run(model, cases, settings, args.seeds, methods=methods)
    print(table(results))
    print(f"{len(cases)} cases, {args.seeds} seeds, {results['seconds'] / 60:.1f} min; {results['environment']}")
    if args.grid:
        with atomic_path(args.grid) as tmp:
            grid(results, cases).save(tmp, format="PNG")
    if args.markdown:
        with atomic_path(args.markdown) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown(results) + "\n")
    if args.json:
        data = {k: v for k, v in results.items() if k != "images"} | {"summary": summary(results)}
        write_json(args.json, data)


if __name__ == "__main__":
    main()
