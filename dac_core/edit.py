"""The whole DAC edit with a work folder: abduct, abduct, sample, and keep what was learnt.

The work folder holds the UNet LoRA, the text-encoder LoRA, the edited image(s) and a JSON
record of every parameter. The UNet LoRA is named by a hash of what determines it (image,
source prompt, base model, Abduction-1 settings), so a re-run with only a new target, eta,
beta or sampling setting reuses it; the text-encoder LoRA likewise. An interrupted
abduction leaves `*.partial.*` state that the next run continues from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import __version__
from . import params as P
from .backend import DACBackend
from .errors import DACError, NonFiniteLossError
from .files import atomic_path, write_json
from .image import before_after, fit_size, image_to_tensor, load_image, tensor_to_images, to_rgb
from .lora import LoRA, load_lora, save_lora
from .stages import TrainSettings, TrainState, abduct_text_lora, abduct_unet_lora, counterfactual_sample

log = logging.getLogger("dac_core")

# stage label -> callback(step_done, total, loss=None); steps are absolute (a resumed stage starts past 0)
ProgressFactory = Callable[[str], Callable[..., None]]


@dataclass
class EditParams:
    """Every parameter of an edit; names, defaults and ranges from `dac_core.params`."""

    source_prompt: str
    target_prompt: str
    model: str = "stabilityai/stable-diffusion-2-1-base"
    unet_steps: int = P.UNET_STEPS.default
    text_steps: int = P.TEXT_STEPS.default
    unet_rank: int | None = P.UNET_RANK.default  # None: the architecture's default
    text_rank: int = P.TEXT_RANK.default
    learning_rate: float = P.LEARNING_RATE.default
    max_grad_norm: float = P.MAX_GRAD_NORM.default
    eta: float = P.ETA.default
    beta: float = P.BETA.default
    negative_prompt: str = P.NEGATIVE_PROMPT.default
    sample_steps: int = P.SAMPLE_STEPS.default
    cfg: float = P.CFG.default
    seed: int = P.SEED.default
    batch_size: int = P.BATCH_SIZE.default
    train_seed: int = P.TRAIN_SEED.default
    resolution: int | None = P.RESOLUTION.default
    unet_lora: str | None = None  # a LoRA file used instead of running Abduction-1
    text_lora: str | None = None  # likewise for Abduction-2
    device: str = "auto"
    dtype: str = "float32"
    gradient_checkpointing: bool = False  # less activation memory in training, more time

    def check(self) -> EditParams:
        """Every parameter against `dac_core.params` (DACError naming the first bad one)."""
        for f in dataclasses.fields(self):
            if f.name in P.PARAMS:
                P.PARAMS[f.name].check(getattr(self, f.name))
        return self


@dataclass
class EditResult:
    images: list
    image_paths: list[str]
    unet_lora_path: str
    text_lora_path: str
    record_path: str
    reused_unet: bool
    reused_text: bool
    unet_losses: list[float] = field(default_factory=list)
    text_losses: list[float] = field(default_factory=list)
    before_after_path: str | None = None  # source and edit(s) side by side, captions above


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _partial_paths(final: str) -> tuple[str, str]:
    stem = final[: -len(".safetensors")]
    return stem + ".partial.safetensors", stem + ".partial.pt"


def _save_state(final: str, key: str, state: TrainState) -> None:
    lora_path, state_path = _partial_paths(final)
    with atomic_path(state_path) as tmp:
        torch.save({"key": key, "step": state.step, "optimizer": state.optimizer,
                    "generator": state.generator, "losses": state.losses, "scaler": state.scaler,
                    "skipped": state.skipped}, tmp)
    save_lora(state.lora, lora_path, {"dac.key": key, "dac.partial_step": str(state.step)})


def _load_state(final: str, key: str) -> TrainState | None:
    lora_path, state_path = _partial_paths(final)
    if not (os.path.exists(lora_path) and os.path.exists(state_path)):
        return None
    try:
        lora = load_lora(lora_path)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged partial state is discarded, never fatal
        log.warning("ignoring unreadable partial state %s (%s); starting the stage afresh", lora_path, e)
        return None
    if state.get("key") != key or lora.metadata.get("dac.partial_step") != str(state.get("step")):
        log.warning("ignoring partial state %s: it belongs to other settings; starting afresh", lora_path)
        return None
    return TrainState(state["step"], lora, state["optimizer"], state["generator"], list(state["losses"]),
                      state.get("scaler", {}), state.get("skipped", 0))


def _cached_stage(
    label: str, final: str, key: str, train: Callable[[TrainState | None, Callable], object],
    progress: ProgressFactory | None,
) -> tuple[LoRA, list[float], bool]:
    """Reuse `final` if it was made with `key`; else train (resuming partial state) and save."""
    if os.path.exists(final):
        try:
            lora = load_lora(final)
            if lora.metadata.get("dac.key") == key:
                log.info("reusing %s from %s (same image, prompt, model and settings)", label, final)
                return lora, json.loads(lora.metadata.get("dac.losses", "[]")), True
        except DACError as e:
            log.warning("%s; training it again", e)
    resume = _load_state(final, key)
    if resume is not None:
        log.info("resuming %s from step %d of an interrupted run", label, resume.step)
    callback = progress(label) if progress else None
    try:
        result = train(resume, lambda state: _save_state(final, key, state), callback)
    except NonFiniteLossError as e:
        lora_path, _ = _partial_paths(final)
        where = (f"the last good state is kept in {lora_path}" if os.path.exists(lora_path)
                 else "no checkpoint had been written yet")
        raise NonFiniteLossError(f"{e}; {where}", e.step, lora_path) from None
    save_lora(result.lora, final, {"dac.key": key})
    for path in _partial_paths(final):
        if os.path.exists(path):
            os.remove(path)
    return result.lora, result.losses, False


def _given_lora(path: str, backend: DACBackend, what: str) -> LoRA:
    """A LoRA file the user supplied instead of running an abduction."""
    lora = load_lora(path)
    made_on = lora.metadata.get("dac.base_model_fingerprint")
    if made_on and made_on != backend.fingerprint():
        log.warning("%s %s was made on another base model (fingerprint %s, this model %s)", what, path, made_on,
                    backend.fingerprint())
    log.info("using the given %s %s (its abduction is skipped)", what, path)
    return lora


def _png_info(record: dict, params: EditParams, seed: int):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dac", json.dumps({**record, "seed": seed}, default=str))
    info.add_text(
        "parameters",
        f"{params.target_prompt}\nNegative prompt: {params.negative_prompt}\nSteps: {params.sample_steps}, "
        f"CFG scale: {params.cfg}, "
        f"Seed: {seed}, DAC eta: {params.eta}, DAC beta: {params.beta}, Source prompt: {params.source_prompt}, "
        f"Model: {os.path.basename(str(params.model))}, dac-edit {__version__}",
    )
    return info


def _image_paths(base: str, count: int) -> list[str]:
    if count == 1:
        return [base]
    stem, ext = os.path.splitext(base)
    return [f"{stem}_{i}{ext or '.png'}" for i in range(count)]


@dataclass
class Stage:
    """One abduction's LoRA in a work folder: where it is, its losses, whether it was reused."""

    lora: LoRA
    path: str
    key: str
    losses: list[float]
    reused: bool


