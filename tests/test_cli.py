"""`dac-edit` as a user runs it: end to end, reuse, resume, and every bad input."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dac_core import lora as L
from dac_core.cli import main
from dac_core.edit import EditParams, edit

FAST = ["--unet-steps", "12", "--text-steps", "8", "--unet-rank", "4", "--sample-steps", "3", "--device", "cpu"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dac_core.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture
def photo(tmp_path, source_image):
    path = tmp_path / "photo.png"
    source_image.resize((80, 48)).save(path)
    return path


def test_end_to_end_then_new_target_reuses_the_unet_lora(tmp_path, photo, tiny_model_dirs):
    work = tmp_path / "work"
    first = run_cli(photo, "--source-prompt", "a red disc", "--target-prompt", "a red disc with a hat", "--model",
                    tiny_model_dirs["sd1"], "--workdir", work, "--out", tmp_path / "out.png", *FAST)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert "UNet LoRA (Abduction-1)" in first.stderr and "loss=" in first.stderr  # the progress bar
    record = json.loads((work / "dac_edit.json").read_text())
    assert record["params"]["target_prompt"] == "a red disc with a hat" and record["params"]["unet_steps"] == 12
    assert record["size"] == [80, 48]  # aspect ratio kept at the tiny model's 64x64 pixel count
    out = Image.open(tmp_path / "out.png")
    assert out.size == (80, 48)
    meta = json.loads(out.text["dac"])
    assert meta["params"]["source_prompt"] == "a red disc" and meta["seed"] == 29
    assert "Steps: 3, CFG scale: 4.0, Seed: 29" in out.text["parameters"]
    assert Image.open(work / "edit.png").size == (80, 48)
    before_after = Image.open(work / "before_after.png")  # photo and edit side by side, 2x or more
    assert before_after.width >= 2 * 2 * 80 and before_after.height >= 2 * 48
    assert str(work / "before_after.png") in first.stdout
    umask = os.umask(0)
    os.umask(umask)
    for path in (work / "edit.png", tmp_path / "out.png", work / "dac_edit.json"):  # like open(path, "w")
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
    unet_file, text_file = record["unet_lora"], record["text_lora"]
    assert L.load_lora(unet_file).metadata["dac.stage"] == "unet"
    assert L.load_lora(text_file).metadata["dac.stage"] == "text"
    unet_bytes, unet_mtime = open(unet_file, "rb").read(), os.stat(unet_file).st_mtime_ns

    # the spellings of the previous release still work, with a deprecation message each
    second = run_cli(photo, "--source", "a red disc", "--target=a blue disc", "--model", tiny_model_dirs["sd1"],
                     "--workdir", work, "--beta", "1.5", "--lr", "1e-4", *FAST)
    assert second.returncode == 0, second.stderr
    for old, new in (("--source", "--source-prompt"), ("--target", "--target-prompt"), ("--lr", "--learning-rate")):
        assert f"dac-edit: warning: {old} is deprecated and goes in the next release; use {new}" in second.stderr
    assert "reusing UNet LoRA (Abduction-1)" in second.stderr
    assert "UNet LoRA (Abduction-1):" not in second.stderr  # no training bar for it
    record2 = json.loads((work / "dac_edit.json").read_text())
    assert record2["params"]["target_prompt"] == "a blue disc" and record2["params"]["learning_rate"] == 1e-4
    assert record2["unet_lora"] == unet_file and record2["reused_unet_lora"] is True
    assert record2["text_lora"] != text_file and os.path.exists(text_file)
    assert open(unet_file, "rb").read() == unet_bytes and os.stat(unet_file).st_mtime_ns == unet_mtime


def test_interrupted_run_resumes_to_the_same_result(tmp_path, source_image, tiny_model_dirs, caplog):
    params = EditParams("a red disc", "a red disc with a hat", model=tiny_model_dirs["sd1"], unet_steps=10,
                        text_steps=6, unet_rank=4, sample_steps=2, device="cpu")
    whole = edit(source_image, params, tmp_path / "whole")

    def interrupt_at_4(label):
        def cb(step, total, loss=None):
            if label.startswith("UNet") and step == 4:
                raise KeyboardInterrupt
        return cb

    work = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        edit(source_image, params, work, progress=interrupt_at_4)
    assert any(name.endswith(".partial.safetensors") for name in os.listdir(work))
    with caplog.at_level("INFO", logger="dac_core"):
        resumed = edit(source_image, params, work)
    assert "resuming UNet LoRA (Abduction-1) from step 4" in caplog.text
    assert resumed.unet_losses == whole.unet_losses
    assert not any(".partial." in name for name in os.listdir(work))
    a, b = L.load_lora(whole.unet_lora_path), L.load_lora(resumed.unet_lora_path)
    assert all((a.layers[k].up == b.layers[k].up).all() for k in a.layers)
    assert list(resumed.images[0].getdata()) == list(whole.images[0].getdata())


def test_nan_loss_stops_and_keeps_saved_files(tmp_path, source_image, tiny_model_dirs):
    params = EditParams("a", "a b", model=tiny_model_dirs["sd1"], unet_steps=3, text_steps=2, unet_rank=4,
                        sample_steps=1, device="cpu")
    work = tmp_path / "w"
    good = edit(source_image, params, work)
    kept = {name: open(work / name, "rb").read() for name in os.listdir(work)}
    bad = EditParams("a", "a b", model=tiny_model_dirs["sd1"], unet_steps=30, text_steps=2, unet_rank=4,
                     learning_rate=1.0, sample_steps=1, device="cpu")
    from dac_core.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="loss became nan.*the last good state is kept in .*partial"):
        edit(source_image, bad, work, checkpoint_every=1)
    for name, content in kept.items():
        assert open(work / name, "rb").read() == content, name
    assert os.path.exists(good.unet_lora_path)


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    r = run_cli(tmp_path / "missing.png", "--source-prompt", "a", "--target-prompt", "b")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"dac-edit: error: image '{tmp_path / 'missing.png'}' does not exist"]


@pytest.fixture
def cli(capsys):
    def call(*args):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        return code, err

    return call


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--unet-steps", "0", "argument --unet-steps: must be an integer in [1, 100000], got 0"),
        ("--text-steps", "-5", "argument --text-steps: must be an integer in [1, 100000], got -5"),
        ("--unet-rank", "0", "argument --unet-rank: must be an integer in [1, 1024], got 0"),
        ("--text-rank", "x", "argument --text-rank: must be an integer in [1, 256], got 'x'"),
        ("--learning-rate", "0", "argument --learning-rate: must be a number in (0, 1], got 0.0"),
        ("--learning-rate", "-1e-4", "argument --learning-rate: must be a number in (0, 1], got -0.0001"),
        ("--eta", "0", "argument --eta: must be a number in (0, 1], got 0.0"),
        ("--eta", "1.2", "argument --eta: must be a number in (0, 1], got 1.2"),
        ("--beta", "nan", "argument --beta: must be a number in [-3, 5], got nan"),
        ("--source-prompt", "  ", "argument --source-prompt: is empty: give a caption of the photo as it is, "
                                  "e.g. 'A cat.'"),
        ("--target-prompt", "", "argument --target-prompt: is empty: give a caption of the wanted result, "
                                "e.g. 'A cat wearing a wool cap.'"),
        ("--sample-steps", "0", "argument --sample-steps: must be an integer in [1, 10000], got 0"),
        ("--batch-size", "0", "argument --batch-size: must be an integer in [1, 64], got 0"),
        ("--resolution", "4", "argument --resolution: must be an integer in [8, 8192], got 4"),
    ],
)
def test_bad_numbers_and_prompts(capsys, photo, flag, value, message):
    args = {"--source-prompt": "a", "--target-prompt": "b", flag: value}
    with pytest.raises(SystemExit) as e:
        main([str(photo), *[f"{k}={v}" for k, v in args.items()]])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"dac-edit: error: {message}"]


def test_not_an_image(cli, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture")
    code, err = cli(path, "--source-prompt", "a", "--target-prompt", "b")
    assert code == 1 and err.strip().startswith(f"dac-edit: error: image '{path}' is not an image")
    assert len(err.strip().splitlines()) == 1


def test_missing_prompt(cli, photo):
    code, err = cli(photo, "--target-prompt", "b")
    assert code == 2 and "--source-prompt is required" in err


def test_model_that_does_not_exist(cli, photo, tmp_path):
    code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", tmp_path / "nowhere")
    assert code == 1 and "does not exist" in err and "nowhere" in err


def test_lora_file_that_does_not_fit(cli, photo, tmp_path, tiny_model_dirs):
    import torch

    bad = L.LoRA({"lora_unet_down_blocks_0_resnets_0_conv1": L.LoRALayer(torch.zeros(4, 3, 3, 3),
                                                                        torch.zeros(9, 4, 1, 1), 4.0)})
    path = L.save_lora(bad, tmp_path / "sdxl_lora.safetensors")
    code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", tiny_model_dirs["sd1"],
                    "--unet-lora", path,
                    *FAST)
    assert code == 1
    assert f"LoRA file '{path}' does not fit this model: layer lora_unet_down_blocks_0_resnets_0_conv1" in err


def test_corrupt_lora_file(cli, photo, tmp_path, tiny_model_dirs):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 5)
    code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", tiny_model_dirs["sd1"],
                    "--text-lora", path,
                    "--unet-lora", path, *FAST)
    assert code == 1 and f"LoRA file '{path}' is not a readable safetensors file" in err


def test_nan_loss_via_the_cli(cli, photo, tmp_path, tiny_model_dirs):
    code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", tiny_model_dirs["sd1"],
                    "--learning-rate", "1",
                    "--workdir", tmp_path / "w", *FAST)
    assert code == 1
    assert "dac-edit: error: Abduction-1 (UNet LoRA): the loss became nan" in err


def test_text_lora_given_as_unet_lora(cli, photo, tmp_path, tiny_model_dirs, source_image):
    params = EditParams("a", "a b", model=tiny_model_dirs["sd1"], unet_steps=2, text_steps=2, unet_rank=4,
                        sample_steps=1, device="cpu")
    result = edit(source_image, params, tmp_path / "w")
    code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", tiny_model_dirs["sd1"],
                    "--unet-lora",
                    result.text_lora_path, *FAST)
    assert code == 1 and "is not a UNet LoRA: it holds text-encoder layers only" in err


def test_grayscale_rgba_palette_and_16bit_photos_edit(tmp_path, source_image, tiny_model_dirs):
    import numpy as np

    params = EditParams("a", "a b", model=tiny_model_dirs["sd1"], unet_steps=1, text_steps=1, unet_rank=4,
                        sample_steps=1, device="cpu")
    images = {
        "gray.png": source_image.convert("L"),
        "rgba.png": source_image.convert("RGBA"),
        "palette.png": source_image.convert("P"),
        "deep.png": Image.fromarray(np.asarray(source_image.convert("L"), dtype=np.uint16) * 257),
    }
    for name, img in images.items():
        img.save(tmp_path / name)
        result = edit(str(tmp_path / name), params, tmp_path / ("w_" + name))
        assert result.images[0].mode == "RGB", name


def test_sdxl_folder_edits_end_to_end_with_sdxl_defaults(tmp_path, photo, tiny_model_dirs):
    """An SDXL diffusers folder: dac-edit picks the SDXL pipeline, trains U at SDXL's default
    rank (128) and Delta on both text encoders, and writes the edit at the photo's aspect."""
    work = tmp_path / "work"
    r = run_cli(photo, "--source-prompt", "a red disc", "--target-prompt", "a red disc with a hat", "--model",
                tiny_model_dirs["sdxl"], "--workdir", work, "--unet-steps", "2", "--text-steps", "2",
                "--sample-steps", "2", "--device", "cpu")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    record = json.loads((work / "dac_edit.json").read_text())
    assert record["size"] == [80, 48] and Image.open(work / "edit.png").size == (80, 48)
    unet, text = L.load_lora(record["unet_lora"]), L.load_lora(record["text_lora"])
    assert unet.rank == 128 and unet.metadata["dac.rank"] == "128"
    assert {stem.split("text_model")[0] for stem in text.layers} == {"lora_te1_", "lora_te2_"}
    again = run_cli(photo, "--source-prompt", "a red disc", "--target-prompt", "a blue disc", "--model",
                    tiny_model_dirs["sdxl"], "--workdir", work, "--unet-steps", "2", "--text-steps", "2",
                    "--sample-steps", "2", "--device", "cpu")
    assert again.returncode == 0 and "reusing UNet LoRA (Abduction-1)" in again.stderr, again.stderr
    assert json.loads((work / "dac_edit.json").read_text())["unet_lora"] == record["unet_lora"]


