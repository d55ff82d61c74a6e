"""DAC's three stages, written once against `DACBackend`.

    Abduction-1   U     = argmin || G(P,  U, Delta = 0) - I ||      abduct_unet_lora
    Abduction-2   Delta = argmin || G(P', U, Delta)     - I ||      abduct_text_lora
                  (U frozen, at strength gamma(t))
    Prediction    I'    = G(P', U at gamma(t), -beta * Delta)       counterfactual_sample

Both abductions share `_fit`: plain noise-prediction MSE (velocity for v-models),
timesteps uniform in [0, 1000), fresh noise each step, AdamW (betas 0.9/0.999, weight
decay 1e-2, eps 1e-8), constant learning rate, no gradient clipping (the reference
scripts ask for a norm of 1 but never clip, see docs/paper_vs_reference.md), one seeded
generator for everything random so a run is reproducible bit for bit on the CPU.

LoRA weights are float32 whatever the backend computes in. When it computes in float16
(`backend.training_dtype`), the loss is scaled with torch.amp.GradScaler, so small
gradients do not underflow; a step whose gradients are not finite is skipped, as the
scaler does, and counted (`dac.skipped_steps` in the LoRA's metadata).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import __version__
from . import params as P
from .backend import TEXT_DELTA, TEXT_EXTRA, UNET, DACBackend, LatentDistribution
from .errors import DACError, NonFiniteLossError, StopTraining
from .lora import LoRA, fresh_lora
from .schedule import annealing, annealing_of_timestep

log = logging.getLogger("dac_core")

Progress = Callable[[int, int, float], None]  # (step done, total, loss); may raise StopTraining


@dataclass(frozen=True)
class TrainSettings:
    """One abduction's optimisation settings. steps, rank, seed and batch_size are the
    stage's own (`dac_core.params`: unet_steps or text_steps, unet_rank or text_rank,
    train_seed, train_batch_size); the defaults are the text stage's, `UNET_SETTINGS` has
    the UNet stage's."""

    steps: int = P.TEXT_STEPS.default
    learning_rate: float = P.LEARNING_RATE.default
    rank: int | None = P.TEXT_RANK.default
    seed: int = P.TRAIN_SEED.default
    batch_size: int = 1
    max_grad_norm: float = P.MAX_GRAD_NORM.default  # 0: no clipping (what the reference really does)

    def check(self, stage: str, steps: P.Param, rank: P.Param) -> TrainSettings:
        """Each setting against its parameter (`steps`, `rank`: the stage's own)."""
        for field_name, param in (("steps", steps), ("rank", rank), ("seed", P.TRAIN_SEED),
                                  ("batch_size", P.TRAIN_BATCH_SIZE), ("learning_rate", P.LEARNING_RATE),
                                  ("max_grad_norm", P.MAX_GRAD_NORM)):
            param.check(getattr(self, field_name), f"{stage} {field_name}")
        return self


UNET_SETTINGS = TrainSettings(steps=P.UNET_STEPS.default, rank=None)  # rank None: the architecture's default
TEXT_SETTINGS = TrainSettings()

# AdamW exactly as the reference scripts.
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8


@dataclass
class TrainState:
    """Where an interrupted abduction stopped: enough to continue it exactly."""

    step: int
    lora: LoRA
    optimizer: dict
    generator: torch.Tensor
    losses: list[float] = field(default_factory=list)
    scaler: dict = field(default_factory=dict)  # the GradScaler's state (float16 training only)
    skipped: int = 0  # steps skipped for non-finite gradients so far


@dataclass
class StageResult:
    lora: LoRA
    losses: list[float]
    skipped_steps: int = 0  # float16 steps the gradient scaler skipped (non-finite gradients)


