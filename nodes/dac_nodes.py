"""The DAC nodes: thin V3 classes over dac_core.stages and the ComfyUI backend.

Schemas come from nodes/spec.py (plain data, tested without ComfyUI).
"""

from __future__ import annotations

import contextlib
import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io, ui
from typing_extensions import override

from ..dac_core import params as P
from ..dac_core import stages
from ..dac_core.errors import DACError
from ..dac_core.image import labelled_grid
from ..dac_core.lora import LoRA, combine, load_lora, save_lora, split
from . import spec
from .comfy_backend import ComfyBackend, apply_loras, release

log = logging.getLogger("dac_core")
DacLora = io.Custom(spec.DAC_LORA)
_SOCKETS = {
    "MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "LATENT": io.Latent,
    "CONDITIONING": io.Conditioning, spec.DAC_LORA: DacLora, spec.LOSS_MAP: io.LossMap,
}


def _options(node_id: str, name: str) -> list[str]:
    if name == "sampler_name":
        return list(comfy.samplers.KSampler.SAMPLERS)
    if name == "scheduler":
        return list(comfy.samplers.KSampler.SCHEDULERS)
    if name == "lora_name":
        return folder_paths.get_filename_list("loras")
    raise KeyError(f"{node_id}.{name} has no options")


def _input(node: spec.Node, i: spec.In):
    common = dict(optional=i.optional, tooltip=i.tooltip)
    if i.type == "INT":
        return io.Int.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step,
                            control_after_generate=i.control_after_generate, **common)
    if i.type == "FLOAT":
        return io.Float.Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **common)
    if i.type == "STRING":
        return io.String.Input(i.name, default=i.default, multiline=i.multiline, **common)
    if i.type == "BOOLEAN":
        return io.Boolean.Input(i.name, default=i.default, **common)
    if i.type == "COMBO":
        return io.Combo.Input(i.name, options=list(i.options or _options(node.id, i.name)), default=i.default, **common)
    return _SOCKETS[i.type].Input(i.name, **common)


def schema(node: spec.Node) -> io.Schema:
    return io.Schema(
        node_id=node.id, display_name=node.display_name, category=spec.CATEGORY, description=node.description,
        inputs=[_input(node, i) for i in node.inputs],
        outputs=[_SOCKETS[o.type].Output(display_name=o.name, tooltip=o.tooltip) for o in node.outputs],
        is_output_node=node.output_node, is_input_list=node.input_is_list,
    )


