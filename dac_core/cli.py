"""`dac-edit`: a DAC edit of one image from the command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

from . import __version__
from .edit import EditParams

DEFAULTS = dict(unet_steps=1000, te_steps=1000, unet_rank=512)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive number, got {text!r}")
    return value


def _eta(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (UNet LoRA strength at pure noise), got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a caption of the image, e.g. 'A cat.'")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dac-edit",
        description="Edit one photo with a text prompt by DAC (Doubly Abductive Counterfactual inference, CVPR 2024).",
        epilog="Example: dac-edit cat.jpg --source 'A cat.' --target 'A cat wearing a wool cap.'",
    )
    p.add_argument("image", nargs="?", help="the photo to edit (PNG, JPEG, WebP, ...)")
    p.add_argument("--demo", action="store_true",
                   help="run offline on the embedded demo: a bundled picture of the synthetic world and the "
                        "world model that ships with the package (turns the red circle green; settings scaled to "
                        "that model unless given)")
    p.add_argument("--source", type=_prompt, help="caption of the photo as it is, e.g. 'A cat.'")
    p.add_argument("--target", type=_prompt, help="caption of the wanted result, e.g. 'A cat wearing a wool cap.'")
    p.add_argument("--model", default=None,
                   help="Stable Diffusion 1.x/2.x: a diffusers folder, a .safetensors/.ckpt file, or a hub id "
                        "(default: stabilityai/stable-diffusion-2-1-base, needs the network)")
    p.add_argument("--out", default=None, help="also write the edited image here (PNG)")
    p.add_argument("--workdir", default="dac_work",
                   help="folder for the LoRAs, the edited image(s) and dac_edit.json (default: dac_work); "
                        "LoRAs found there are reused")
    g = p.add_argument_group("abduction (training)")
    g.add_argument("--unet-steps", type=_positive_int, default=None,
                   help="Abduction-1 steps (default 1000); fewer (250-500): more editable, less faithful")
    g.add_argument("--te-steps", type=_positive_int, default=None, help="Abduction-2 steps (default 1000)")
    g.add_argument("--unet-rank", type=_positive_int, default=None,
                   help="UNet LoRA rank (default 512: near full rank, the main memory cost)")
    g.add_argument("--te-rank", type=_positive_int, default=4, help="text-encoder LoRA rank (default 4)")
    g.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate of both abductions (default 1e-4)")
    g.add_argument("--max-grad-norm", type=_non_negative, default=0.0,
                   help="clip the gradient norm of both abductions to this (default 0: no clipping, as the "
                        "reference code really trains; its scripts ask for 1 but never clip)")
    g.add_argument("--eta", type=_eta, default=0.8,
                   help="annealing: UNet LoRA strength at pure noise, in (0, 1] (default 0.8); lower: more "
                        "editable, less faithful (paper: 0.4-0.8)")
    g.add_argument("--unet-lora", default=None,
                   help="use this UNet LoRA file (kohya or diffusers format) instead of running Abduction-1")
    g.add_argument("--text-lora", default=None,
                   help="use this text-encoder LoRA file instead of running Abduction-2")
    s = p.add_argument_group("counterfactual sampling")
    s.add_argument("--beta", type=_finite, default=1.0,
                   help="edit strength: the text-encoder LoRA is applied at -beta (default 1; -1 reconstructs "
                        "the photo, >1 exaggerates attribute edits)")
    s.add_argument("--negative", default="", help="negative prompt (default empty)")
    s.add_argument("--sample-steps", type=_positive_int, default=30, help="denoising steps (default 30)")
    s.add_argument("--cfg", type=_finite, default=4.0, help="classifier-free guidance scale (default 4)")
    s.add_argument("--seed", type=int, default=29, help="sampling seed (default 29); image i uses seed + i")
    s.add_argument("--num-images", type=_positive_int, default=1, help="number of candidates K (default 1)")
    r = p.add_argument_group("runtime")
    r.add_argument("--resolution", type=_positive_int, default=None,
                   help="side of a square of the same pixel count the photo is resized to (aspect kept, "
                        "sides multiples of 8; default: the model's native size)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default float32; LoRA weights stay float32)")
    p.add_argument("--version", action="version", version=f"dac-edit {__version__}")
    return p


class _Progress:
    """A tqdm bar per stage: step, loss, time left."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, step: int, total: int, loss: float | None = None):
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()
        if step >= total:
            self.bar.close()


def _quiet_libraries() -> None:
    """Our own bars and messages only: the libraries' loading bars and notices are noise here."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(diffusers|transformers|peft)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's case, and the settings scaled to the world model, unless given
        from .demo import DAC_SETTINGS, SOURCE_PROMPT, TARGET_PROMPT

        parser.set_defaults(**DAC_SETTINGS, source=SOURCE_PROMPT, target=TARGET_PROMPT)
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dac-edit: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.demo and args.image is None:
        print("dac-edit: error: give an IMAGE to edit (or --demo)", file=sys.stderr)
        return 2
    for name in ("source", "target"):
        if getattr(args, name) is None:
            print(f"dac-edit: error: --{name} is required: a caption of the "
                  f"{'photo as it is' if name == 'source' else 'wanted result'}", file=sys.stderr)
            return 2

    from .errors import DACError  # heavy imports only once the arguments are fine

    try:
        return _run(args)
    except DACError as e:
        print(f"dac-edit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dac-edit: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130


def _run(args) -> int:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .edit import edit

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    image = args.image
    model = args.model
    if args.demo:
        from .demo import SOURCE_IMAGE, shipped_model_path

        model = model or shipped_model_path()
        image = image or SOURCE_IMAGE
    params = EditParams(
        source=args.source, target=args.target, model=model or EditParams.model,
        unet_steps=args.unet_steps, te_steps=args.te_steps, unet_rank=args.unet_rank, te_rank=args.te_rank,
        lr=args.lr, max_grad_norm=args.max_grad_norm or None, eta=args.eta, beta=args.beta, negative=args.negative,
        sample_steps=args.sample_steps,
        cfg=args.cfg, seed=args.seed, num_images=args.num_images, resolution=args.resolution,
        unet_lora=args.unet_lora, text_lora=args.text_lora, device=args.device, dtype=args.dtype,
    )
    result = edit(image, params, workdir=args.workdir, out=args.out, progress=_Progress)
    for path in result.image_paths:
        print(path)
    print(result.before_after_path)
    logging.getLogger("dac_core").info(
        "UNet LoRA: %s | text-encoder LoRA: %s | record: %s", result.unet_lora_path, result.text_lora_path,
        result.record_path,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
