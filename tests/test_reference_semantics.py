"""DAC's stages against a plain loop written the way the reference scripts are, with
diffusers' and transformers' own adapter API and none of dac_core's LoRA machinery.

The reference loop here (`reference_chain`) does what xuesong39/DAC's scripts do:
`unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
target_modules=<the reference's 14 UNet targets>))`, `text_encoder.add_adapter(LoraConfig(...,
target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))`, AdamW (betas 0.9/0.999, weight
decay 1e-2, eps 1e-8), no gradient clipping (the reference never clips), the loss
`F.mse_loss(pred.float(), target.float(), reduction="mean")`, models in train mode while
training; in Abduction-2 `unet.set_adapters(["lora"], [gamma(t)])` every step, the annealing
written as the reference writes it, `(1 - eta) / 999**2 * (t - 999)**2 + eta` in Python
floats; at sampling `set_adapters_for_text_encoder(..., [-beta])` (what the reference's
`pipe.set_adapters_for_text_encoder` calls), prompt and negative prompt both encoded through
that encoder, the pipeline's scheduler, CFG with the uncond batch first and
`unet.set_adapters(["lora"], [gamma(t)])` before every UNet call. Each stage runs on a fresh
pipeline, as the reference's three scripts do; U and Delta pass between them as peft weights.

It is fed the random draws `dac_core.stages` makes, reproduced by its own code: one
generator seeded with the stage's seed draws, per step, x0 = mean + std * randn (the
latent, `LatentDistribution.sample`), noise = randn, t = randint(0, 1000, (1,)); the fresh
LoRA comes from a second generator with the same seed, layers in sorted kohya-stem order,
down = randn((rank, in, *kernel)) / rank, up = 0, alpha = rank. (The reference re-encodes
the image each step and draws the latent with the VAE; the latent distribution here is
encoded once, and both sides multiply the same scaled mean and std.)

Compared with `abduct_unet_lora`, `abduct_text_lora` and `counterfactual_sample(...,
decode=False)` on one `DiffusersBackend(exact_reference=True)`: every LoRA on the
activations (what peft computes, op for op) and torch's default AdamW, on the tiny SD1 (epsilon) and SD2
(v-prediction) models: the loss at every step, every layer's down and up weights of U and Delta, and the
final latents. Measured (2 CPU cores, torch 2.14.1, diffusers 0.42.1, peft 0.21.2):
all of them bit for bit equal, for both models, with 1 and with 2 torch threads; so the
tests use no tolerance. The two chains take about 3 s per model; the module about 13 s with
its imports. They run on one torch thread: the ops are tiny, and with two OpenMP threads a
busy second core made the same module take 137 s instead.

The default backend (each LoRA layer through the weights or on the activations, whichever
is cheaper; a fused AdamW) is compared with it to float rounding
(`test_the_default_lora_path_gives_the_references_results_to_float_rounding`).

The annealing schedule is also compared on its own for every t
(`test_annealing_schedule_matches_the_reference_formula`): DiffusersBackend.sample builds
the noise fraction t / 999 in float64, as the reference evaluates gamma(t) in Python
floats, so peft rounds the same product once to float32 and gamma is the reference's to
the bit at every t in training and sampling alike. (With a float32 fraction, 17 of the
1000 timesteps at eta 0.8 came out one float32 ulp off, and final latents at 33 sampling
steps differed by up to 3.8e-6.)

Each comparison was seen to fail when one side was changed: dac_core with max_grad_norm=1
(U, Delta and latents differ), the reference without annealing (Delta and latents), the
reference encoding the negative prompt without Delta (latents, by up to 0.07).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dac_core import stages
from dac_core.backend import LatentDistribution
from dac_core.diffusers_backend import DiffusersBackend
from dac_core.tiny import tiny_pipeline

# The reference's UNet LoRA targets (train_text_to_image_lora.py), written out again here
# rather than imported from dac_core.lora, so a change there cannot pass unnoticed.
REFERENCE_UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]
REFERENCE_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

SOURCE, TARGET, NEGATIVE = "a red disc", "a red disc with a hat", ""
ETA, BETA, CFG = 0.8, 0.75, 4.0  # beta != 1, so the strength -beta is checked, not only the sign
SAMPLING_STEPS, SAMPLING_SEED, SIZE = 4, 29, (64, 64)
U_SETTINGS = stages.TrainSettings(steps=8, learning_rate=1e-3, rank=8, seed=7)
DELTA_SETTINGS = stages.TrainSettings(steps=6, learning_rate=1e-3, rank=4, seed=11)


def reference_gamma(t: int, eta: float) -> float:
    """DAC_SPEC.md / the reference scripts' unet_weights_all[t], in Python floats."""
    return (1.0 - eta) / 999**2 * (t - 999) ** 2 + eta


