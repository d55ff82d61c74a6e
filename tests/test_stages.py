"""The three DAC stages on tiny SD1.x (epsilon), SD2.x (v-prediction) and SDXL models."""

import pytest
import torch

from dac_core import stages
from dac_core.backend import TEXT_DELTA, TEXT_EXTRA, UNET
from dac_core.errors import DACError, NonFiniteLossError, StopTraining
from dac_core.schedule import gamma_at_fraction
from dac_core.stages import TrainSettings
from dac_core.tiny import tiny_pipeline

FAST_UNET = TrainSettings(steps=120, learning_rate=2e-3, rank=8)
FAST_TEXT = TrainSettings(steps=60, learning_rate=2e-3, rank=4)


def base_weights(module: torch.nn.Module) -> dict:
    """The module's own weights, LoRA layers excluded, under their pre-LoRA names."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in module.state_dict().items()
        if "lora_" not in k
    }


def fixed_loss(backend, lat, cond, n=16):
    """The reconstruction loss on a fixed set of timesteps and noises (comparable across runs)."""
    g = torch.Generator().manual_seed(1234)
    x0 = lat.mean.repeat(n, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(0, 999, n).long()
    with torch.no_grad():
        return backend.loss(x0, noise, t, cond[[0] * n]).mean().item()


@pytest.mark.parametrize("flavour", ["sd1", "sd2", "sdxl"])
def test_abduction1_lowers_loss_and_leaves_base_weights_bitwise(make_backend, latents, flavour):
    be = make_backend(flavour)
    before = {name: base_weights(m) for name, m in (("unet", be.unet), ("te", be.text_encoders), ("vae", be.vae))}
    lat = be.encode_image(latents)
    with torch.no_grad():
        cond = be.encode_prompts(["a red disc"])
    loss_before = fixed_loss(be, lat, cond)
    result = stages.abduct_unet_lora(be, lat, "a red disc", FAST_UNET)
    be.set_lora_scale(UNET, 1.0)
    loss_after = fixed_loss(be, lat, cond)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert len(result.losses) == FAST_UNET.steps
    assert result.lora.metadata["dac.stage"] == "unet" and result.lora.rank == 8
    assert all(k.startswith("lora_unet_") for k in result.lora.layers)
    for name, m in (("unet", be.unet), ("te", be.text_encoders), ("vae", be.vae)):
        after = base_weights(m)
        assert after.keys() == before[name].keys()
        for k, v in before[name].items():
            assert torch.equal(v, after[k]), f"{name} weight {k} changed"


def test_unet_lora_targets_are_the_reference_modules(make_backend, latents):
    be = make_backend("sd1")
    lora = stages.abduct_unet_lora(be, be.encode_image(latents), "x", TrainSettings(steps=1, rank=4)).lora
    kinds = {"to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2", "conv1",
             "conv2", "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "time_emb_proj"}
    found = {k for k in kinds for stem in lora.layers if stem.endswith(k)}
    assert found == kinds
    assert not any(stem.endswith(("conv_in", "conv_out", "linear_1", "linear_2")) for stem in lora.layers)


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_abduction2_trains_only_the_text_lora(make_backend, latents, flavour):
    be = make_backend(flavour)
    lat = be.encode_image(latents)
    unet_lora = stages.abduct_unet_lora(be, lat, "a red disc", TrainSettings(steps=20, learning_rate=2e-3, rank=8)).lora
    te_before = base_weights(be.text_encoders)
    unet_before = base_weights(be.unet)
    seen_grad = []
    original_loss = be.loss

    def spying_loss(*args):
        out = original_loss(*args)
        unet_params = [p for n, p in be.unet.named_parameters() if f"lora_A.{UNET}" in n or f"lora_B.{UNET}" in n]
        seen_grad.append(any(p.requires_grad for p in unet_params))
        return out

    be.loss = spying_loss
    result = stages.abduct_text_lora(be, lat, "a red disc with a hat", unet_lora, FAST_TEXT, eta=0.8)
    assert seen_grad and not any(seen_grad), "the frozen UNet LoRA was trainable during Abduction-2"
    if flavour == "sdxl":  # CLIP-L read at its penultimate layer: 2 of 3 layers; bigG: 3 of 3
        layers = {"lora_te1_text_model_encoder_layers_0": 4, "lora_te1_text_model_encoder_layers_1": 4,
                  "lora_te2_text_model_encoder_layers_0": 4,
                  "lora_te2_text_model_encoder_layers_1": 4, "lora_te2_text_model_encoder_layers_2": 4}
    else:  # 2 layers x q, k, v, out
        layers = {"lora_te_text_model_encoder_layers_0": 4, "lora_te_text_model_encoder_layers_1": 4}
    assert {k: sum(stem.startswith(k + "_") for stem in result.lora.layers) for k in layers} == layers
    assert result.lora.rank == 4 and len(result.lora) == sum(layers.values())
    for prefix in {k.split("text_model")[0] for k in layers}:  # every encoder's part moved from zero
        assert any(layer.up.abs().sum() > 0 for stem, layer in result.lora.layers.items() if stem.startswith(prefix))
    after = be.export_lora(UNET)
    for stem, layer in unet_lora.layers.items():
        assert torch.equal(after.layers[stem].down, layer.down) and torch.equal(after.layers[stem].up, layer.up)
    for name, p in be.unet.named_parameters():
        assert p.grad is None, f"UNet parameter {name} received a gradient"
    for k, v in te_before.items():
        assert torch.equal(v, base_weights(be.text_encoders)[k]), k
    for k, v in unet_before.items():
        assert torch.equal(v, base_weights(be.unet)[k]), k


def test_abduction2_uses_gamma_of_each_samples_timestep(make_backend, latents):
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    unet_lora = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=2, rank=4)).lora
    scales, timesteps = [], []
    original_scale, original_loss = be.set_lora_scale, be.loss
    be.set_lora_scale = lambda name, s: (scales.append(s) if name == UNET else None, original_scale(name, s))[1]
    be.loss = lambda x0, noise, t, cond: (timesteps.append(t.clone()), original_loss(x0, noise, t, cond))[1]
    stages.abduct_text_lora(be, lat, "a b", unet_lora, TrainSettings(steps=3, rank=4, batch_size=3), eta=0.5)
    per_sample = [s for s in scales if isinstance(s, torch.Tensor)]
    assert len(per_sample) == len(timesteps) == 3
    assert any(len(set(t.tolist())) == 3 for t in timesteps)  # the samples of a step differ in t
    for s, t in zip(per_sample, timesteps):
        # each sample's strength is gamma of its own timestep (the spec's formula, eta 0.5)
        expected = torch.tensor([0.5 / 999**2 * (int(x) - 999) ** 2 + 0.5 for x in t], dtype=torch.float32)
        assert torch.allclose(s, expected, rtol=0, atol=1e-7), (s, t)


def test_extra_text_lora_stays_frozen_while_delta_trains(make_backend, latents):
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    unet_lora = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=5, learning_rate=2e-3, rank=4)).lora
    text_settings = TrainSettings(steps=10, learning_rate=2e-3)
    extra = stages.abduct_text_lora(be, lat, "a", unet_lora, text_settings, name=TEXT_EXTRA).lora
    assert extra.metadata["dac.stage"] == "extra_text"
    stages.abduct_text_lora(be, lat, "a b", unet_lora, text_settings, extra_text_lora=extra)
    after = be.export_lora(TEXT_EXTRA)
    for stem, layer in extra.layers.items():
        assert torch.equal(after.layers[stem].up, layer.up) and torch.equal(after.layers[stem].down, layer.down)


def test_per_sample_unet_strength_matches_one_sample_at_a_time(make_backend, latents):
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=10, learning_rate=5e-3, rank=4))
    g = torch.Generator().manual_seed(0)
    x0 = lat.mean.repeat(2, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([100, 900])
    cond = be.encode_prompts(["a", "a"]).detach()
    scale = torch.tensor([1.0, 0.4])
    with torch.no_grad():
        be.set_lora_scale(UNET, scale)
        both = be.loss(x0, noise, t, cond)
        single = []
        for i in range(2):
            be.set_lora_scale(UNET, float(scale[i]))
            single.append(be.loss(x0[i : i + 1], noise[i : i + 1], t[i : i + 1], cond[i : i + 1]))
    assert torch.allclose(both, torch.cat(single), atol=1e-6)
    with torch.no_grad():
        be.set_lora_scale(UNET, 0.4)
        other = be.loss(x0[:1], noise[:1], t[:1], cond[:1])
    assert not torch.allclose(other, single[0])  # the strength does matter


def _reference_encoding(pipe, prompt: str):
    """(hidden states, pooled embedding or None) as the diffusers pipeline itself encodes
    `prompt` (SDXL: StableDiffusionXLPipeline.encode_prompt, no classifier-free guidance)."""
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            return context, pooled
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0], None


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_text_lora_at_minus_beta_equals_base_minus_beta_delta(make_backend, latents, flavour):
    be = make_backend(flavour)
    lat = be.encode_image(latents)
    unet_lora = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=2, rank=4)).lora
    delta = stages.abduct_text_lora(be, lat, "a cat", unet_lora, TrainSettings(steps=20, learning_rate=2e-2)).lora
    beta = 0.7
    be.set_lora_scale(TEXT_DELTA, -beta)
    with torch.no_grad():
        ours = be.encode_prompts(["a cat with a hat"])
    reference = tiny_pipeline(flavour)  # same seed: same base weights
    encoders = {"lora_te_": reference.text_encoder, "lora_te1_": reference.text_encoder,
                "lora_te2_": getattr(reference, "text_encoder_2", None)}
    with torch.no_grad():
        for stem, layer in delta.layers.items():
            prefix, name = stem.split("text_model_", 1)
            target = next(m for n, m in encoders[prefix].named_modules() if n.replace(".", "_").endswith(name))
            target.weight -= beta * layer.delta()
    context, pooled = _reference_encoding(reference, "a cat with a hat")
    plain, _ = _reference_encoding(tiny_pipeline(flavour), "a cat with a hat")
    assert torch.allclose(ours.context, context, atol=1e-5)
    if flavour == "sdxl":
        assert ours.pooled.shape == pooled.shape and torch.allclose(ours.pooled, pooled, atol=1e-5)
    else:
        assert ours.pooled is None
    assert not torch.allclose(ours.context, plain, atol=1e-4)  # the subtraction did change the encoding


def test_sampling_anneals_the_unet_lora_at_every_step(make_backend, latents):
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    unet_lora = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=2, rank=4)).lora
    delta = stages.abduct_text_lora(be, lat, "a b", unet_lora, TrainSettings(steps=2)).lora
    seen = []
    original = be.set_lora_scale
    be.set_lora_scale = lambda name, s: (seen.append((name, s)), original(name, s))[1]
    images = stages.counterfactual_sample(be, "a b", unet_lora, delta, (64, 48), eta=0.6, beta=1.0, steps=5,
                                          batch_size=2)
    assert images.shape == (2, 3, 48, 64)
    assert (TEXT_DELTA, -1.0) in seen
    per_step = [s for n, s in seen if n == UNET and isinstance(s, torch.Tensor)]
    assert len(per_step) == 5
    expected = [gamma_at_fraction(torch.full((4,), float(t) / 999), 0.6) for t in be.scheduler.timesteps]
    for got, want in zip(per_step, expected):
        assert torch.allclose(got, want)


@pytest.mark.parametrize("flavour", ["sd1", "sd2", "sdxl"])
def test_same_seed_same_result_bit_for_bit(make_backend, latents, flavour):
    outs = []
    for _ in range(2):
        be = make_backend(flavour)
        lat = be.encode_image(latents)
        u = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=8, learning_rate=1e-3, rank=4)).lora
        d = stages.abduct_text_lora(be, lat, "a b", u, TrainSettings(steps=8, learning_rate=1e-3)).lora
        img = stages.counterfactual_sample(be, "a b", u, d, (64, 64), steps=4, seed=3)
        outs.append((u, d, img))
    (u1, d1, i1), (u2, d2, i2) = outs
    for a, b in ((u1, u2), (d1, d2)):
        for stem in a.layers:
            assert torch.equal(a.layers[stem].down, b.layers[stem].down)
            assert torch.equal(a.layers[stem].up, b.layers[stem].up)
    assert torch.equal(i1, i2)


def test_v_prediction_loss_targets_the_velocity(make_backend, latents):
    be = make_backend("sd2")
    assert be.prediction_type == "v_prediction"
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    cond = be.encode_prompts(["a", "a"]).detach()
    with torch.no_grad():
        got = be.loss(x0, noise, t, cond)
        pred = be.unet(be.train_scheduler.add_noise(x0, noise, t), t, cond.context).sample
        v = be.train_scheduler.get_velocity(x0, noise, t)
    assert torch.allclose(got, ((pred - v) ** 2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(got, ((pred - noise) ** 2).mean(dim=(1, 2, 3)))


def test_non_finite_loss_stops_the_stage(make_backend, latents):
    be = make_backend("sd1")
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at step \d+ of 30.*lower learning rate"):
        stages.abduct_unet_lora(be, be.encode_image(latents), "a", TrainSettings(steps=30, learning_rate=1.0, rank=4))


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_stop_training_saves_state_to_resume_exactly(make_backend, latents, flavour):
    settings = TrainSettings(steps=12, learning_rate=1e-3, rank=4)
    be = make_backend(flavour)
    full = stages.abduct_unet_lora(be, be.encode_image(latents), "a", settings)
    saved = []

    def cancel_at_5(step, total, loss):
        if step == 5:
            raise StopTraining

    be = make_backend(flavour)
    lat = be.encode_image(latents)
    with pytest.raises(StopTraining):
        stages.abduct_unet_lora(be, lat, "a", settings, progress=cancel_at_5, save_state=saved.append)
    assert saved[-1].step == 5 and len(saved[-1].losses) == 5
    be = make_backend(flavour)
    resumed = stages.abduct_unet_lora(be, be.encode_image(latents), "a", settings, resume=saved[-1])
    assert resumed.losses == full.losses
    for stem, layer in full.lora.layers.items():
        assert torch.equal(resumed.lora.layers[stem].up, layer.up)


def test_counterfactual_settings_are_checked_once_not_per_sampler_step(make_backend, latents, monkeypatch):
    from dac_core import params

    be = make_backend("sd1")
    lat = be.encode_image(latents)
    u = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=2, rank=4)).lora
    d = stages.abduct_text_lora(be, lat, "a b", u, TrainSettings(steps=2, rank=4)).lora
    calls = []
    real = params.Param.check
    monkeypatch.setattr(params.Param, "check", lambda self, value, label=None: calls.append(self.name) or
                        real(self, value, label))
    stages.counterfactual_sample(be, "a b", u, d, (64, 64), eta=0.6, steps=5, decode=False)
    assert sorted(calls) == sorted(["eta", "beta", "sample_steps", "cfg", "seed", "batch_size"])
    for eta, beta, message in ((1.5, 1.0, r"eta must be a number in \(0, 1\], got 1.5"),
                               (0.8, float("inf"), r"beta must be a number in \[-3, 5\], got inf")):
        with pytest.raises(DACError, match=message):
            stages.counterfactual_sample(be, "a b", u, d, (64, 64), eta=eta, beta=beta, steps=2)


def test_gradients_are_not_clipped_unless_asked(make_backend, latents):
    """The reference never clips (its clip_grad_norm_ gets an exhausted iterator): neither does
    the default; a norm limit, when given, changes the training."""
    runs = {}
    for label, norm in (("default", None), ("zero", 0.0), ("clipped", 1e-3)):
        be = make_backend("sd1")
        runs[label] = stages.abduct_unet_lora(be, be.encode_image(latents), "a", TrainSettings(
            steps=6, learning_rate=1e-3, rank=4, max_grad_norm=norm))
    assert runs["default"].losses == runs["zero"].losses
    assert runs["default"].lora.metadata["dac.max_grad_norm"] == "0"
    assert runs["clipped"].lora.metadata["dac.max_grad_norm"] == "0.001"
    stem = sorted(runs["default"].lora.layers)[0]
    assert torch.equal(runs["default"].lora.layers[stem].up, runs["zero"].lora.layers[stem].up)
    assert not torch.equal(runs["default"].lora.layers[stem].up, runs["clipped"].lora.layers[stem].up)


def test_float16_training_skips_overflowing_steps_and_resumes_exactly(latents, monkeypatch):
    """float16 compute: float32 LoRA weights, loss scaling; steps with inf/nan gradients are
    skipped and counted; an interrupted run resumes with the scaler's state, to the bit."""
    from conftest import HugeLossScale

    from dac_core.diffusers_backend import DiffusersBackend

    monkeypatch.setattr(torch.amp, "GradScaler", HugeLossScale)
    settings = TrainSettings(steps=30, learning_rate=2e-3, rank=4)

    def backend():
        return DiffusersBackend(tiny_pipeline("sd1"), device="cpu", dtype="float16")

    be = backend()
    full = stages.abduct_unet_lora(be, be.encode_image(latents), "a red disc", settings)
    assert 0 < full.skipped_steps < 30
    assert full.lora.metadata["dac.skipped_steps"] == str(full.skipped_steps)
    assert full.lora.metadata["dac.training_dtype"] == "float16"
    assert all(layer.up.dtype == torch.float32 and float(layer.up.abs().sum()) > 0
               for layer in full.lora.layers.values())

    saved = []

    def cancel_at_20(step, total, loss):
        if step == 20:
            raise StopTraining

    be = backend()
    with pytest.raises(StopTraining):
        stages.abduct_unet_lora(be, be.encode_image(latents), "a red disc", settings, progress=cancel_at_20,
                                save_state=saved.append)
    be = backend()
    resumed = stages.abduct_unet_lora(be, be.encode_image(latents), "a red disc", settings, resume=saved[-1])
    assert resumed.losses == full.losses and resumed.skipped_steps == full.skipped_steps
    for stem, layer in full.lora.layers.items():
        assert torch.equal(resumed.lora.layers[stem].up, layer.up)


