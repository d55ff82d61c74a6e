"""The LoRA file format: kohya naming out, kohya and diffusers/peft naming in."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from dac_core import lora as L
from dac_core import stages
from dac_core.backend import TEXT_DELTA, UNET
from dac_core.errors import DACError
from dac_core.stages import TrainSettings
from dac_core.tiny import tiny_pipeline


@pytest.fixture
def trained(make_backend, latents):
    """A backend with a trained UNet LoRA and text-encoder LoRA (both active at +1)."""
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    u = stages.abduct_unet_lora(be, lat, "a red disc", TrainSettings(steps=15, learning_rate=1e-2, rank=4)).lora
    d = stages.abduct_text_lora(be, lat, "a red disc with a hat", u, TrainSettings(steps=15, learning_rate=1e-2),
                                eta=0.8).lora
    be.set_lora_scale(UNET, 1.0)
    be.set_lora_scale(TEXT_DELTA, 1.0)
    return be, u, d


def outputs(unet, text_encoder, tokenizer):
    """UNet noise prediction and text embedding on fixed inputs."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
        return unet(x, torch.tensor([500]), emb).sample, emb


def test_saved_file_uses_kohya_names_and_records_metadata(trained, tmp_path):
    be, u, d = trained
    path = L.save_lora(L.combine(u, d), tmp_path / "edit.safetensors")
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["dac.stage"] == "unet+text" and meta["dac.version"]
    assert meta["dac.base_model_fingerprint"] == be.fingerprint()
    assert meta["dac.prompt"] == u.metadata["dac.prompt"] and meta["dac.text.stage"] == "text"
    assert meta["dac.text.eta"] == "0.8" and meta["dac.text.prompt"] == "a red disc with a hat"
    assert meta["ss_network_dim"] == "4"
    # Reading it back gives each LoRA its own metadata again.
    unet, text = L.split(L.load_lora(path))
    assert (len(unet), len(text)) == (len(u), len(d))
    for part, original in ((unet, u), (text, d)):
        for key, value in original.metadata.items():
            expected = value if isinstance(value, str) else json.dumps(value)
            assert part.metadata[key] == expected, key
    assert "dac.eta" not in unet.metadata and text.metadata["dac.stage"] == "text"


def test_round_trip_gives_identical_outputs(trained, tmp_path, make_backend):
    be, u, d = trained
    expected = outputs(be.unet, be.text_encoder, be.tokenizer)
    path = L.save_lora(L.combine(u, d), tmp_path / "both.safetensors")
    loaded = L.load_lora(path)
    fresh = make_backend("sd1")
    fresh.attach_lora(UNET, loaded)
    fresh.attach_lora(TEXT_DELTA, loaded)
    got = outputs(fresh.unet, fresh.text_encoder, fresh.tokenizer)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_diffusers_load_lora_weights_reads_our_file(trained, tmp_path):
    be, u, d = trained
    expected = outputs(be.unet, be.text_encoder, be.tokenizer)
    L.save_lora(L.combine(u, d), tmp_path / "dac.safetensors")
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(str(tmp_path), weight_name="dac.safetensors")
    n_unet = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
    n_text = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith("lora_A"))
    assert (n_unet, n_text) == (len(u), len(d))
    got = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert torch.allclose(got[1], expected[1], atol=1e-5)
    assert torch.allclose(got[0], expected[0], atol=1e-5)


