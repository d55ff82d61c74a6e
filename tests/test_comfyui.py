"""The DAC nodes inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout).

Nodes run as ComfyUI's executor runs them: inside torch.inference_mode(), on tiny SD1.x and
SDXL models built in code (tests/comfy_tiny.py) with the same weights as dac_core.tiny's:
every test that takes `parts` runs on both.
"""

from __future__ import annotations

import importlib

import comfy_tiny
import numpy as np
import pytest
import torch

COMFYUI = comfy_tiny.comfyui_path()
pytestmark = comfy_tiny.NEEDS_COMFYUI

if COMFYUI:
    comfy_tiny.import_comfy(COMFYUI)


@pytest.fixture(scope="module")
def pack():
    comfy_tiny.import_pack()
    return importlib.import_module("dac_pack.nodes.dac_nodes")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def flavour(request):
    return request.param


@pytest.fixture(scope="module")
def parts(flavour):
    return comfy_tiny.tiny_model(flavour), comfy_tiny.tiny_clip(flavour), comfy_tiny.tiny_vae()


@pytest.fixture
def image():
    from dac_core.tiny import demo_image

    return torch.from_numpy(np.asarray(demo_image((64, 48)), dtype=np.float32) / 255)[None]


@pytest.fixture(scope="module")
def trained(pack, parts):
    """UNet and text LoRAs trained by the nodes, with their loss histories."""
    from dac_core.tiny import demo_image

    model, clip, vae = parts
    img = torch.from_numpy(np.asarray(demo_image((64, 48)), dtype=np.float32) / 255)[None]
    with torch.inference_mode():
        u, preview_model, loss_u = pack.AbductUNetLoRA.execute(model, clip, vae, img, "a red disc", 60, 2e-3, 8, 42,
                                                               "fp32", False, 20).args
        d, loss_d = pack.AbductTextLoRA.execute(model, clip, vae, img, "a red disc with a hat", u, 0.8, 30, 2e-3, 4,
                                                42, "fp32").args
    return u, d, preview_model, loss_u, loss_d


def ksample(model, clip, prompt="a red disc with a hat", seed=3):
    import nodes as comfy_nodes

    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = {"samples": torch.zeros(1, 4, 6, 8)}
        return comfy_nodes.common_ksampler(model, seed, 4, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def test_abductions_lower_the_loss_and_keep_the_source_size(trained, flavour):
    from dac_core.backend import TEXT_DELTA, UNET
    from dac_core.diffusers_backend import DiffusersBackend
    from dac_core.tiny import tiny_pipeline

    u, d, preview_model, loss_u, loss_d = trained
    assert len(loss_u["loss"]) == 60 and len(loss_d["loss"]) == 30
    assert np.mean(loss_u["loss"][-15:]) < np.mean(loss_u["loss"][:15])
    # the same layers, under the same names, as the diffusers backend trains on this model
    diffusers_be = DiffusersBackend(tiny_pipeline(flavour))
    assert set(u.layers) == set(diffusers_be.lora_shapes(UNET)) and len(u) == (79 if flavour == "sd1" else 119)
    assert set(d.layers) == set(diffusers_be.lora_shapes(TEXT_DELTA))
    assert {k.split("text_model")[0] for k in d.layers} == ({"lora_te_"} if flavour == "sd1" else
                                                            {"lora_te1_", "lora_te2_"})
    assert (u.metadata["dac.width"], u.metadata["dac.height"]) == ("64", "48")
    assert u.metadata["dac.stage"] == "unet" and d.metadata["dac.stage"] == "text"


def test_counterfactual_sample_makes_a_latent_batch(pack, parts, trained):
    model, clip, _ = parts
    u, d, *_ = trained
    with torch.inference_mode():
        (latent,) = pack.CounterfactualSample.execute(model, clip, u, d, "a red disc with a hat", "", 0.8, 1.0, 29, 3,
                                                      4.0, "ddim", "ddim_uniform", 2).args
        (again,) = pack.CounterfactualSample.execute(model, clip, u, d, "a red disc with a hat", "", 0.8, 1.0, 29, 3,
                                                     4.0, "ddim", "ddim_uniform", 2).args
    assert latent["samples"].shape == (2, 4, 6, 8)
    assert torch.equal(latent["samples"], again["samples"])
    assert not torch.equal(latent["samples"][0], latent["samples"][1])


def test_nodes_leave_the_input_model_and_clip_untouched(pack, parts, trained):
    model, clip, vae = parts
    before = ksample(model, clip)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    u, d, *_ = trained
    with torch.inference_mode():
        pack.CounterfactualSample.execute(model, clip, u, d, "a b", "", 0.8, 1.0, 29, 2, 4.0, "euler", "normal", 1)
        pack.DACSweep.execute(model, clip, vae, u, [d], "a b", "", "0, 1", 0.8, 29, 2, 4.0, "euler", "normal", 1)
        applied_model, applied_clip = pack.ApplyDACLoRAs.execute(model, clip, u, d, 0.8, 1.0).args
        ksample(applied_model, applied_clip)
    after = ksample(model, clip)
    assert torch.equal(before, after)
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not model.weight_wrapper_patches and not clip.patcher.weight_wrapper_patches
    assert all(not m.weight_function for m in model.model.modules() if hasattr(m, "weight_function"))


def test_apply_dac_loras_anneals_per_step(pack, parts, trained):
    """gamma(t) reaches the UNet LoRA at every model call of a stock sampler."""
    from dac_core.schedule import gamma_at_fraction

    model, clip, _ = parts
    u, d, *_ = trained
    applied_model, applied_clip = pack.ApplyDACLoRAs.execute(model, clip, u, d, 0.5, 1.0).args
    backend_mod = importlib.import_module("dac_pack.nodes.comfy_backend")
    seen = []
    original = backend_mod.LoRAWrapper.forward

    def spy(self, weight):
        seen.append(self.strength.value)
        return original(self, weight)

    backend_mod.LoRAWrapper.forward = spy
    try:
        ksample(applied_model, applied_clip)
    finally:
        backend_mod.LoRAWrapper.forward = original
    unet_strengths = sorted({round(s, 6) for s in seen if s > 0})
    ms = model.get_model_object("model_sampling")
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 4)[:-1]
    expected = sorted({round(float(gamma_at_fraction(ms.timestep(s).float() / 999, 0.5)), 6) for s in sigmas})
    assert unet_strengths == expected
    assert -1.0 in {round(s, 6) for s in seen}  # the text-encoder LoRA at -beta