# --- the reference loop -----------------------------------------------------------------------

def kohya_stem(model: str, module_name: str) -> str:
    """kohya name of a diffusers UNet / CLIP text-encoder module (transformers 5 has no `text_model.`)."""
    if model == "unet":
        return "lora_unet_" + module_name.replace(".", "_")
    return "lora_te_text_model_" + module_name.removeprefix("text_model.").replace(".", "_")


def lora_layers(model: str, module: torch.nn.Module, adapter: str) -> dict:
    """kohya stem -> peft LoRA layer carrying `adapter`."""
    from peft.tuners.lora import LoraLayer

    return {kohya_stem(model, n): m for n, m in module.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def add_reference_adapter(model: str, module: torch.nn.Module, adapter: str, rank: int) -> dict:
    from peft import LoraConfig

    targets = REFERENCE_UNET_TARGETS if model == "unet" else REFERENCE_TEXT_TARGETS
    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets),
                       adapter_name=adapter)
    return lora_layers(model, module, adapter)


def draw_fresh(layers: dict, adapter: str, rank: int, seed: int) -> None:
    """down ~ randn((rank, in, *kernel)) / rank, up = 0, layers in sorted stem order."""
    g = torch.Generator().manual_seed(seed)
    for stem in sorted(layers):
        m = layers[stem]
        _, in_features, *kernel = m.get_base_layer().weight.shape
        down = torch.randn((rank, in_features, *kernel), generator=g) / rank
        assert m.lora_A[adapter].weight.shape == down.shape and m.lora_alpha[adapter] == rank
        m.lora_A[adapter].weight.data.copy_(down)
        m.lora_B[adapter].weight.data.zero_()


def copy_weights(layers: dict, adapter: str, weights: dict) -> None:
    assert set(layers) == set(weights)
    for stem, (down, up) in weights.items():
        layers[stem].lora_A[adapter].weight.data.copy_(down)
        layers[stem].lora_B[adapter].weight.data.copy_(up)


def export(layers: dict, adapter: str) -> dict:
    return {stem: (m.lora_A[adapter].weight.detach().clone(), m.lora_B[adapter].weight.detach().clone())
            for stem, m in layers.items()}


