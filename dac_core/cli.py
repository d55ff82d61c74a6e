"""`dac-edit`: a DAC edit of one image from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings

from . import __version__
from . import params as P
from .edit import EditParams

# Spellings of earlier releases: still accepted, with a deprecation message, until the next one.
RENAMED = {"--source": "--source-prompt", "--target": "--target-prompt", "--negative": "--negative-prompt",
           "--te-steps": "--text-steps", "--te-rank": "--text-rank", "--lr": "--learning-rate",
           "--num-images": "--batch-size"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _renamed(argv: list[str]) -> list[str]:
    """argv with the old option spellings replaced by the new ones, telling the user so."""
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in RENAMED:
            print(f"dac-edit: warning: {name} is deprecated and goes in the next release; use {RENAMED[name]}",
                  file=sys.stderr)
            arg = RENAMED[name] + eq + value
        out.append(arg)
    return out


def _type(param: P.Param):
    """argparse type of a parameter: parse, then check against its range."""

    def parse(text: str):
        try:
            value = param.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {param.valid()}, got {text!r}") from None
        problem = param.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = param.name  # what argparse names in its own messages
    return parse


def _list_type(param: P.Param):
    """argparse type of a parameter a sweep may list: "0.6" or "0, 0.5, 1", each in range."""
    from .errors import DACError
    from .params import parse_values

    def parse(text: str):
        try:
            return parse_values(text, param, "")
        except DACError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    parse.__name__ = param.name
    return parse


def _add(group, param: P.Param, default=argparse.SUPPRESS, listed: bool = False, **extra) -> None:
    """The option of `param`: its flag, type, range and help (with the default); `listed`:
    it also takes a comma-separated list (a sweep)."""
    shown = f"default {param.default}" if param.default not in (None, "") else None
    if param.kind in (int, float) and param.low is not None:
        shown = f"{param.valid().split(' ', 2)[-1]}; {shown}" if shown else param.valid().split(" ", 2)[-1]
    default = param.default if default is argparse.SUPPRESS else default
    more = "; a comma-separated list sweeps it, see below" if listed else ""
    group.add_argument(param.flag, type=_list_type(param) if listed else _type(param), default=default,
                       help=param.help + (f" ({shown}{more})" if shown else ""), **extra)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dac-edit",
        description="Edit one photo with a text prompt by DAC (Doubly Abductive Counterfactual inference, CVPR 2024).",
        epilog="Example: dac-edit cat.jpg --source-prompt 'A cat.' --target-prompt 'A cat wearing a wool cap.'  "
               "Sweep: --eta 0.6,0.8 --beta 0,0.5,1,1.5 trains U once and Delta once per eta, samples every "
               "(eta, beta) with the same seeds and writes WORKDIR/sweep_grid.png (rows eta, columns beta), "
               "WORKDIR/sweep/*.png and WORKDIR/dac_sweep.json.",
    )
    p.add_argument("image", nargs="?", help="the photo to edit (PNG, JPEG, WebP, ...)")
    p.add_argument("--demo", action="store_true",
                   help="run offline on the embedded demo: a bundled picture of the synthetic world and the "
                        "world model that ships with the package (turns the red circle green; settings scaled to "
                        "that model unless given)")
    _add(p, P.SOURCE_PROMPT, default=None)
    _add(p, P.TARGET_PROMPT, default=None)
    p.add_argument("--model", default=None,
                   help="Stable Diffusion 1.x, 2.x or SDXL (picked from the model): a diffusers folder, a "
                        ".safetensors/.ckpt file, or a hub id "
                        f"(default: {EditParams.model}, needs the network)")
    p.add_argument("--out", default=None, help="also write the edited image here (PNG)")
    p.add_argument("--workdir", default="dac_work",
                   help="folder for the LoRAs, the edited image(s) and dac_edit.json (default: dac_work); "
                        "LoRAs found there are reused")
    g = p.add_argument_group("abduction (training)")
    for param in (P.UNET_STEPS, P.TEXT_STEPS, P.UNET_RANK, P.TEXT_RANK, P.LEARNING_RATE, P.MAX_GRAD_NORM,
                  P.TRAIN_SEED):
        _add(g, param)
    _add(g, P.ETA, listed=True)
    g.add_argument("--unet-lora", default=None,
                   help="use this UNet LoRA file (kohya or diffusers format) instead of running Abduction-1")
    g.add_argument("--text-lora", default=None,
                   help="use this text-encoder LoRA file instead of running Abduction-2")
    s = p.add_argument_group("counterfactual sampling")
    _add(s, P.BETA, listed=True)
    for param in (P.NEGATIVE_PROMPT, P.SAMPLE_STEPS, P.CFG, P.SEED, P.BATCH_SIZE):
        _add(s, param)
    r = p.add_argument_group("runtime")
    _add(r, P.RESOLUTION)
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default float32; LoRA weights stay float32)")
    r.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's activations in the backward pass: less memory in training, about "
                        "a third more time (SDXL on a 24 GB GPU: with --dtype bfloat16)")
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
    argv = _renamed(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's case, and the settings scaled to the world model, unless given
        from . import demo

        parser.set_defaults(**demo.SETTINGS, source_prompt=demo.SOURCE_PROMPT, target_prompt=demo.TARGET_PROMPT)
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dac-edit: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    if not args.demo and args.image is None:
        print("dac-edit: error: give an IMAGE to edit (or --demo)", file=sys.stderr)
        return 2
    for param in (P.SOURCE_PROMPT, P.TARGET_PROMPT):
        if getattr(args, param.name) is None:
            print(f"dac-edit: error: {param.flag} is required: a {param.help}", file=sys.stderr)
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
        from . import demo

        model = model or demo.model_path()
        image = image or demo.SOURCE_IMAGE
    etas, betas = ([v] if isinstance(v, (int, float)) else v for v in (args.eta, args.beta))
    names = {f.name for f in dataclasses.fields(EditParams)} - {"model", "eta", "beta"}
    params = EditParams(model=model or EditParams.model, eta=etas[0], beta=betas[0],
                        **{name: getattr(args, name) for name in names if hasattr(args, name)})
    if len(etas) > 1 or len(betas) > 1:
        from .sweep import sweep

        swept = sweep(image, params, etas, betas, workdir=args.workdir, progress=_Progress)
        if args.out is not None:
            swept.grid.save(args.out, format="PNG")
        print(swept.grid_path)
        logging.getLogger("dac_core").info("%d images in %s | record: %s", len(swept.cells),
                                           os.path.dirname(swept.cells[0].path), swept.record_path)
        return 0
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