def _one_image(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [1, H, W, C] in 0..1 -> pixels [1, 3, H', W'] in [-1, 1], sides cut to multiples of 8."""
    if image.shape[0] != 1:
        raise DACError(f"the image input holds {image.shape[0]} images; DAC edits one photo at a time: pick one "
                       "with 'Image From Batch' (or run the workflow once per photo)")
    h, w = image.shape[1] // 8 * 8, image.shape[2] // 8 * 8
    if h < 8 or w < 8:
        raise DACError(f"the image is {image.shape[2]}x{image.shape[1]} pixels; DAC needs at least 8x8")
    return image[:, :h, :w, :3].clone().movedim(-1, 1) * 2 - 1


def _named(lora: LoRA | None, what: str) -> LoRA | None:
    if lora is not None:
        lora = LoRA(lora.layers, dict(lora.metadata), f"the {what} input")
    return lora


def _extras(conditioning) -> dict:
    """What a CONDITIONING carries beside its text embedding (ControlNet, area, mask, ...)."""
    if not conditioning:
        return {}
    return {k: v for k, v in conditioning[0][1].items() if k != "pooled_output"}


def _loss_map(result: stages.StageResult) -> dict:
    """ComfyUI's LOSS_MAP (Plot Loss Graph reads "loss"), with the float16 steps skipped."""
    return {"loss": result.losses, "skipped_steps": result.skipped_steps}


def _progress(total: int, preview=None):
    bar = comfy.utils.ProgressBar(total)

    def update(step, total_=None, loss=None):
        comfy.model_management.throw_exception_if_processing_interrupted()  # the UI's Cancel, within one step
        bar.update_absolute(step, total_ or total, preview(step) if preview else None)

    return update


@contextlib.contextmanager
def _released(backend: ComfyBackend):
    """Unload the backend's clones when the node ends: finished, failed or cancelled."""
    try:
        yield
    finally:
        release(backend.model, backend.clip.patcher if backend.clip is not None else None)


def _train(backend: ComfyBackend, fn):
    """Run a training stage with gradients inside ComfyUI's inference mode."""
    with _released(backend), torch.inference_mode(False), torch.enable_grad():
        return fn()


class AbductUNetLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.ABDUCT_UNET)

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, steps, learning_rate, rank, seed, training_dtype,
                gradient_checkpointing, preview_every, max_grad_norm=0.0, init_lora=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip, vae, training_dtype, gradient_checkpointing)
        settings = stages.TrainSettings(steps, learning_rate, rank, seed, max_grad_norm=max_grad_norm)

        def run():
            pixels = _one_image(image)
            latents = backend.encode_image(pixels)
            preview = None
            if preview_every:
                preview = lambda step: backend.preview(latents) if step % preview_every == 0 else None  # noqa: E731
            result = stages.abduct_unet_lora(backend, latents, source_prompt, settings,
                                             init=_named(init_lora, "init_lora"), progress=_progress(steps, preview))
            return result, pixels

        result, pixels = _train(backend, run)
        lora = result.lora
        lora.metadata.update({"dac.width": str(pixels.shape[-1]), "dac.height": str(pixels.shape[-2])})
        preview_model, _ = apply_loras(model, None, lora, None, eta=1.0, beta=0.0)
        return io.NodeOutput(lora, preview_model, _loss_map(result))


class AbductTextLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.ABDUCT_TEXT)

    @classmethod
    def execute(cls, model, clip, vae, image, target_prompt, unet_lora, eta, steps, learning_rate, rank, seed,
                training_dtype, max_grad_norm=0.0, gradient_checkpointing=False, extra_text_lora=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip, vae, training_dtype, gradient_checkpointing)
        settings = stages.TrainSettings(steps, learning_rate, rank, seed, max_grad_norm=max_grad_norm)

        def run():
            latents = backend.encode_image(_one_image(image))
            return stages.abduct_text_lora(backend, latents, target_prompt, _named(unet_lora, "unet_lora"), settings,
                                           eta=eta, extra_text_lora=_named(extra_text_lora, "extra_text_lora"),
                                           progress=_progress(steps))

        result = _train(backend, run)
        result.lora.metadata.update({k: v for k, v in unet_lora.metadata.items() if k in ("dac.width", "dac.height")})
        return io.NodeOutput(result.lora, _loss_map(result))


class CounterfactualSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.COUNTERFACTUAL)

    @classmethod
    def execute(cls, model, clip, unet_lora, text_lora, target_prompt, negative_prompt, eta, beta, seed, steps, cfg,
                sampler_name, scheduler, batch_size, latent=None, positive=None, negative=None,
                extra_text_lora=None) -> io.NodeOutput:
        backend = ComfyBackend(model, clip, None, sampler_name=sampler_name, scheduler=scheduler,
                               positive_extras=_extras(positive), negative_extras=_extras(negative))
        if not target_prompt.strip():
            target_prompt = text_lora.metadata.get("dac.prompt", "")
        trained_eta = text_lora.metadata.get("dac.eta")
        if trained_eta and abs(float(trained_eta) - eta) > 1e-6:
            log.warning("Counterfactual Sample: eta %s differs from the eta %s the text-encoder LoRA was fitted with; "
                        "DAC uses the same value for both", eta, trained_eta)
        if latent is not None:
            _, _, h, w = latent["samples"].shape
            size, batch_size = (w * 8, h * 8), max(batch_size, latent["samples"].shape[0])
        else:
            try:
                size = (int(unet_lora.metadata["dac.width"]), int(unet_lora.metadata["dac.height"]))
            except (KeyError, ValueError):
                raise DACError("the UNet LoRA does not record the source size: connect a LATENT of the wanted "
                               "size (e.g. VAE Encode of the source photo)") from None
        with _released(backend):
            latents = stages.counterfactual_sample(
                backend, target_prompt, _named(unet_lora, "unet_lora"), _named(text_lora, "text_lora"), size,
                extra_text_lora=_named(extra_text_lora, "extra_text_lora"), eta=eta, beta=beta,
                negative_prompt=negative_prompt, steps=steps, cfg=cfg, seed=seed, batch_size=batch_size,
                progress=_progress(steps), decode=False)
        return io.NodeOutput({"samples": backend.latent_format.process_out(latents).cpu()})