@pytest.mark.parametrize(
    "settings, message",
    [
        (TrainSettings(steps=0), r"UNet LoRA steps must be an integer in \[1, 100000\], got 0"),
        (TrainSettings(rank=-2), r"UNet LoRA rank must be an integer in \[1, 1024\], got -2"),
        (TrainSettings(rank=2000), r"UNet LoRA rank must be an integer in \[1, 1024\], got 2000"),
        (TrainSettings(learning_rate=0.0), r"UNet LoRA learning_rate must be a number in \(0, 1\], got 0.0"),
        (TrainSettings(max_grad_norm=-1.0), r"UNet LoRA max_grad_norm must be a number in \[0, 1000\], got -1.0"),
    ],
)
def test_bad_settings_are_named(make_backend, latents, settings, message):
    be = make_backend("sd1")
    with pytest.raises(DACError, match=message):
        stages.abduct_unet_lora(be, be.encode_image(latents), "a", settings)


def test_empty_prompt_and_long_prompt(make_backend, latents, caplog):
    be = make_backend("sd1")
    lat = be.encode_image(latents)
    with pytest.raises(DACError, match="source prompt is empty"):
        stages.abduct_unet_lora(be, lat, "   ", TrainSettings(steps=1, rank=4))
    long = "a red disc " + "and a very long tail " * 10
    with caplog.at_level("WARNING", logger="dac_core"):
        stages.abduct_unet_lora(be, lat, long, TrainSettings(steps=1, rank=4))
    (record,) = [r for r in caplog.records if "77-token limit" in r.getMessage()]
    assert record.args[0] == "source prompt"
    cut = record.args[1].replace(" ", "")
    assert cut and long.replace(" ", "").endswith(cut)


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_gradient_checkpointing_trains_the_same(latents, flavour):
    """The UNet's blocks recomputed in the backward pass: the same losses and LoRAs, both stages."""
    from dac_core.diffusers_backend import DiffusersBackend

    results = []
    for checkpointing in (False, True):
        be = DiffusersBackend(tiny_pipeline(flavour), gradient_checkpointing=checkpointing)
        lat = be.encode_image(latents)
        u = stages.abduct_unet_lora(be, lat, "a", TrainSettings(steps=4, learning_rate=1e-3, rank=4))
        d = stages.abduct_text_lora(be, lat, "a b", u.lora, TrainSettings(steps=4, learning_rate=1e-3))
        results.append((u, d))
    assert any(getattr(m, "gradient_checkpointing", False) for m in be.unet.modules())
    for plain, checkpointed in zip(*results):
        assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
        for stem, layer in plain.lora.layers.items():
            assert torch.allclose(checkpointed.lora.layers[stem].up, layer.up, atol=1e-6), stem