def test_stock_lora_loader_at_plus_one_minus_one_equals_apply_with_eta_one(pack, parts, trained, tmp_path):
    import comfy.sd
    import comfy.utils
    import folder_paths

    model, clip, _ = parts
    u, d, *_ = trained
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path)], {".safetensors"})
    with torch.inference_mode():
        pack.SaveDACLoRA.execute(u, d, "dac/test")
    (name,) = folder_paths.get_filename_list("loras")
    assert name.startswith("dac") and name.endswith(".safetensors")
    sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name))
    stock_model, stock_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, -1.0)
    n_patched = len(stock_model.patches) + len(stock_clip.patcher.patches)
    assert n_patched == len(u) + len(d)  # the stock loader understood every key
    applied_model, applied_clip = pack.ApplyDACLoRAs.execute(model, clip, u, d, 1.0, 1.0).args
    assert torch.allclose(ksample(stock_model, stock_clip), ksample(applied_model, applied_clip), atol=1e-4)
    loaded_u, loaded_d = pack.LoadDACLoRA.execute(name).args
    for stem, layer in u.layers.items():
        assert torch.equal(loaded_u.layers[stem].up, layer.up)
    assert set(loaded_d.layers) == set(d.layers)


def test_cancel_stops_within_one_step_and_leaves_nothing_patched(pack, parts, image):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, vae = parts
    steps_seen = []

    def hook(value, total, preview, node_id=None):
        steps_seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 500, 1e-3, 4, 1, "fp32", False, 0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert max(steps_seen) == 3
    assert not any(getattr(m, "weight_function", None) for m in model.model.modules())
    assert not any(getattr(m, "weight_function", None) for m in clip.cond_stage_model.modules())


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty prompt", "source prompt is empty"),
        ("two images", "the image input holds 2 images; DAC edits one photo at a time"),
        ("nan", "the loss became nan"),
    ],
)
def test_bad_input_to_abduct_unet_lora(pack, parts, image, case, message):
    model, clip, vae = parts
    prompt, img, lr = "a", image, 1e-3
    if case == "empty prompt":
        prompt = "  "
    elif case == "two images":
        img = torch.cat([image, image])
    else:
        lr = 1.0  # the highest rate the node accepts; on this model the loss is nan within 20 steps
    from dac_pack.dac_core.errors import DACError

    with torch.inference_mode(), pytest.raises(DACError, match=message):
        pack.AbductUNetLoRA.execute(model, clip, vae, img, prompt, 20, lr, 4, 1, "fp32", False, 0)