def _one(value, name: str):
    """A node with list inputs gets every input as a list: the one value of a scalar input."""
    if not isinstance(value, list):
        return value
    if len(value) != 1:
        raise DACError(f"the {name} input holds {len(value)} values; DAC Sweep takes one"
                       + (" (several betas go in one text: '0, 0.5, 1')" if name == "betas" else ""))
    return value[0]


def _pictures(images: torch.Tensor) -> list:
    """IMAGE [B, H, W, C] in 0..1 -> PIL RGB images (8 bits, rounded)."""
    from PIL import Image

    arr = (images[..., :3].float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def _sweep_rows(text_loras: list, target_prompt: str, eta: float) -> list[tuple[float, LoRA, str]]:
    """(eta, Delta, target prompt) per grid row: each Delta at the eta it was fitted with
    (`dac.eta`, written by Abduction-2), `eta` for one that does not record it."""
    if not text_loras or any(lora is None for lora in text_loras):
        raise DACError("the text_lora input holds no text-encoder LoRA")
    rows = []
    for i, lora in enumerate(text_loras):
        what = "text_lora" if len(text_loras) == 1 else f"text_lora #{i + 1}"
        row_eta = eta
        if lora.metadata.get("dac.eta"):
            try:
                row_eta = float(lora.metadata["dac.eta"])
            except ValueError:
                row_eta = None
            P.ETA.check(row_eta, f"the eta {what} was fitted with (dac.eta)")
        prompt = target_prompt if target_prompt.strip() else lora.metadata.get("dac.prompt", "")
        rows.append((row_eta, _named(lora, what), prompt))
    return rows


def _sweep_size(unet_lora: LoRA, source) -> tuple[int, int]:
    """(width, height) of the cells: the source size U records, else the source photo's."""
    try:
        return int(unet_lora.metadata["dac.width"]), int(unet_lora.metadata["dac.height"])
    except (KeyError, ValueError):
        if source is None:
            raise DACError("the UNet LoRA does not record the source size: connect the source photo to the "
                           "source input") from None
        return source.shape[2] // 8 * 8, source.shape[1] // 8 * 8


def _sweep(text_loras: list, model, clip, vae, unet_lora, target_prompt, negative_prompt, betas, eta, seed, steps,
           cfg, sampler_name, scheduler, batch_size, source=None) -> tuple[dict, torch.Tensor]:
    """DAC Sweep: (LATENT of every cell, grid IMAGE). Each cell is Counterfactual Sample's
    latents (dac_core.stages.counterfactual_sample) on one backend: U and each Delta are
    attached once, and a cell's batch leaves the device as soon as it is sampled."""
    beta_values = P.check_values(P.parse_values(betas, P.BETA, "betas"), P.BETA)
    rows = _sweep_rows(text_loras, target_prompt, eta)
    size = _sweep_size(unet_lora, source)
    unet = _named(unet_lora, "unet_lora")
    bar = comfy.utils.ProgressBar(len(rows) * len(beta_values) * steps)
    backend = ComfyBackend(model, clip, None, sampler_name=sampler_name, scheduler=scheduler)
    latents = []  # per cell, on the CPU
    with _released(backend):
        for r, (row_eta, delta, prompt) in enumerate(rows):
            for c, beta in enumerate(beta_values):
                comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between cells
                done = (r * len(beta_values) + c) * steps

                def progress(step, total=None, loss=None, done=done):
                    comfy.model_management.throw_exception_if_processing_interrupted()  # ... and within one
                    bar.update_absolute(done + (round(step * steps / total) if total else step))

                cell = stages.counterfactual_sample(
                    backend, prompt, unet, delta, size, eta=row_eta, beta=beta, negative_prompt=negative_prompt,
                    steps=steps, cfg=cfg, seed=seed, batch_size=batch_size, progress=progress, decode=False)
                latents.append(backend.latent_format.process_out(cell).cpu())
                del cell
    pictures = [_pictures(vae.decode(cell)) for cell in latents]  # once the DAC clones are unloaded
    if source is not None:
        corner = _pictures(source[:1])[0]
        corner_label = f"source: {unet_lora.metadata.get('dac.prompt', '')}".removesuffix(": ")
    else:
        from PIL import Image

        corner, corner_label = Image.new("RGB", pictures[0][0].size, "white"), ""
    n = len(beta_values)
    grid, _ = labelled_grid(corner, corner_label, [f"eta = {e:g}" for e, _, _ in rows],
                            [f"beta = {b:g}" for b in beta_values],
                            [pictures[r * n:(r + 1) * n] for r in range(len(rows))])
    return {"samples": torch.cat(latents)}, torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]


class DACSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.SWEEP)

    @classmethod
    def execute(cls, model, clip, vae, unet_lora, text_lora, target_prompt, negative_prompt, betas, eta, seed, steps,
                cfg, sampler_name, scheduler, batch_size, source=None) -> io.NodeOutput:
        # ComfyUI hands a node with a list input every input as a list: one value each, text_lora one per row
        given = dict(locals())
        text_loras = text_lora if isinstance(text_lora, list) else [text_lora]
        inputs = {name: _one(value, name) for name, value in given.items() if name not in ("cls", "text_lora")}
        return io.NodeOutput(*_sweep(text_loras, **inputs))


class ApplyDACLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.APPLY)

    @classmethod
    def execute(cls, model, clip, unet_lora, text_lora, eta, beta, extra_text_lora=None) -> io.NodeOutput:
        return io.NodeOutput(*apply_loras(model, clip, _named(unet_lora, "unet_lora"), _named(text_lora, "text_lora"),
                                          eta, beta, _named(extra_text_lora, "extra_text_lora")))


class SaveDACLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.SAVE)

    @classmethod
    def execute(cls, unet_lora, text_lora, filename_prefix) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths("loras")[0]
        full, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
        path = os.path.join(full, f"{name}_{counter:05}_.safetensors")
        save_lora(combine(unet_lora, text_lora), path)
        log.info("saved DAC LoRA to %s", path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.relpath(path, folder)} in models/loras"))


class LoadDACLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(spec.LOAD)

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        lora = load_lora(folder_paths.get_full_path_or_raise("loras", lora_name))
        unet, text = split(lora)
        if not len(unet) and not len(text):
            raise DACError(f"{lora_name} holds no UNet or text-encoder LoRA layers")
        return io.NodeOutput(unet if len(unet) else None, text if len(text) else None)


NODE_CLASSES = [AbductUNetLoRA, AbductTextLoRA, CounterfactualSample, DACSweep, ApplyDACLoRAs, SaveDACLoRA,
                LoadDACLoRA]


class DACExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODE_CLASSES


async def comfy_entrypoint() -> DACExtension:
    return DACExtension()
