"""Every parameter of a DAC edit: its one name, default and valid range.

The Python API (`EditParams`, `TrainSettings`, `counterfactual_sample`), the `dac-edit`
options (the same names, kebab-cased) and the ComfyUI node inputs are built from this
table, so a default or a range is changed here and nowhere else. Defaults are the
reference code's (see docs/paper_vs_reference.md).

A node input carries the name of the parameter, except where the node itself scopes it:
each abduction node's `steps`, `rank` and `seed` are that stage's `unet_steps` /
`text_steps`, `unet_rank` / `text_rank` and `train_seed`; Counterfactual Sample's `steps`
is `sample_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import DACError

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Param:
    """One parameter: `kind` is int, float or str; `low`/`high` bound it (None: unbounded),
    `low_open` excludes `low` itself; `optional` allows None (meaning "not set")."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    ui_step: float | None = None  # the node widget's increment
    ui_low: float | None = None  # the node widget's minimum where `low` itself is excluded

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def valid(self) -> str:
        """What a valid value is, in words."""
        if self.kind is str:
            return "a non-empty text"
        what = "an integer" if self.kind is int else "a number"
        low, high = (f"{x:d}" if self.kind is int else f"{x:g}" for x in (self.low, self.high or 0))
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{what} {'above' if self.low_open else 'of at least'} {low}"
        return f"a finite {what.split()[-1]}"

    def problem(self, value) -> str | None:
        """None if `value` is valid, else what is wrong ("must be ..., got ...")."""
        if value is None and self.optional:
            return None
        if self.kind is str:
            if not isinstance(value, str):
                return f"must be a text, got {value!r}"
            return f"is empty: give a {self.help}" if self.low is not None and not value.strip() else None
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = ((self.low is None or value > self.low or (value == self.low and not self.low_open))
                  and (self.high is None or value <= self.high))
        return None if ok else f"must be {self.valid()}, got {value!r}"

    def check(self, value, label: str | None = None):
        """`value` if valid, else a DACError naming the parameter and what would be valid."""
        problem = self.problem(value)
        if problem:
            raise DACError(f"{label or self.name} {problem}")
        return value


def _prompt(name: str, what: str, default: str = "", required: bool = True) -> Param:
    # low=1 on a str: it must not be empty
    return Param(name, str, default, what, low=1 if required else None)


SOURCE_PROMPT = _prompt("source_prompt", "caption of the photo as it is, e.g. 'A cat.'")
TARGET_PROMPT = _prompt("target_prompt", "caption of the wanted result, e.g. 'A cat wearing a wool cap.'")
NEGATIVE_PROMPT = _prompt("negative_prompt", "negative prompt (default empty)", required=False)

UNET_STEPS = Param("unet_steps", int, 1000, "Abduction-1 (UNet LoRA) training steps; fewer (250-500): more "
                   "editable, less faithful", 1, 100_000)
TEXT_STEPS = Param("text_steps", int, 1000, "Abduction-2 (text-encoder LoRA) training steps", 1, 100_000)
UNET_RANK = Param("unet_rank", int, None, "UNet LoRA rank, the main memory cost (default: 512 on SD 1.x / 2.x, near "
                  "full rank, the paper's; 128 on SDXL, which trains on a 24 GB GPU)", 1, 1024, optional=True)
# The UNet rank when none is given, by architecture: SDXL's UNet at rank 512 would need
# ~24 GB for the LoRA's AdamW state alone (benchmarks/lora_memory.py).
UNET_RANK_DEFAULTS = {"sd": 512, "sdxl": 128}
TEXT_RANK = Param("text_rank", int, 4, "text-encoder LoRA rank", 1, 256)
LEARNING_RATE = Param("learning_rate", float, 1e-4, "AdamW learning rate of both abductions (constant)", 0.0, 1.0,
                      low_open=True, ui_step=1e-5, ui_low=1e-7)