def test_other_architectures_are_one_line_errors(cli, photo, tmp_path):
    from safetensors.torch import save_file

    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": __import__("torch").zeros(2, 2)}, sd3)
    for model, what in ((flux, "is a FluxPipeline"), (sd3, "is an SD3 checkpoint")):
        code, err = cli(photo, "--source-prompt", "a", "--target-prompt", "b", "--model", model)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert f"dac-edit: error: model '{model}' {what}; DAC supports Stable Diffusion 1.x, 2.x and SDXL" in err


def test_a_refiner_or_inpainting_pipeline_is_named(tiny_model_dirs):
    import torch
    from diffusers import UNet2DConditionModel

    from dac_core.diffusers_backend import DiffusersBackend
    from dac_core.errors import DACError
    from dac_core.tiny import UNET_CONFIG, tiny_pipeline

    refiner = tiny_pipeline("sdxl")
    refiner.text_encoder = None  # the SDXL refiner has bigG only
    with pytest.raises(DACError, match="holds an SDXL refiner; DAC supports Stable Diffusion 1.x, 2.x and SDXL"):
        DiffusersBackend(refiner)
    inpaint = tiny_pipeline("sd1")
    with torch.random.fork_rng():
        inpaint.unet = UNet2DConditionModel(**{**UNET_CONFIG, "in_channels": 9})
    with pytest.raises(DACError, match="takes class labels or extra input channels"):
        DiffusersBackend(inpaint)


def test_single_file_checkpoints_are_told_apart_by_their_keys(tmp_path, tiny_model_dirs):
    import torch
    from safetensors.torch import save_file

    from dac_core.diffusers_backend import model_architecture

    z = torch.zeros(1)
    cases = {"sdxl": {"conditioner.embedders.1.model.ln_final.weight": z,
                      "model.diffusion_model.input_blocks.0.0.weight": z},
             "sd": {"cond_stage_model.transformer.text_model.final_layer_norm.weight": z,
                    "model.diffusion_model.input_blocks.0.0.weight": z}}
    for expected, keys in cases.items():
        save_file({k: v.clone() for k, v in keys.items()}, tmp_path / f"{expected}.safetensors")
        assert model_architecture(str(tmp_path / f"{expected}.safetensors")) == expected
    assert model_architecture(tiny_model_dirs["sdxl"]) == "sdxl" and model_architecture(tiny_model_dirs["sd2"]) == "sd"