def test_reference_peft_format_file_loads(trained, tmp_path, make_backend):
    """The reference code saves `pytorch_lora_weights.safetensors` via diffusers + peft: a
    pipeline holding U and Delta as peft adapters, as the reference's does, writes one; our
    backend reads it and, on the activation path (peft's, op for op), gives the same bits."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from test_reference_semantics import add_reference_adapter, copy_weights

    _, u, d = trained
    pipe = tiny_pipeline("sd1")
    for model, module, adapter, lora in (("unet", pipe.unet, "unet", u), ("text", pipe.text_encoder, "text", d)):
        layers = add_reference_adapter(model, module, adapter, lora.layers[next(iter(lora.layers))].rank)
        copy_weights(layers, adapter, {stem: (layer.down, layer.up) for stem, layer in lora.layers.items()})
    expected = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="unet"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="text"),
        safe_serialization=True,
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(path, framework="pt") as f:
        assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in f.keys())
    loaded = L.load_lora(path)
    assert len(loaded.unet) == len(u) and len(loaded.text_encoder) == len(d)
    fresh = make_backend("sd1", exact_reference=True)
    fresh.attach_lora(UNET, loaded)
    fresh.attach_lora(TEXT_DELTA, loaded)
    got = outputs(fresh.unet, fresh.text_encoder, fresh.tokenizer)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_transformers4_and_5_text_encoder_names_meet():
    assert L.text_encoder_stem("encoder.layers.3.self_attn.q_proj") == \
        L.text_encoder_stem("text_model.encoder.layers.3.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    sd = {"text_encoder.encoder.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(2, 8),
          "text_encoder.encoder.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(8, 2)}
    assert list(L.from_state_dict(sd).layers) == ["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]


def test_shape_mismatch_names_file_and_first_layer(trained, tmp_path, make_backend):
    be, u, d = trained
    stem = sorted(u.layers)[0]
    bad = L.LoRA(dict(u.layers))
    bad.layers[stem] = L.LoRALayer(torch.zeros(4, 7), torch.zeros(5, 4), 4.0)
    path = L.save_lora(bad, tmp_path / "other_model.safetensors")
    with pytest.raises(DACError, match=rf"LoRA file '.*other_model.safetensors' does not fit this model: layer {stem}"):
        make_backend("sd1").attach_lora(UNET, L.load_lora(path))
    extra = L.LoRA({"lora_unet_no_such_block_conv": L.LoRALayer(torch.zeros(4, 3), torch.zeros(3, 4), 4.0)})
    path = L.save_lora(extra, tmp_path / "foreign.safetensors")
    with pytest.raises(DACError, match="foreign.safetensors' does not fit this model: it has layer lora_unet_no_such"):
        make_backend("sd1").attach_lora(UNET, L.load_lora(path))


def test_text_lora_given_as_unet_lora(trained, tmp_path, make_backend):
    _, _, d = trained
    path = L.save_lora(d, tmp_path / "text.safetensors")
    with pytest.raises(DACError, match="text.safetensors' is not a UNet LoRA: it holds text-encoder layers only"):
        make_backend("sd1").attach_lora(UNET, L.load_lora(path))


@pytest.mark.parametrize("content", [b"", b"garbage that is not safetensors", b"\xff" * 8 + b"{}"])
def test_corrupt_file_is_named(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(DACError, match=r"LoRA file '.*broken.safetensors' is not a readable safetensors file"):
        L.load_lora(path)


def test_truncated_file_is_named(trained, tmp_path):
    _, u, _ = trained
    path = L.save_lora(u, tmp_path / "cut.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DACError, match="is not a readable safetensors file"):
        L.load_lora(path)


def test_failed_save_keeps_the_old_file(trained, tmp_path, monkeypatch):
    _, u, d = trained
    path = L.save_lora(u, tmp_path / "keep.safetensors")
    before = open(path, "rb").read()

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        L.save_lora(d, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


# --- SDXL -------------------------------------------------------------------------------

@pytest.fixture
def trained_sdxl(make_backend, latents):
    """An SDXL backend with trained U and Delta (both active at +1)."""
    be = make_backend("sdxl")
    lat = be.encode_image(latents)
    u = stages.abduct_unet_lora(be, lat, "a red disc", TrainSettings(steps=10, learning_rate=1e-2, rank=4)).lora
    d = stages.abduct_text_lora(be, lat, "a red disc with a hat", u, TrainSettings(steps=10, learning_rate=1e-2)).lora
    be.set_lora_scale(UNET, 1.0)
    be.set_lora_scale(TEXT_DELTA, 1.0)
    return be, u, d


def sdxl_outputs(pipe):
    """The UNet's prediction and the encodings of a fixed prompt, computed by diffusers'
    StableDiffusionXLPipeline itself (encode_prompt, its size ids, the UNet's added
    conditioning), for a 64 x 64 image whose original size was 96 x 64."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
        ids = pipe._get_add_time_ids((64, 96), (0, 0), (64, 64), dtype=torch.float32,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        out = pipe.unet(x, torch.tensor([500]), context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    return out, context, pooled


def test_sdxl_file_uses_kohya_sdxl_names_and_diffusers_reads_it(trained_sdxl, tmp_path):
    """lora_unet_ / lora_te1_ / lora_te2_ keys; StableDiffusionXLPipeline.load_lora_weights
    applies every layer and computes what our backend computes."""
    be, u, d = trained_sdxl
    path = L.save_lora(L.combine(u, d), tmp_path / "dac_sdxl.safetensors")
    with safe_open(path, framework="pt") as f:
        prefixes = {k.split("text_model")[0] if k.startswith("lora_te") else "lora_unet_" for k in f.keys()}
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
    be.original_size = (96, 64)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = be.encode_prompts(["a cat"])
        ours = be._unet(x, torch.tensor([500]), cond)
    pipe = tiny_pipeline("sdxl")
    pipe.load_lora_weights(str(tmp_path), weight_name="dac_sdxl.safetensors")
    counts = [sum(1 for n, _ in m.named_modules() if n.endswith("lora_A"))
              for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)]
    assert counts == [len(u), len(d.part(L.TEXT1_PREFIX)), len(d.part(L.TEXT2_PREFIX))]
    out, context, pooled = sdxl_outputs(pipe)
    assert torch.allclose(context, cond.context, atol=1e-5) and torch.allclose(pooled, cond.pooled, atol=1e-5)
    assert torch.allclose(out, ours, atol=1e-5)
    plain_out, plain_context, _ = sdxl_outputs(tiny_pipeline("sdxl"))
    assert not torch.allclose(plain_context, context, atol=1e-4) and not torch.allclose(plain_out, out, atol=1e-4)


def test_sdxl_round_trip_gives_identical_outputs(trained_sdxl, tmp_path, make_backend):
    be, u, d = trained_sdxl
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(backend):
        with torch.no_grad():
            cond = backend.encode_prompts(["a cat"])
            return backend._unet(x, torch.tensor([500]), cond), cond.context, cond.pooled

    expected = run(be)
    loaded = L.load_lora(L.save_lora(L.combine(u, d), tmp_path / "both.safetensors"))
    fresh = make_backend("sdxl")
    fresh.attach_lora(UNET, loaded)
    fresh.attach_lora(TEXT_DELTA, loaded)
    for got, want in zip(run(fresh), expected):
        assert torch.equal(got, want)


def test_sdxl_and_sd_loras_do_not_mix(trained_sdxl, trained, tmp_path, make_backend):
    _, u_xl, d_xl = trained_sdxl
    _, u, d = trained
    for lora, flavour, name in ((d, "sdxl", TEXT_DELTA), (u, "sdxl", UNET), (d_xl, "sd1", TEXT_DELTA),
                                (u_xl, "sd1", UNET)):
        path = L.save_lora(lora, tmp_path / "other.safetensors")
        with pytest.raises(DACError, match="does not fit this model: .*trained on: SD 1.x, SD 2.x or SDXL"):
            make_backend(flavour).attach_lora(name, L.load_lora(path))


def test_diffusers_sdxl_names_read_as_two_encoders():
    """text_encoder. / text_encoder_2. keys (diffusers' SDXL files) become lora_te1_ / lora_te2_;
    lora_te1_ alone (an SD 1.x file from an SDXL-era tool) stays SD 1.x's lora_te_."""
    zeros = {"lora_A.weight": torch.zeros(2, 8), "lora_B.weight": torch.zeros(8, 2)}
    sd = {f"{enc}.text_model.encoder.layers.0.self_attn.q_proj.{k}": v
          for enc in ("text_encoder", "text_encoder_2") for k, v in zeros.items()}
    assert sorted(L.from_state_dict(sd).layers) == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                                   "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    kohya = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 8),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, 2)}
    assert list(L.from_state_dict(kohya).layers) == ["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
