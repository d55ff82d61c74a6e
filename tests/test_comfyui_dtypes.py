"""Training inside ComfyUI computes in the dtype the user chose, as on a GPU (needs COMFYUI_PATH).

On a GPU ComfyUI stores SD checkpoints in fp16 and computes in fp16; on the CPU it hides
that by casting fp16-stored weights to fp32 (comfy.model_management.unet_manual_cast). These
tests emulate the GPU: the models are stored in fp16 (the checkpoint loader's dtype option,
or tests/comfy_tiny.py with dtype=float16) while ComfyUI is told the device computes in fp16
(`should_use_fp16` patched to True), so ComfyUI itself would compute in fp16.

Tolerance of "fp32 training of an fp16-stored model": measured against the same training of
an fp32-stored copy of the same fp16-rounded weights, the losses and LoRAs are equal to the
bit (2 CPU threads or 1, torch 2.14.1). The test allows a thousandth of what rounding the
weights to fp16 changes (fp32-stored original weights against the rounded ones, measured in
the same run: about 6e-6 relative in the losses and 1.5% in the LoRAs after 6 + 4 steps).
Before this was fixed, "fp32" ran the UNet's first convolution in float16.
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
def fp16_device():
    """ComfyUI treats the device as fp16-capable (as a CUDA GPU), for the whole module."""
    import comfy.model_management as mm

    mp = pytest.MonkeyPatch()
    mp.setattr(mm, "should_use_fp16", lambda *args, **kwargs: True)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def pack(fp16_device):
    comfy_tiny.import_pack()
    return importlib.import_module("dac_pack.nodes.dac_nodes")


@pytest.fixture(scope="module")
def image():
    from dac_core.tiny import demo_image

    return torch.from_numpy(np.asarray(demo_image((64, 48)), dtype=np.float32) / 255)[None]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The SD1.5-shaped checkpoint the server tests use (320 channels, full CLIP-L)."""
    return comfy_tiny.save_sd15_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "sd15.safetensors"))


def load(path: str, dtype: torch.dtype):
    """MODEL, CLIP, VAE as CheckpointLoaderSimple would give them, weights stored in `dtype`."""
    import comfy.sd

    options = {"dtype": dtype}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, model_options=options, te_model_options=options)
    return model, clip, vae


def train(pack, parts, image, dtype: str, unet_steps: int = 6, text_steps: int = 4, learning_rate: float = 1e-3):
    model, clip, vae = parts
    with torch.inference_mode():
        u, _, loss_u = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a red disc", unet_steps, learning_rate,
                                                   8, 42, dtype, False, 0).args
        d, loss_d = pack.AbductTextLoRA.execute(model, clip, vae, image, "a red disc with a hat", u, 0.8, text_steps,
                                                learning_rate, 4, 42, dtype).args
    return u, d, np.array(loss_u["loss"]), np.array(loss_d["loss"])


def relative(a, b) -> tuple[float, float]:
    """(largest relative loss difference, relative LoRA-delta difference) of two trainings."""
    losses = max(float(np.max(np.abs(a[i] - b[i]) / np.abs(b[i]))) for i in (2, 3))
    num = den = 0.0
    for lora_a, lora_b in ((a[0], b[0]), (a[1], b[1])):
        for stem, layer in lora_b.layers.items():
            num += float((lora_a.layers[stem].delta() - layer.delta()).norm() ** 2)
            den += float(layer.delta().norm() ** 2)
    return losses, (num / den) ** 0.5


def test_fp32_training_of_an_fp16_stored_checkpoint_computes_in_fp32(pack, checkpoint, image):
    fp16_stored = load(checkpoint, torch.float16)
    assert fp16_stored[0].model.get_dtype() == torch.float16
    assert fp16_stored[0].model.manual_cast_dtype is None  # ComfyUI itself would compute in fp16
    rounded = load(checkpoint, torch.float32)  # fp32 storage of the same fp16-rounded weights
    with torch.no_grad():
        for p in [*rounded[0].model.parameters(), *rounded[1].cond_stage_model.parameters()]:
            p.copy_(p.half().float())
    original = load(checkpoint, torch.float32)

    seen = []
    first_conv = fp16_stored[0].model.diffusion_model.input_blocks[0][0]
    q_proj = fp16_stored[1].cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].dtype))) for m in (first_conv, q_proj)]
    try:
        a = train(pack, fp16_stored, image, "fp32")
    finally:
        for h in hooks:
            h.remove()
    assert {dtype for m, dtype in seen if m is first_conv} == {torch.float32}
    assert {dtype for m, dtype in seen if m is q_proj} == {torch.float32}

    b, c = train(pack, rounded, image, "fp32"), train(pack, original, image, "fp32")
    loss_ab, lora_ab = relative(a, b)
    loss_cb, lora_cb = relative(c, b)  # what rounding the weights to fp16 alone changes
    print(f"fp16-stored vs rounded fp32: losses {loss_ab:.1e}, LoRA {lora_ab:.1e}; "
          f"rounding: losses {loss_cb:.1e}, LoRA {lora_cb:.1e}")
    assert loss_cb > 0 and lora_cb > 0
    assert loss_ab <= 1e-3 * loss_cb and lora_ab <= 1e-3 * lora_cb
    # Training took place through the text encoder too.
    assert all(float(layer.up.abs().sum()) > 0 for layer in a[1].layers.values())