class EditSession:
    """The pieces of an edit in a work folder, each run at most once per setting: the photo
    encoded once, U (Abduction-1) trained or reused, Delta per eta (Abduction-2 depends on
    it) trained or reused, and counterfactual samples per (eta, beta). `edit` runs one of
    each; `dac_core.sweep` runs U once, Delta per eta and samples per cell."""

    def __init__(self, image, params: EditParams, workdir: str | os.PathLike = "dac_work",
                 backend: DACBackend | None = None, progress: ProgressFactory | None = None,
                 checkpoint_every: int = 100):
        params.check()
        self.image = image
        self.params = params
        self.pil = load_image(image) if isinstance(image, (str, os.PathLike)) else to_rgb(image)
        self.workdir = os.fspath(workdir)
        if backend is None:
            from .diffusers_backend import DiffusersBackend

            backend = DiffusersBackend.from_model(params.model, params.device, params.dtype,
                                                  gradient_checkpointing=params.gradient_checkpointing)
        self.backend = backend
        self.size = fit_size(*self.pil.size, params.resolution or backend.native_side, 8)
        self.pixels = image_to_tensor(self.pil, self.size)
        backend.original_size = self.pil.size  # SDXL's size conditioning: the photo as it was
        os.makedirs(self.workdir, exist_ok=True)
        self.progress = progress
        self.checkpoint_every = checkpoint_every
        self.t0 = time.time()
        self.latents = backend.encode_image(self.pixels)
        self._unet: Stage | None = None
        self._text: dict[float, Stage] = {}

    def _settings(self, steps: int, rank: int | None) -> TrainSettings:
        p = self.params
        return TrainSettings(steps, p.learning_rate, rank, p.train_seed, max_grad_norm=p.max_grad_norm)

    def unet_stage(self) -> Stage:
        """U: the given file, the one in the work folder made with the same settings, or trained."""
        if self._unet is not None:
            return self._unet
        p, backend = self.params, self.backend
        if p.unet_lora:
            with open(p.unet_lora, "rb") as f:
                key = _key(given=hashlib.sha256(f.read()).hexdigest())
            self._unet = Stage(_given_lora(p.unet_lora, backend, "UNet LoRA"), p.unet_lora, key, [], True)
            return self._unet
        settings = self._settings(p.unet_steps, p.unet_rank)
        key = _key(image=hashlib.sha256(self.pixels.numpy().tobytes()).hexdigest(), size=self.size,
                   source=p.source_prompt, model=backend.fingerprint(), settings=dataclasses.asdict(settings),
                   dtype=p.dtype)
        path = os.path.join(self.workdir, f"unet_lora-{key[:12]}.safetensors")
        lora, losses, reused = _cached_stage(
            "UNet LoRA (Abduction-1)", path, key,
            lambda resume, save, cb: abduct_unet_lora(
                backend, self.latents, p.source_prompt, settings, progress=cb, resume=resume, save_state=save,
                checkpoint_every=self.checkpoint_every),
            self.progress,
        )
        self._unet = Stage(lora, path, key, losses, reused)
        return self._unet

    def text_stage(self, eta: float) -> Stage:
        """Delta for `eta`: the given file, the one in the work folder, or trained through U."""
        if eta in self._text:
            return self._text[eta]
        p, backend = self.params, self.backend
        if p.text_lora:
            stage = Stage(_given_lora(p.text_lora, backend, "text-encoder LoRA"), p.text_lora, "", [], True)
        else:
            unet = self.unet_stage()
            settings = self._settings(p.text_steps, p.text_rank)
            key = _key(unet=unet.key, target=p.target_prompt, eta=eta, settings=dataclasses.asdict(settings))
            path = os.path.join(self.workdir, f"text_lora-{key[:12]}.safetensors")
            lora, losses, reused = _cached_stage(
                "text-encoder LoRA (Abduction-2)", path, key,
                lambda resume, save, cb: abduct_text_lora(
                    backend, self.latents, p.target_prompt, unet.lora, settings, eta=eta, progress=cb,
                    resume=resume, save_state=save, checkpoint_every=self.checkpoint_every),
                self.progress,
            )
            stage = Stage(lora, path, key, losses, reused)
        self._text[eta] = stage
        return stage

    def sample(self, eta: float, beta: float, label: str = "counterfactual sampling") -> list:
        """The batch's images (PIL) for (eta, beta); candidate i uses seed + i whatever the cell."""
        p = self.params
        unet, text = self.unet_stage(), self.text_stage(eta)
        images = counterfactual_sample(
            self.backend, p.target_prompt, unet.lora, text.lora, self.size, eta=eta, beta=beta,
            negative_prompt=p.negative_prompt, steps=p.sample_steps, cfg=p.cfg, seed=p.seed,
            batch_size=p.batch_size, progress=self.progress(label) if self.progress else None,
        )
        return tensor_to_images(images.cpu())  # one cell's images at a time on the device