def test_text_lora_where_a_unet_lora_is_expected(pack, parts, trained, image):
    model, clip, vae = parts
    _, d, *_ = trained
    from dac_pack.dac_core.errors import DACError

    with torch.inference_mode(), pytest.raises(DACError, match="the unet_lora input is not a UNet LoRA: it holds "
                                                                "text-encoder layers only"):
        pack.AbductTextLoRA.execute(model, clip, vae, image, "a b", d, 0.8, 2, 1e-3, 4, 1, "fp32")


def test_lora_from_another_base_model(pack, parts, flavour, image):
    model, clip, vae = parts
    other = "sd2" if flavour == "sd1" else "sd1"  # SD 2.x: linear proj_in/out, other shapes; SDXL, SD 1.x: all
    with torch.inference_mode():
        u_other = pack.AbductUNetLoRA.execute(comfy_tiny.tiny_model(other), comfy_tiny.tiny_clip(other), vae, image,
                                              "a", 2, 1e-3, 4, 1, "fp32", False, 0).args[0]
    from dac_pack.dac_core.errors import DACError

    with torch.inference_mode(), pytest.raises(DACError, match="the unet_lora input does not fit this model: (it has )?"
                                                                "layer lora_unet_"):
        pack.AbductTextLoRA.execute(model, clip, vae, image, "a b", u_other, 0.8, 2, 1e-3, 4, 1, "fp32")


def test_v_prediction_model_trains(pack, image):
    model, clip, vae = comfy_tiny.tiny_model("sd2"), comfy_tiny.tiny_clip(), comfy_tiny.tiny_vae()
    with torch.inference_mode():
        u, _, loss = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 40, 2e-3, 4, 1, "fp32", False, 0).args
    assert np.isfinite(loss["loss"]).all() and len(u) == 79


def test_gradient_checkpointing_gives_the_same_training(pack, parts, image):
    model, clip, vae = parts
    with torch.inference_mode():
        plain = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 6, 1e-3, 4, 3, "fp32", False, 0).args[2]
        ckpt = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 6, 1e-3, 4, 3, "fp32", True, 0).args[2]
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    u = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 2, 1e-3, 4, 3, "fp32", False, 0).args[0]
    with torch.inference_mode():  # Abduction-2 back-propagates through the UNet too
        plain = pack.AbductTextLoRA.execute(model, clip, vae, image, "a b", u, 0.8, 4, 1e-3, 4, 3, "fp32").args[1]
        ckpt = pack.AbductTextLoRA.execute(model, clip, vae, image, "a b", u, 0.8, 4, 1e-3, 4, 3, "fp32", 0.0,
                                           True).args[1]
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for m in model.model.modules():  # the object patches were undone: every forward is the class's own again
        assert getattr(m.forward, "__func__", None) is type(m).forward


def test_bf16_training_dtype(pack, parts, image):
    model, clip, vae = parts
    with torch.inference_mode():
        u, _, loss = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 5, 1e-3, 4, 3, "bf16", False, 0).args
    assert np.isfinite(loss["loss"]).all()
    assert all(layer.up.dtype == torch.float32 for layer in u.layers.values())  # LoRA weights stay float32


def test_progress_bar_moves_and_shows_reconstruction_previews(pack, parts, image):
    import comfy.utils

    model, clip, vae = parts
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, preview)))
    try:
        with torch.inference_mode():
            pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 6, 1e-3, 4, 3, "fp32", False, 3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5, 6]
    previews = {v: p for v, p in seen if p is not None}
    assert set(previews) == {3, 6}
    kind, picture, _ = previews[3]
    assert kind == "JPEG" and picture.size == (64, 48)