@pytest.fixture(scope="module")
def tiny_fp16(fp16_device):
    model, clip = comfy_tiny.tiny_model("sd1", torch.float16), comfy_tiny.tiny_clip(dtype=torch.float16)
    assert model.model.get_dtype() == torch.float16 and model.model.manual_cast_dtype is None
    return model, clip, comfy_tiny.tiny_vae()


def fitted(u, d, loss_u, loss_d):
    """Abduction-1's loss fell (Abduction-2's moves little on a tiny model: its U barely tells
    the two captions apart) and every LoRA layer of both moved away from its zero init."""
    quarter = len(loss_u) // 4
    assert loss_u[-quarter:].mean() < 0.9 * loss_u[:quarter].mean()
    assert np.isfinite(loss_d).all()
    for lora in (u, d):
        still_zero = [stem for stem, layer in lora.layers.items() if not float(layer.up.abs().sum())]
        assert not still_zero, still_zero
        assert all(layer.up.dtype == torch.float32 == layer.down.dtype for layer in lora.layers.values())


@pytest.mark.parametrize("dtype, compute", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_training_lowers_the_loss_and_every_layer_learns(pack, tiny_fp16, image, dtype, compute):
    """fp16 (with loss scaling) and bf16 compute in that dtype; the LoRAs stay float32."""
    seen = []
    first_conv = tiny_fp16[0].model.diffusion_model.input_blocks[0][0]
    hook = first_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        u, d, loss_u, loss_d = train(pack, tiny_fp16, image, dtype, unet_steps=40, text_steps=20, learning_rate=2e-3)
    finally:
        hook.remove()
    assert set(seen) == {compute}
    fitted(u, d, loss_u, loss_d)
    assert u.metadata["dac.training_dtype"] == d.metadata["dac.training_dtype"] == str(compute).split(".")[1]


def test_fp16_steps_with_overflowing_gradients_are_skipped_and_counted(pack, tiny_fp16, image, monkeypatch):
    """A loss scale far too large overflows the fp16 backward: those steps change nothing, the
    scaler backs off, training goes on, and the count reaches the metadata and the loss map."""
    from conftest import HugeLossScale

    monkeypatch.setattr(torch.amp, "GradScaler", HugeLossScale)
    model, clip, vae = tiny_fp16
    with torch.inference_mode():
        u, _, loss = pack.AbductUNetLoRA.execute(model, clip, vae, image, "a red disc", 40, 2e-3, 8, 42, "fp16",
                                                 False, 0).args
    skipped = loss["skipped_steps"]
    assert 0 < skipped < 40
    assert u.metadata["dac.skipped_steps"] == str(skipped)
    assert len(loss["loss"]) == 40 and all(np.isfinite(loss["loss"]))
    assert all(float(layer.up.abs().sum()) > 0 for layer in u.layers.values())


def ksample(model, clip):
    import nodes as comfy_nodes

    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red disc with a hat"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = {"samples": torch.zeros(1, 4, 6, 8)}
        return comfy_nodes.common_ksampler(model, 3, 4, 4.0, "euler", "normal", pos, neg, latent)[0]["samples"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_inputs_stay_bitwise_unchanged_and_ksampler_gives_the_same_image(pack, tiny_fp16, image, dtype):
    model, clip, vae = tiny_fp16
    before = ksample(model, clip)
    weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    clip_weights = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    train(pack, tiny_fp16, image, dtype, unet_steps=3, text_steps=3)
    for k, v in model.model.state_dict().items():
        assert v.dtype == weights[k].dtype and torch.equal(v, weights[k]), k
    for k, v in clip.cond_stage_model.state_dict().items():
        assert v.dtype == clip_weights[k].dtype and torch.equal(v, clip_weights[k]), k
    assert model.model.manual_cast_dtype is None and not model.object_patches and not model.weight_wrapper_patches
    assert torch.equal(ksample(model, clip), before)


def test_an_unknown_training_dtype_is_a_clear_error(pack, tiny_fp16, image):
    from dac_pack.dac_core.errors import DACError

    model, clip, vae = tiny_fp16
    with torch.inference_mode(), pytest.raises(DACError, match="training_dtype 'fp8' is not one of fp32, bf16, fp16"):
        pack.AbductUNetLoRA.execute(model, clip, vae, image, "a", 2, 1e-3, 4, 1, "fp8", False, 0)