def edit(
    image,
    params: EditParams,
    workdir: str | os.PathLike = "dac_work",
    out: str | os.PathLike | None = None,
    backend: DACBackend | None = None,
    progress: ProgressFactory | None = None,
    checkpoint_every: int = 100,
) -> EditResult:
    """Run a whole DAC edit of `image` (a path or a PIL image) and write it to `workdir`.

    `backend` defaults to a `DiffusersBackend` of `params.model`. The edited image(s) go to
    `workdir/edit.png` (edit_0.png ... for several) and, if given, to `out` as well.
    """
    session = EditSession(image, params, workdir, backend, progress, checkpoint_every)
    backend, pil, size, workdir, t0 = session.backend, session.pil, session.size, session.workdir, session.t0
    unet, text = session.unet_stage(), session.text_stage(params.eta)
    unet_path, unet_losses, reused_unet = unet.path, unet.losses, unet.reused
    text_path, text_losses, reused_text = text.path, text.losses, text.reused
    images = session.sample(params.eta, params.beta)
    record = {
        "dac_version": __version__,
        "params": dataclasses.asdict(params),
        "image": os.fspath(image) if isinstance(image, (str, os.PathLike)) else "<in memory>",
        "size": list(size),
        "base_model_fingerprint": backend.fingerprint(),
        "prediction_type": getattr(backend, "prediction_type", None),
        "unet_lora": os.path.abspath(unet_path),
        "text_lora": os.path.abspath(text_path),
        "reused_unet_lora": reused_unet,
        "reused_text_lora": reused_text,
        "final_loss": {"unet": unet_losses[-1] if unet_losses else None,
                       "text": text_losses[-1] if text_losses else None},
        "seconds": round(time.time() - t0, 2),
        "device": str(backend.device),
    }
    paths = _image_paths(os.path.join(workdir, "edit.png"), len(images))
    if out is not None:
        paths += _image_paths(os.fspath(out), len(images))
    for i, path in enumerate(paths):
        img = images[i % len(images)]
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=_png_info(record, params, params.seed + i % len(images)))
    record["images"] = [os.path.abspath(p) for p in paths]
    before_after_path = os.path.join(workdir, "before_after.png")
    with atomic_path(before_after_path) as tmp:
        before_after(pil, images, params.source_prompt, params.target_prompt).save(tmp, format="PNG")
    record["before_after"] = os.path.abspath(before_after_path)
    record_path = os.path.join(workdir, "dac_edit.json")
    write_json(record_path, record, indent=2, default=str)
    return EditResult(images, paths, unet_path, text_path, record_path, reused_unet, reused_text, unet_losses,
                      text_losses, before_after_path)