def _fresh_lora(backend: DACBackend, name: str, start: LoRA | None, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Attach LoRA `name` as trainable: `start`, or a fresh one drawn from `seed`."""
    if start is None:
        start = fresh_lora(backend.lora_shapes(name), rank, torch.Generator().manual_seed(seed))
    return backend.attach_lora(name, start, trainable=True)


def check_prompt(backend: DACBackend, prompt: str, what: str) -> str:
    """An empty prompt is an error; one over the token limit is cut, with a warning."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise DACError(f"{what} is empty: give a caption of the image, e.g. 'A cat.'")
    cut = backend.truncated_part(prompt)
    if cut:
        log.warning("%s is longer than the text encoder's 77-token limit; this part was cut: %r", what, cut)
    return prompt


def _metadata(backend: DACBackend, stage: str, prompt: str, s: TrainSettings, result: StageResult, **extra) -> dict:
    return {
        "dac.stage": stage,
        "dac.prompt": prompt,
        "dac.rank": str(s.rank),
        "dac.steps": str(s.steps),
        "dac.lr": repr(s.learning_rate),
        "dac.seed": str(s.seed),
        "dac.batch_size": str(s.batch_size),
        "dac.max_grad_norm": str(s.max_grad_norm or 0),
        "dac.training_dtype": str(backend.training_dtype).removeprefix("torch."),
        "dac.skipped_steps": str(result.skipped_steps),
        "dac.base_model_fingerprint": backend.fingerprint(),
        "dac.version": __version__,
        "dac.losses": [round(v, 6) for v in result.losses],
        **{f"dac.{k}": str(v) for k, v in extra.items()},
    }


def _fit(
    backend: DACBackend,
    stage: str,
    name: str,
    params: list[torch.nn.Parameter],
    latents: LatentDistribution,
    cond_fn: Callable[[], torch.Tensor],
    unet_scale_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    s: TrainSettings,
    progress: Progress | None,
    resume: TrainState | None,
    save_state: Callable[[TrainState], None] | None,
    checkpoint_every: int,
) -> tuple[list[float], int]:
    """Train `params`; returns the loss history and the number of skipped float16 steps."""
    device = backend.device
    fused = backend.fused_optimizer and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY,
                                  eps=ADAM_EPS, fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=backend.training_dtype == torch.float16)
    generator = torch.Generator().manual_seed(s.seed)
    losses: list[float] = []
    skipped = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        losses = list(resume.losses)
        skipped = resume.skipped
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
    done, rng_at_done = len(losses), generator.get_state()

    def state() -> TrainState:
        return TrainState(done, backend.export_lora(name), optimizer.state_dict(), rng_at_done, list(losses),
                          scaler.state_dict(), skipped)

    try:
        while done < s.steps:
            x0 = latents.sample(s.batch_size, generator)
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            t = torch.randint(0, backend.num_train_timesteps, (s.batch_size,), generator=generator)
            if unet_scale_fn is not None:
                backend.set_lora_scale(UNET, unet_scale_fn(t).to(device))
            loss = backend.loss(x0, noise, t.to(device), cond_fn()).mean()
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{stage}: the loss became {value} at step {done + 1} of {s.steps}; the stage was stopped "
                    f"(try a lower learning rate than {s.learning_rate:g})",
                    step=done + 1,
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if s.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(optimizer)  # skipped when a gradient is inf/nan (float16 only)
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() < scale:
                skipped += 1
            losses.append(value)
            done, rng_at_done = done + 1, generator.get_state()
            if save_state is not None and done % checkpoint_every == 0 and done < s.steps:
                save_state(state())
            if progress is not None:
                progress(done, s.steps, value)
    except (KeyboardInterrupt, StopTraining):
        if save_state is not None and done > (resume.step if resume else 0):
            save_state(state())
        raise
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
    if skipped:
        log.info("%s: %d of %d float16 steps skipped for non-finite gradients", stage, skipped, s.steps)
    return losses, skipped


def abduct_unet_lora(
    backend: DACBackend,
    latents: LatentDistribution,
    source_prompt: str,
    settings: TrainSettings = UNET_SETTINGS,
    *,
    init: LoRA | None = None,
    progress: Progress | None = None,
    resume: TrainState | None = None,
    save_state: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 100,
) -> StageResult:
    """Abduction-1: over-fit a UNet LoRA U so that the source prompt reproduces the image.

    The text encoder runs without LoRAs and once (its output is frozen); only U trains.
    `init` continues from an earlier UNet LoRA; `resume` from an interrupted run. A rank
    of None is the architecture's default (`params.UNET_RANK_DEFAULTS`).
    """
    settings.check("UNet LoRA", P.UNET_STEPS, P.UNET_RANK)
    settings = dataclasses.replace(settings, rank=P.unet_rank(settings.rank, backend.architecture))
    check_prompt(backend, source_prompt, "source prompt")
    for other in (TEXT_DELTA, TEXT_EXTRA):
        backend.detach_lora(other)
    with torch.no_grad():
        cond = backend.encode_prompts([source_prompt] * settings.batch_size)
    start = resume.lora if resume is not None else init
    params = _fresh_lora(backend, UNET, start, settings.rank, settings.seed)
    backend.set_lora_scale(UNET, 1.0)
    losses, skipped = _fit(
        backend, "Abduction-1 (UNet LoRA)", UNET, params, latents, lambda: cond, None,
        settings, progress, resume, save_state, checkpoint_every,
    )
    result = StageResult(backend.export_lora(UNET), losses, skipped)
    result.lora.metadata = _metadata(backend, "unet", source_prompt, settings, result)
    return result