def token_ids(pipe, prompt: str) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def reference_fit(pipe, params, mean, std, prompt, s, eta=None):
    """The reference's training loop, batch 1; U annealed by set_adapters when eta is given."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(params, lr=s.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ids = token_ids(pipe, prompt)
    g = torch.Generator().manual_seed(s.seed)
    losses = []
    for _ in range(s.steps):
        latents = mean + std * torch.randn(mean.shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(eta is not None):  # the text encoder trains in Abduction-2 only
            encoder_hidden_states = pipe.text_encoder(ids)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        if eta is not None:
            pipe.unet.set_adapters(["lora"], [reference_gamma(timesteps.item(), eta)])
        model_pred = pipe.unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        losses.append(loss.item())
        loss.backward()
        optimizer.step()  # no clipping: the reference's clip_grad_norm_ gets an exhausted iterator
        optimizer.zero_grad()
    return losses


def reference_chain(flavour: str, mean: torch.Tensor, std: torch.Tensor) -> dict:
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    # Abduction-1: the UNet LoRA U on the source prompt.
    pipe = tiny_pipeline(flavour)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    u_layers = add_reference_adapter("unet", pipe.unet, "lora", U_SETTINGS.rank)
    draw_fresh(u_layers, "lora", U_SETTINGS.rank, U_SETTINGS.seed)
    pipe.unet.train()
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert len(params) == 2 * len(u_layers)
    u_losses = reference_fit(pipe, params, mean, std, SOURCE, U_SETTINGS)
    u = export(u_layers, "lora")

    # Abduction-2: the text-encoder LoRA Delta on the target prompt, U frozen at gamma(t).
    pipe = tiny_pipeline(flavour)
    u_layers = add_reference_adapter("unet", pipe.unet, "lora", U_SETTINGS.rank)
    copy_weights(u_layers, "lora", u)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    d_layers = add_reference_adapter("text", pipe.text_encoder, "delta", DELTA_SETTINGS.rank)
    draw_fresh(d_layers, "delta", DELTA_SETTINGS.rank, DELTA_SETTINGS.seed)
    pipe.text_encoder.train()
    params = [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    assert len(params) == 2 * len(d_layers)
    d_losses = reference_fit(pipe, params, mean, std, TARGET, DELTA_SETTINGS, eta=ETA)
    delta = export(d_layers, "delta")

    # Prediction: Delta at -beta on prompt and negative prompt, U at gamma(t) at every step.
    pipe = tiny_pipeline(flavour)
    copy_weights(add_reference_adapter("unet", pipe.unet, "lora", U_SETTINGS.rank), "lora", u)
    copy_weights(add_reference_adapter("text", pipe.text_encoder, "delta", DELTA_SETTINGS.rank), "delta", delta)
    set_adapters_for_text_encoder(["delta"], pipe.text_encoder, [-BETA])
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(token_ids(pipe, TARGET))[0]
        negative_prompt_embeds = pipe.text_encoder(token_ids(pipe, NEGATIVE))[0]
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        scheduler = pipe.scheduler
        scheduler.set_timesteps(SAMPLING_STEPS)
        w, h = SIZE
        latents = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator().manual_seed(SAMPLING_SEED))
        for t in scheduler.timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            pipe.unet.set_adapters(["lora"], [reference_gamma(t.item(), ETA)])
            noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds).sample
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + CFG * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
    return {"u": u, "u_losses": u_losses, "delta": delta, "delta_losses": d_losses, "latents": latents}


# --- dac_core's stages ------------------------------------------------------------------------

def dac_chain(flavour: str, mean: torch.Tensor, std: torch.Tensor, exact_reference: bool) -> dict:
    backend = DiffusersBackend(tiny_pipeline(flavour), device="cpu", exact_reference=exact_reference)
    dist = LatentDistribution(mean, std)
    u = stages.abduct_unet_lora(backend, dist, SOURCE, U_SETTINGS)
    delta = stages.abduct_text_lora(backend, dist, TARGET, u.lora, DELTA_SETTINGS, eta=ETA)
    latents = stages.counterfactual_sample(backend, TARGET, u.lora, delta.lora, SIZE, eta=ETA, beta=BETA,
                                           negative_prompt=NEGATIVE, steps=SAMPLING_STEPS, cfg=CFG,
                                           seed=SAMPLING_SEED, decode=False)
    return {"u": {k: (v.down, v.up) for k, v in u.lora.layers.items()}, "u_losses": u.losses,
            "delta": {k: (v.down, v.up) for k, v in delta.lora.layers.items()}, "delta_losses": delta.losses,
            "latents": latents}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def chains(request, source_pixels):
    flavour = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring: tiny ops, and cores others may be using
    try:
        with torch.no_grad():  # the source image's latent distribution, shared by both sides
            vae = tiny_pipeline(flavour).vae
            dist = vae.encode(source_pixels).latent_dist
            mean, std = dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor
        return reference_chain(flavour, mean, std), dac_chain(flavour, mean, std, True)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source_pixels():
    from dac_core.image import image_to_tensor
    from dac_core.tiny import demo_image

    return image_to_tensor(demo_image(SIZE), SIZE)


def assert_same_lora(ref: dict, dac: dict, what: str) -> None:
    assert sorted(ref) == sorted(dac), f"{what}: the two target different layers"
    for stem, (down, up) in ref.items():
        assert torch.equal(down, dac[stem][0]), f"{what} {stem} down differs"
        assert torch.equal(up, dac[stem][1]), f"{what} {stem} up differs"
        assert up.abs().max() > 0, f"{what} {stem} did not train (up is still 0)"


def test_abduction1_unet_lora_is_the_reference_bit_for_bit(chains):
    ref, dac = chains
    assert len(ref["u"]) > 20 and all(stem.startswith("lora_unet_") for stem in ref["u"])
    assert dac["u_losses"] == ref["u_losses"]
    assert_same_lora(ref["u"], dac["u"], "U")


def test_abduction2_text_lora_is_the_reference_bit_for_bit(chains):
    ref, dac = chains
    assert len(ref["delta"]) == 4 * 2 and all(stem.startswith("lora_te_text_model_") for stem in ref["delta"])
    assert dac["delta_losses"] == ref["delta_losses"]
    assert_same_lora(ref["delta"], dac["delta"], "Delta")


def test_counterfactual_sample_is_the_reference_bit_for_bit(chains):
    ref, dac = chains
    assert ref["latents"].shape == dac["latents"].shape == (1, 4, SIZE[1] // 8, SIZE[0] // 8)
    assert torch.isfinite(ref["latents"]).all()
    assert torch.equal(ref["latents"], dac["latents"]), (ref["latents"] - dac["latents"]).abs().max()


def test_annealing_schedule_matches_the_reference_formula():
    """dac_core's gamma against the reference's Python-float table, as peft applies it (float32)."""
    from dac_core.schedule import gamma, gamma_at_fraction

    for eta in (0.8, 0.7, 0.4, 1.0):
        ref = torch.tensor([reference_gamma(t, eta) for t in range(1000)], dtype=torch.float32)
        assert ref[999] == pytest.approx(eta) and ref[0] == 1.0
        # Training: gamma of each sample's integer timestep, to the bit.
        assert torch.equal(gamma(torch.arange(1000), eta), ref)
        # Sampling: DiffusersBackend.sample evaluates gamma at the float64 fraction t / 999.
        sampled = torch.stack([gamma_at_fraction(torch.full((1,), t / 999, dtype=torch.float64), eta)[0]
                               for t in range(1000)])
        off = torch.nonzero(sampled != ref).flatten().tolist()
        assert not off, f"eta {eta}: sampling gamma differs from the reference's at t = {off}"


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def chains_auto(request, source_pixels):
    """dac_core with each LoRA layer on its cheaper path (the default) and on peft's."""
    flavour = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            vae = tiny_pipeline(flavour).vae
            dist = vae.encode(source_pixels).latent_dist
            mean, std = dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor
        return dac_chain(flavour, mean, std, True), dac_chain(flavour, mean, std, False)
    finally:
        torch.set_num_threads(threads)