def test_counterfactual_sample_carries_controlnet_conditioning(pack, parts, flavour, trained, image):
    """Conditioning from ControlNet Apply goes into the positive/negative inputs: the control
    acts on the DAC sample; the text embedding is DAC's own."""
    import nodes as comfy_nodes

    model, clip, _ = parts
    u, d, *_ = trained
    control = comfy_tiny.tiny_controlnet(flavour)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("something else entirely"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        args = (model, clip, u, d, "a red disc with a hat", "", 0.8, 1.0, 29, 3, 4.0, "euler", "normal", 1)
        (plain,) = pack.CounterfactualSample.execute(*args).args
        (no_control,) = pack.CounterfactualSample.execute(*args, positive=pos, negative=neg).args
        pos_c, neg_c = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, image, 1.0, 0.0, 1.0)
        (controlled,) = pack.CounterfactualSample.execute(*args, positive=pos_c, negative=neg_c).args
    assert "control" in pos_c[0][1]
    assert torch.equal(plain["samples"], no_control["samples"])  # the prompt text comes from DAC, not the input
    assert not torch.allclose(controlled["samples"], plain["samples"])  # the ControlNet acts


# --- DAC Sweep ------------------------------------------------------------------------------

SWEEP_BETAS = (0.0, 0.5, 1.0)
SWEEP = dict(target_prompt="", negative_prompt="", betas="0, 0.5, 1", eta=0.3, seed=29, steps=3, cfg=4.0,
             sampler_name="ddim", scheduler="ddim_uniform", batch_size=2)


def sweep(pack, parts, unet_lora, text_loras, **changes):
    """DACSweep.execute as ComfyUI calls a list-input node: every input a list."""
    model, clip, vae = parts
    inputs = {"model": model, "clip": clip, "vae": vae, "unet_lora": unet_lora, **SWEEP, **changes}
    with torch.inference_mode():
        return pack.DACSweep.execute(text_lora=list(text_loras), **{k: [v] for k, v in inputs.items()}).args


@pytest.fixture(scope="module")
def swept(pack, parts, trained):
    """A sweep over three Deltas (fitted at eta 0.8 and 0.5 by the node, and one without dac.eta, which
    takes the node's eta 0.3) x three betas x two candidates, with the source photo, its progress
    values and how many LoRA wrappers it built."""
    import comfy.utils
    from dac_pack.dac_core.lora import LoRA

    from dac_core.tiny import demo_image

    model, clip, vae = parts
    u, d, *_ = trained
    img = torch.from_numpy(np.asarray(demo_image((64, 48)), dtype=np.float32) / 255)[None]
    with torch.inference_mode():
        d2, _ = pack.AbductTextLoRA.execute(model, clip, vae, img, "a red disc with a hat", u, 0.5, 5, 2e-3, 4, 42,
                                            "fp32").args
    no_eta = LoRA(d.layers, {k: v for k, v in d.metadata.items() if k != "dac.eta"})
    assert d.metadata["dac.eta"] == "0.8" and d2.metadata["dac.eta"] == "0.5"
    backend_mod = importlib.import_module("dac_pack.nodes.comfy_backend")
    seen, built = [], []
    original = backend_mod.LoRAWrapper.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    backend_mod.LoRAWrapper.__init__ = counting
    try:
        latent, grid = sweep(pack, parts, u, [d, d2, no_eta], source=img)
    finally:
        backend_mod.LoRAWrapper.__init__ = original
        comfy.utils.set_progress_bar_global_hook(None)
    return {"rows": [(d, 0.8), (d2, 0.5), (no_eta, 0.3)], "latent": latent, "grid": grid, "source": img,
            "progress": seen, "wrappers": len(built)}


def test_sweep_cells_are_counterfactual_samples(pack, parts, trained, swept):
    """Every cell, bit for bit, is Counterfactual Sample's output with the same settings, each Delta at
    the eta it was fitted with (the node's eta for the one that does not record it)."""
    model, clip, _ = parts
    u, *_ = trained
    assert pack.DACSweep.INPUT_IS_LIST is True
    samples, k = swept["latent"]["samples"], SWEEP["batch_size"]
    assert samples.shape == (3 * 3 * k, 4, 6, 8) and samples.device.type == "cpu"
    cell = 0
    for delta, eta in swept["rows"]:
        for beta in SWEEP_BETAS:
            with torch.inference_mode():
                (expected,) = pack.CounterfactualSample.execute(model, clip, u, delta, "", "", eta, beta, 29, 3, 4.0,
                                                                "ddim", "ddim_uniform", k).args
            assert torch.equal(samples[cell * k:(cell + 1) * k], expected["samples"]), (eta, beta)
            cell += 1
    cells = samples.reshape(3, 3, k, *samples.shape[1:])
    assert not torch.equal(cells[0, 2], cells[2, 2]) and not torch.equal(cells[0, 0], cells[0, 2])  # eta, beta act
    assert not torch.equal(cells[0, 0, 0], cells[0, 0, 1])  # candidates: seed, seed + 1
    # the progress bar runs over all 9 cells x 3 steps, moving within each cell
    assert swept["progress"] == [(v, 27) for v in range(1, 28)]
    # U is attached once and each Delta once per row, not once per cell
    assert swept["wrappers"] == len(u) + 3 * len(swept["rows"][0][0])
    assert not model.weight_wrapper_patches and not clip.patcher.weight_wrapper_patches


