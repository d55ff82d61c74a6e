"""The world model's pieces that do not need a trained model, and the demo's constants."""

import random

import numpy as np

from dac_core import demo
from dac_core import world as W
from dac_core.world import model as M
from dac_core.world import train as T
from dac_core.world.checker import _dilate


def test_every_world_word_is_one_token_and_captions_fit():
    tok = M.world_tokenizer()
    for word in M.WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    rng = random.Random(0)
    longest = max((W.caption(W.random_scene(rng, 3)) for _ in range(200)), key=len)
    ids = tok(longest).input_ids
    assert len(ids) < 40  # far inside CLIP's 77
    assert tok.unk_token_id not in ids[1:-1]  # (CLIP uses <|endoftext|> as unk and eos)


def test_pipeline_shapes():
    pipe = M.build_pipeline(0)
    assert pipe.vae_scale_factor == 2  # 64x64 pixels <-> 32x32 latents
    image = pipe("a small red circle on the left on a white background", num_inference_steps=1, height=W.SIZE,
                 width=W.SIZE, output_type="np").images
    assert image.shape == (1, W.SIZE, W.SIZE, 3)


def test_the_demo_prompts_are_the_captions_of_the_demo_case():
    # dac_core.demo (the library's, no scenes) and the lab's DEMO_CASE describe one edit
    assert demo.SOURCE_PROMPT == W.DEMO_CASE.source_prompt
    assert demo.TARGET_PROMPT == W.DEMO_CASE.target_prompt


def test_bundled_demo_source_is_the_rendered_demo_scene(tmp_path):
    from PIL import Image

    bundled = np.asarray(Image.open(demo.SOURCE_IMAGE).convert("RGB"))
    W.write_demo_source(str(tmp_path / "source.png"))
    assert np.array_equal(bundled, np.asarray(Image.open(tmp_path / "source.png").convert("RGB")))
    assert np.array_equal(bundled, np.asarray(W.render(W.DEMO_CASE.source)))
    assert W.check(W.DEMO_CASE.source, Image.open(demo.SOURCE_IMAGE)).all_ok


def test_a_few_training_steps_change_the_weights_and_save_as_float16(tmp_path):
    import torch

    from dac_core.diffusers_backend import load_pipeline

    pipe = M.build_pipeline(0)
    vae_before = pipe.vae.decoder.conv_out.weight.clone()
    unet_before = pipe.unet.conv_out.weight.clone()
    assert all(torch.isfinite(torch.tensor(T.train_vae(pipe, 3))))
    assert all(torch.isfinite(torch.tensor(T.train_unet(pipe, 3, batch_size=4, dataset_size=16))))
    assert not torch.equal(vae_before, pipe.vae.decoder.conv_out.weight)
    assert not torch.equal(unet_before, pipe.unet.conv_out.weight)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the world's latents
    from diffusers import AutoencoderKL

    pipe.vae.save_pretrained(str(tmp_path / "vae_stage"))  # as the training command reuses its VAE stage
    pipe.vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae_stage"))
    T.save_model(pipe, str(tmp_path / "m"))
    assert "vae_stage" not in (tmp_path / "m" / "vae" / "config.json").read_text()  # no path of this machine
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("conv_out.weight").dtype == torch.float16
    loaded = load_pipeline(str(tmp_path / "m"))
    assert loaded.unet.conv_out.weight.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_out.weight, pipe.unet.conv_out.weight.half().float())


def test_object_masks_cover_the_objects_at_latent_size_and_nothing_far_from_them():
    rng = random.Random(4)
    for _ in range(30):
        scene = W.random_scene(rng)
        mask = T.latent_object_mask(scene, W.SIZE // 2).numpy()
        assert mask.shape == (W.SIZE // 2, W.SIZE // 2)
        pixels = W.objects_mask(scene)
        ys, xs = np.nonzero(pixels)
        assert mask[ys // 2, xs // 2].all()  # every object pixel's latent pixel, outlines included
        ys, xs = np.nonzero(~_dilate(pixels, 4))  # 4 pixels from every object: 2 latent pixels at least
        assert not mask[ys // 2, xs // 2].any()
        assert 0.02 < mask.mean() < 0.5


def test_scene_labels_are_what_the_caption_says():
    rng = random.Random(3)
    for _ in range(50):
        scene = W.random_scene(rng)
        labels = T.scene_labels(scene)
        assert len(labels) == len(T.LABEL_CLASSES)
        assert all(0 <= label < n for label, n in zip(labels, T.LABEL_CLASSES))
        assert sum(label > 0 for label in labels[2::3]) == len(scene.objects)  # one shape per object
        # details no caption names do not change them
        moved = W.Scene(scene.background, scene.texture, tuple(W.Obj(o.shape, o.colour, o.size, o.position, -o.dy)
                                                                for o in scene.objects), (scene.phase + 3) % W.STRIPE)
        assert T.scene_labels(moved) == labels
    a = W.Scene("red", "plain", (W.Obj("circle", "blue", "small", "left"),))
    b = W.Scene("red", "plain", (W.Obj("circle", "blue", "small", "right"),))
    assert T.scene_labels(a) != T.scene_labels(b)


def test_text_pre_training_learns_and_the_unet_stage_leaves_the_text_encoder_alone():
    import torch

    pipe = M.build_pipeline(0)
    losses = T.train_text_encoder(pipe, 40, batch_size=16)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # (still warming up)
    assert not pipe.text_encoder.training and not any(q.requires_grad for q in pipe.text_encoder.parameters())
    before = [q.clone() for q in pipe.text_encoder.parameters()]
    T.train_unet(pipe, 2, batch_size=2, dataset_size=4)
    assert all(torch.equal(a, b) for a, b in zip(before, pipe.text_encoder.parameters()))


def test_training_captions_are_excluded_from_the_evaluation():
    seen = T.training_captions(n=200, seed=1)
    assert len(seen) > 150
    rng = random.Random(1)
    assert W.caption(W.random_scene(rng)) in seen  # the same stream as the encoded training set


def test_training_command_writes_records_and_reuses_its_vae(tmp_path, caplog):
    import json
    import logging

    out = tmp_path / "wm"
    small = ["--out", str(out), "--vae-steps", "2", "--text-steps", "2", "--dataset-size", "8", "--batch-size", "2",
             "--eval", "1"]
    T.main([*small, "--unet-steps", "0"])  # the VAE stage alone
    vae_record = json.loads((out / "training_vae.json").read_text())
    assert vae_record["settings"] == {"seed": 0, "vae_steps": 2} and 0 <= vae_record["match_rate"] <= 1
    with caplog.at_level(logging.INFO, logger="dac_core"):
        T.main([*small, "--unet-steps", "2"])
    assert "reusing the VAE" in caplog.text
    record = json.loads((out / "training.json").read_text())
    assert record["text_steps"] == 2 and record["text_final_loss"] > 0
    assert record["unet_steps"] == 2 and record["eval_images"] == 1
    # One image is right in every attribute exactly when each attribute's rate is 1.
    rates = record["attribute_rates"]
    assert set(rates) == {"shape", "colour", "size", "position", "background", "texture", "no_extra"}
    assert record["match_rate"] == float(all(v == 1.0 for v in rates.values()))
    assert record["vae"] == vae_record
    assert (out / "model_index.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