# In the tiny UNets the time-embedding projection of a 32-channel block adds a per-channel
# constant that the next GroupNorm (32 groups: one channel each) removes again: its true
# gradient is zero, so what trains it is float rounding, which Adam scales to full steps.
# Any change in the order of float operations changes these layers entirely.
NOISE_TRAINED = ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "lora_unet_up_blocks_1_resnets_0_time_emb_proj",
                 "lora_unet_up_blocks_1_resnets_1_time_emb_proj")


def test_the_default_lora_path_gives_the_references_results_to_float_rounding(chains_auto):
    """Through the weights or on the activations the LoRA is the same function; the paths
    differ by float32 rounding, which training carries along (measured over 8 + 6 steps:
    losses within 3e-7 relative, LoRA layers within 1.5e-4 in norm, latents 1.7e-6)."""
    act, auto = chains_auto
    assert auto["u_losses"] != act["u_losses"]  # some layer did take the weight path
    for key in ("u_losses", "delta_losses"):
        torch.testing.assert_close(torch.tensor(auto[key]), torch.tensor(act[key]), rtol=1e-5, atol=0)
    for part in ("u", "delta"):
        assert sorted(auto[part]) == sorted(act[part])
        for stem, (down, up) in act[part].items():
            if stem in NOISE_TRAINED:
                continue
            for got, want in zip(auto[part][stem], (down, up)):
                assert (got - want).norm() <= 1e-3 * want.norm(), stem
    scale = act["latents"].abs().max()
    torch.testing.assert_close(auto["latents"], act["latents"], rtol=0, atol=1e-5 * scale)