MAX_GRAD_NORM = Param("max_grad_norm", float, 0.0, "clip the gradient norm of both abductions to this; 0: no "
                      "clipping, as the reference code really trains (its scripts ask for 1 but never clip)",
                      0.0, 1000.0, optional=True, ui_step=0.1)  # None: no clipping, as 0
TRAIN_BATCH_SIZE = Param("train_batch_size", int, 1, "images per training step (the reference trains on one)", 1,
                         64)
TRAIN_SEED = Param("train_seed", int, 42, "seed of the training noise, timesteps and LoRA init", 0, MAX_SEED)
ETA = Param("eta", float, 0.8, "annealing: the UNet LoRA's strength at pure noise, rising to 1 at the clean end; "
            "lower: more editable, less faithful (paper: 0.4-0.8)", 0.0, 1.0, low_open=True, ui_step=0.01, ui_low=0.01)
BETA = Param("beta", float, 1.0, "edit strength: the text-encoder LoRA is applied at -beta (-1 reconstructs the "
             "photo, above 1 exaggerates attribute edits)", -3.0, 5.0, ui_step=0.05)
SAMPLE_STEPS = Param("sample_steps", int, 30, "denoising steps", 1, 10_000)
CFG = Param("cfg", float, 4.0, "classifier-free guidance scale", 0.0, 100.0, ui_step=0.1)
SEED = Param("seed", int, 29, "sampling seed; image i uses seed + i", 0, MAX_SEED)
BATCH_SIZE = Param("batch_size", int, 1, "number of candidates K sampled in one batch (the paper picks the best of "
                   "8)", 1, 64)
RESOLUTION = Param("resolution", int, None, "side of a square of the same pixel count the photo is resized to "
                   "(aspect kept, sides multiples of 8; default: the model's native size)", 8, 8192, optional=True)

PARAMS: dict[str, Param] = {p.name: p for p in (
    SOURCE_PROMPT, TARGET_PROMPT, NEGATIVE_PROMPT, UNET_STEPS, TEXT_STEPS, UNET_RANK, TEXT_RANK, LEARNING_RATE,
    MAX_GRAD_NORM, TRAIN_BATCH_SIZE, TRAIN_SEED, ETA, BETA, SAMPLE_STEPS, CFG, SEED, BATCH_SIZE, RESOLUTION)}


def parse_values(text: str, param: Param, label: str | None = None) -> list[float]:
    """"0, 0.5, 1" -> [0.0, 0.5, 1.0]: one or more numbers separated by commas, each checked
    against `param`; a DACError naming `label` (the parameter's name by default) otherwise."""
    label = param.name if label is None else label
    want = f"one or more numbers separated by commas, each {param.valid().split(' ', 2)[-1]}"
    parts = [part.strip() for part in str(text).split(",")]
    if not any(parts):
        raise DACError(f"{label} is empty: give {want}".strip())
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = None
        problem = f"must be {param.valid()}, got {part!r}" if value is None else param.problem(value)
        if problem:  # one value: the parameter's own message; in a list: which one, in what
            raise DACError(f"{label} {problem if len(parts) == 1 else f'must be {want}, got {part!r} in {text!r}'}"
                           .strip())
        values.append(value)
    return values


def check_values(values, param: Param) -> list[float]:
    """A list of settings for `param`: not empty, each valid, duplicates dropped (order kept)."""
    values = list(values)
    if not values:
        raise DACError(f"the list of {param.name} values is empty: give one or more")
    for value in values:
        param.check(value, f"every {param.name} value")
    return list(dict.fromkeys(float(v) for v in values))


def unet_rank(value: int | None, architecture: str) -> int:
    """The UNet LoRA rank to train: `value`, or the architecture's default when None."""
    return UNET_RANK_DEFAULTS[architecture] if value is None else value


def check(**values) -> None:
    """Check each named parameter (DACError on the first invalid one)."""
    for name, value in values.items():
        PARAMS[name].check(value)