def test_sweep_takes_the_deltas_as_comfyui_hands_a_list(pack, parts, trained, swept):
    """Through ComfyUI's executor, which hands a list-input node every input as a list (here a
    list of two Deltas, as from Abduct Text-Encoder LoRA run over two eta values), one call."""
    import asyncio

    import execution

    model, clip, vae = parts
    u, *_ = trained
    k = SWEEP["batch_size"]
    inputs = {"model": [model], "clip": [clip], "vae": [vae], "unet_lora": [u],
              **{name: [value] for name, value in SWEEP.items()}, "betas": ["1"],
              "text_lora": [delta for delta, _ in swept["rows"][:2]]}
    with torch.inference_mode():
        output, _, _, _ = asyncio.run(execution.get_output_data("prompt", "5", pack.DACSweep, inputs))
    (latent,), (grid,) = output
    cells = swept["latent"]["samples"].reshape(3, 3, k, 4, 6, 8)
    assert torch.equal(latent["samples"], torch.cat([cells[0, 2], cells[1, 2]]))
    assert grid.shape[0] == 1


def _grid_pixels(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


def _decoded_pixels(vae, latents: torch.Tensor) -> list[np.ndarray]:
    import nodes as comfy_nodes

    with torch.inference_mode():
        (images,) = comfy_nodes.VAEDecode().decode(vae, {"samples": latents})
    return [np.clip(np.round(i.numpy() * 255), 0, 255).astype(np.uint8) for i in images]


def test_sweep_grid_holds_each_cell_and_the_source(parts, swept):
    """Rows eta, columns beta, the source top left: each cell's region of the grid IMAGE is that cell's
    latents decoded by the VAE (enlarged 3x without smoothing: the cells are 48 pixels high)."""
    from PIL import Image

    from dac_core.image import labelled_grid

    _, _, vae = parts
    samples, k = swept["latent"]["samples"], SWEEP["batch_size"]
    blank = Image.new("RGB", (64, 48))
    cells = [[[blank] * k] * 3] * 3
    reference, boxes = labelled_grid(blank, "source", ["eta = 0.8"] * 3, ["beta = 0"] * 3, cells)
    grid = _grid_pixels(swept["grid"])
    assert swept["grid"].shape == (1, reference.height, reference.width, 3) and swept["grid"].dtype == torch.float32
    scale = 3
    for (r, c), (left, top) in boxes.items():
        cell = r * 3 + c
        for n, decoded in enumerate(_decoded_pixels(vae, samples[cell * k:(cell + 1) * k])):
            x = left + n * 64 * scale
            region = grid[top:top + 48 * scale, x:x + 64 * scale]
            assert np.array_equal(region, decoded.repeat(scale, 0).repeat(scale, 1)), (r, c, n)
    source = (swept["source"][0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(grid[36:36 + 48 * scale, 6:6 + 64 * scale], source.repeat(scale, 0).repeat(scale, 1))
    # a label beside the corner above each column, and one in the first column of each row
    for c in range(3):
        left = boxes[(0, c)][0]
        assert (grid[6:36 + 48 * scale, left:left + 64 * k * scale] < 128).any(), c
    for r in range(3):
        top = boxes[(r, 0)][1]
        assert (grid[top:top + 48 * scale, 6:6 + 64 * k * scale] < 128).any(), r


def test_sweep_without_source_has_a_blank_corner(pack, parts, trained):
    u, d, *_ = trained
    latent, grid = sweep(pack, parts, u, [d], betas="1", steps=1, batch_size=1)
    assert latent["samples"].shape == (1, 4, 6, 8)
    pixels = _grid_pixels(grid)
    assert pixels.shape == (6 + 2 * (144 + 30 + 6), 6 + 2 * (192 + 6), 3)
    assert (pixels[36:36 + 144, 6:6 + 192] == 255).all()  # the corner tile
    assert not (pixels[6 + 180 + 30:6 + 180 + 30 + 144, 204:204 + 192] == 255).all()  # the one cell


@pytest.mark.parametrize("betas, message", [
    ("", r"betas is empty: give one or more numbers separated by commas, each in \[-3, 5\]"),
    ("a", r"betas must be a number in \[-3, 5\], got 'a'"),
    ("9", r"betas must be a number in \[-3, 5\], got 9.0"),
    ("0, 1, x", r"betas must be one or more numbers separated by commas, each in \[-3, 5\], got 'x' in '0, 1, x'"),
    (["0", "1"], r"the betas input holds 2 values; DAC Sweep takes one \(several betas go in one text"),
])
def test_sweep_names_bad_betas(pack, parts, trained, betas, message):
    from dac_pack.dac_core.errors import DACError

    model, clip, vae = parts
    u, d, *_ = trained
    inputs = {"model": [model], "clip": [clip], "vae": [vae], "unet_lora": [u],
              **{k: [v] for k, v in SWEEP.items()}, "betas": betas if isinstance(betas, list) else [betas]}
    with torch.inference_mode(), pytest.raises(DACError, match=message):
        pack.DACSweep.execute(text_lora=[d], **inputs)


def test_cancel_stops_the_sweep_between_cells_and_leaves_nothing_patched(pack, parts, trained):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, _ = parts
    u, d, *_ = trained
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:  # the first cell's last step
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sweep(pack, parts, u, [d], betas="0, 1, 2", steps=3, batch_size=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert seen == [1, 2, 3]
    assert not model.weight_wrapper_patches and not clip.patcher.weight_wrapper_patches
    assert not any(getattr(m, "weight_function", None) for m in model.model.modules())
    assert not any(getattr(m, "weight_function", None) for m in clip.cond_stage_model.modules())


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    """comfy_tiny.save_sdxl_checkpoint's file (1.7 GB, removed afterwards: pytest keeps the
    temporary folders of its last three runs)."""
    path = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    yield comfy_tiny.save_sdxl_checkpoint(str(path))
    path.unlink(missing_ok=True)


def test_sdxl_checkpoint_loads_as_sdxl_and_samples(sdxl_checkpoint):
    """CheckpointLoaderSimple's loader detects the tiny SDXL checkpoint as SDXL (pooled text
    and size conditioning, SDXL latents); CLIPTextEncode, KSampler and VAEDecode run on it."""
    import comfy.latent_formats
    import comfy.sd
    from comfy import model_base

    import nodes as comfy_nodes

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(sdxl_checkpoint, output_vae=True, output_clip=True)
    assert isinstance(model.model, model_base.SDXL)
    assert isinstance(model.model.latent_format, comfy.latent_formats.SDXL)
    config = model.model.model_config.unet_config
    assert {k: config[k] for k in comfy_tiny.SDXL_TINY} == comfy_tiny.SDXL_TINY
    with torch.inference_mode():
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a red disc with a hat")
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        cond, extra = positive[0]
        assert cond.shape == (1, 77, 768 + 1280) and extra["pooled_output"].shape == (1, 1280)
        y = model.model.encode_adm(pooled_output=extra["pooled_output"], width=64, height=64)
        assert y.shape == (1, 2816)  # pooled CLIP-G output and six size/crop embeddings
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        (sampled,) = comfy_nodes.KSampler().sample(model, 3, 3, 5.0, "euler", "normal", positive, negative, latent)
        (images,) = comfy_nodes.VAEDecode().decode(vae, sampled)
    assert sampled["samples"].shape == (1, 4, 8, 8) and torch.isfinite(sampled["samples"]).all()
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()


def test_a_model_of_other_conditioning_is_named(pack, image):
    """The SDXL refiner (an SDXL-shaped UNet with other added conditioning) is refused with the
    architectures DAC supports, before anything trains."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from dac_pack.dac_core.errors import DACError

    config = comfy_tiny.unet_config("sdxl")
    refiner = comfy.model_base.SDXLRefiner(comfy.supported_models.SDXLRefiner(dict(config)), device="cpu")
    patcher = comfy.model_patcher.ModelPatcher(refiner, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with torch.inference_mode(), pytest.raises(DACError, match=r"not supported \(its conditioning \(SDXLRefiner\)\): "
                                                                "DAC works on Stable Diffusion 1.x, 2.x and SDXL"):
        pack.AbductUNetLoRA.execute(patcher, comfy_tiny.tiny_clip("sdxl"), comfy_tiny.tiny_vae(), image, "a", 2,
                                    1e-3, 4, 1, "fp32", False, 0)