def abduct_text_lora(
    backend: DACBackend,
    latents: LatentDistribution,
    prompt: str,
    unet_lora: LoRA,
    settings: TrainSettings = TEXT_SETTINGS,
    *,
    eta: float = P.ETA.default,
    extra_text_lora: LoRA | None = None,
    name: str = TEXT_DELTA,
    progress: Progress | None = None,
    resume: TrainState | None = None,
    save_state: Callable[[TrainState], None] | None = None,
    checkpoint_every: int = 100,
) -> StageResult:
    """Abduction-2: fit a text-encoder LoRA so that `prompt` (the target) plus it reproduces
    the image through the frozen UNet LoRA U, whose strength follows gamma(t) per sample.

    `extra_text_lora` is the optional frozen LoRA T, active at +1. To fit T itself, call
    this with the source prompt and name=TEXT_EXTRA.
    """
    settings.check("text-encoder LoRA", P.TEXT_STEPS, P.TEXT_RANK)
    unet_strength = annealing_of_timestep(eta)
    check_prompt(backend, prompt, "target prompt" if name == TEXT_DELTA else "source prompt")
    backend.attach_lora(UNET, unet_lora, trainable=False)
    for other in (TEXT_DELTA, TEXT_EXTRA):
        backend.detach_lora(other)
    if extra_text_lora is not None and name != TEXT_EXTRA:
        backend.attach_lora(TEXT_EXTRA, extra_text_lora, trainable=False)
        backend.set_lora_scale(TEXT_EXTRA, 1.0)
    start = resume.lora if resume is not None else None
    params = _fresh_lora(backend, name, start, settings.rank, settings.seed)
    backend.set_lora_scale(name, 1.0)
    prompts = [prompt] * settings.batch_size
    losses, skipped = _fit(
        backend, "Abduction-2 (text-encoder LoRA)", name, params, latents,
        lambda: backend.encode_prompts(prompts), unet_strength,
        settings, progress, resume, save_state, checkpoint_every,
    )
    result = StageResult(backend.export_lora(name), losses, skipped)
    result.lora.metadata = _metadata(backend, "text" if name == TEXT_DELTA else "extra_text", prompt, settings,
                                     result, eta=eta)
    return result


def counterfactual_strengths(eta: float, beta: float) -> dict:
    """DAC's Action step, the one place that says how the LoRAs act in the counterfactual:
    U at gamma(t) (a function of the noise-level fraction, called at every sampler step),
    the text-encoder LoRA Delta at -beta, the optional extra LoRA T at +1."""
    return {UNET: annealing(eta), TEXT_DELTA: -float(P.BETA.check(beta)), TEXT_EXTRA: 1.0}


def counterfactual_sample(
    backend: DACBackend,
    target_prompt: str,
    unet_lora: LoRA | None,
    text_lora: LoRA | None,
    size: tuple[int, int],
    *,
    extra_text_lora: LoRA | None = None,
    eta: float = P.ETA.default,
    beta: float = P.BETA.default,
    negative_prompt: str = P.NEGATIVE_PROMPT.default,
    steps: int = P.SAMPLE_STEPS.default,
    cfg: float = P.CFG.default,
    seed: int = P.SEED.default,
    batch_size: int = P.BATCH_SIZE.default,
    progress: Callable[[int, int], None] | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """Prediction: sample the target prompt from pure noise with U at gamma(t) every step
    and the text-encoder LoRA at -beta (prompt and negative prompt alike).

    `steps` is the sampling steps (`sample_steps` in `dac_core.params`). Image i of
    `batch_size` uses seed + i, so each candidate can be reproduced alone. Returns images
    [K, 3, H, W] in [-1, 1] of `size` = (width, height), or with decode=False the
    backend's latents.
    """
    strengths = counterfactual_strengths(eta, beta)
    check_prompt(backend, target_prompt, "target prompt")
    P.SAMPLE_STEPS.check(steps, "sampling steps")
    for param, value in ((P.CFG, cfg), (P.SEED, seed), (P.BATCH_SIZE, batch_size)):
        param.check(value)
    if negative_prompt:
        check_prompt(backend, negative_prompt, "negative prompt")
    if unet_lora is not None:
        backend.attach_lora(UNET, unet_lora, trainable=False)
    else:
        backend.detach_lora(UNET)
    for name, lora in ((TEXT_DELTA, text_lora), (TEXT_EXTRA, extra_text_lora)):
        if lora is None:
            backend.detach_lora(name)
        else:
            backend.attach_lora(name, lora, trainable=False)
            backend.set_lora_scale(name, strengths[name])
    w, h = size
    f = backend.latent_factor
    with torch.no_grad():
        cond = backend.encode_prompts([target_prompt] * batch_size)
        uncond = backend.encode_prompts([negative_prompt] * batch_size)
        shape = (1, backend.latent_channels, h // f, w // f)
        noise = torch.cat(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch_size)]
        ).to(backend.device)
        schedule = strengths[UNET] if unet_lora is not None else torch.ones_like
        latents = backend.sample(cond, uncond, noise, steps, cfg, schedule, progress)
        return backend.decode_latents(latents) if decode else latents
