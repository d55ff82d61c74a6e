"""Tiny ComfyUI MODEL / CLIP / VAE objects for the integration tests (needs COMFYUI_PATH).

The UNet and text encoder carry the same weights as dac_core.tiny's diffusers models
(converted with ComfyUI's own key maps), so both backends can be compared.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folder name ComfyUI-Manager gives the pack: the repository's name (not an identifier,
# so the pack must work under a module name ComfyUI makes up from the folder path).
PACK_FOLDER = "dac-image-edit"

# Every test that needs ComfyUI carries the `comfyui` mark; in CI (CI=true, COMFYUI_PATH set)
# conftest.py turns a skip of such a test into a failure.
NEEDS_COMFYUI = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"),
                       reason="COMFYUI_PATH is not set: these tests need a ComfyUI checkout"),
]


def import_comfy(path: str, base_directory: str | None = None) -> str:
    """Make the ComfyUI checkout at `path` importable in this process without writing into it.

    ComfyUI puts models/, custom_nodes/, input/, output/, temp/ and user/ under its
    `base_directory` (its own folder by default; folder_paths creates input/ on import) and
    Python writes __pycache__ beside its sources. Here they go to `base_directory` (a fresh
    temporary folder, removed at exit, when None) and no bytecode is written. Must run before
    anything imports `folder_paths`. Returns the base directory in use.

    It also imports ComfyUI's `nodes` module while `path` leads sys.path: the repository's own
    `nodes/` package would shadow it once pytest puts the repository root in front.
    """
    sys.dont_write_bytecode = True
    if sys.path[:1] != [path]:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = True
    if "folder_paths" in sys.modules:
        base = sys.modules["folder_paths"].base_path
        if os.path.realpath(base) == os.path.realpath(path):
            raise RuntimeError("folder_paths was imported before import_comfy(): its base is COMFYUI_PATH itself")
        return base
    if base_directory is None:
        base_directory = tempfile.mkdtemp(prefix="dac-comfyui-base-")
        atexit.register(shutil.rmtree, base_directory, ignore_errors=True)
    args.base_directory = base_directory
    # The default database (used by main.py only) is <ComfyUI>/user/comfyui.db.
    args.database_url = "sqlite:///" + os.path.join(base_directory, "user", "comfyui.db")
    import folder_paths

    import nodes

    assert os.path.realpath(folder_paths.base_path) == os.path.realpath(base_directory)
    assert os.path.realpath(os.path.dirname(nodes.__file__)) == os.path.realpath(path), nodes.__file__
    return base_directory


def pack_files() -> list[str]:
    """The repository's git-tracked files (relative paths): what a clone of it holds."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"cannot list the repository's files with git in {ROOT}: {e}") from e
    files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    assert "__init__.py" in files and "requirements.txt" in files, files[:20]
    return files


def copy_pack(custom_nodes: str, name: str = PACK_FOLDER) -> str:
    """Install the pack as ComfyUI-Manager does, a folder of the repository's files in
    `custom_nodes` (a copy, not a link, and no pip install of this project). Returns its path."""
    dest = os.path.join(custom_nodes, name)
    for rel in pack_files():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return dest


def unet_config(flavour: str) -> dict:
    """ComfyUI's UNet config for dac_core.tiny's UNet of this flavour."""
    from dac_core.tiny import SDXL_UNET_CONFIG, UNET_CONFIG

    if flavour == "sdxl":  # level 0 without attention, level 1 (and the middle) two transformer blocks each
        return {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
            "channel_mult": [1, 2], "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
            "transformer_depth_middle": 2, "context_dim": SDXL_UNET_CONFIG["cross_attention_dim"],
            "num_heads": SDXL_UNET_CONFIG["attention_head_dim"], "num_head_channels": -1,
            "use_linear_in_transformer": True, "legacy": False, "use_spatial_transformer": True,
            "adm_in_channels": SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"], "num_classes": "sequential",
            "use_temporal_attention": False, "use_temporal_resblock": False, "dtype": torch.float32,
        }

    return {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": UNET_CONFIG["block_out_channels"][0],
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
        "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1,
        "context_dim": UNET_CONFIG["cross_attention_dim"], "num_heads": UNET_CONFIG["attention_head_dim"],
        "num_head_channels": -1, "use_linear_in_transformer": flavour == "sd2", "legacy": False,
        "use_spatial_transformer": True, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False, "dtype": torch.float32,
    }


def tiny_model(flavour: str = "sd1", dtype: torch.dtype = torch.float32):
    """A ModelPatcher of a tiny SD1.x (epsilon), SD2.x (v-prediction) or SDXL model whose weights
    are stored in `dtype`. ComfyUI computes in the storage dtype unless it decides to cast
    (comfy.model_management.unet_manual_cast, asked here as a checkpoint loader would)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from comfy import model_base

    from dac_core.tiny import tiny_pipeline

    config = {**unet_config(flavour), "dtype": dtype}
    cls = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
           "sdxl": comfy.supported_models.SDXL}[flavour]
    supported = cls(dict(config))
    supported.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, torch.device("cpu")))
    # SD20 forces 64 channels per head; the tiny model keeps diffusers' head count instead.
    supported.unet_config.update(num_heads=config["num_heads"], num_head_channels=-1)
    model_type = model_base.ModelType.V_PREDICTION if flavour == "sd2" else model_base.ModelType.EPS
    model = (model_base.SDXL if flavour == "sdxl" else model_base.BaseModel)(supported, model_type=model_type,
                                                                            device="cpu")
    diffusers_sd = tiny_pipeline(flavour).unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers({**config, "num_res_blocks": [1, 1]})
    ldm = {ldm_key: diffusers_sd[d] for d, ldm_key in mapping.items() if d in diffusers_sd}
    missing, unexpected = model.diffusion_model.load_state_dict(ldm, strict=False)
    assert not missing and len(ldm) == len(diffusers_sd), (missing, set(diffusers_sd) - set(mapping))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def hf_text_encoder(flavour: str = "sd1", text_config: dict | None = None):
    """The transformers CLIPTextModel behind tiny_clip(flavour): CLIP-L's vocabulary, tiny
    layers. SD 2.x-style ("sd2"): OpenCLIP's gelu and one layer more, which ComfyUI builds
    and never reads (it takes the penultimate layer; diffusers' SD 2.x encoder lacks it).
    `text_config`: other shapes than dac_core.tiny.TEXT_CONFIG's (e.g. a wider encoder for a
    UNet with 1024-wide cross-attention)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from dac_core.tiny import TEXT_CONFIG

    sd2 = flavour == "sd2"
    config = {**TEXT_CONFIG, **(text_config or {})}
    small = {**config, "vocab_size": 49408, "hidden_act": "gelu" if sd2 else "quick_gelu",
             "num_hidden_layers": config["num_hidden_layers"] + sd2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(**small, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)), small


def hf_sdxl_text_encoders():
    """The transformers encoders behind tiny_clip("sdxl"): CLIP-L's vocabulary, dac_core.tiny's
    SDXL encoder shapes (a CLIPTextModel, and a CLIPTextModelWithProjection whose projection
    makes the pooled embedding), with their configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dac_core.tiny import SDXL_TEXT1_CONFIG, SDXL_TEXT_CONFIG

    ids = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    small_l = {**SDXL_TEXT1_CONFIG, **ids, "hidden_act": "quick_gelu"}
    small_g = {**SDXL_TEXT_CONFIG, **ids}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModel(CLIPTextConfig(**small_l, pad_token_id=49407))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**small_g, pad_token_id=0))
    return (te1, small_l), (te2, small_g)


def parity_pipeline(comfyui: str, flavour: str = "sd1", text_config: dict | None = None):
    """dac_core.tiny's diffusers pipeline with tiny_clip(flavour)'s text encoder and ComfyUI's
    CLIP tokenizer, so both backends see the same weights and tokens. For "sd2" the encoder
    is cut to the layers diffusers' SD 2.x has (all but the last) and pads with "!" (id 0).
    `text_config`: as hf_text_encoder's (not for "sdxl")."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dac_core.tiny import tiny_pipeline

    pipe = tiny_pipeline(flavour)
    pipe.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfyui, "comfy", "sd1_tokenizer"))
    pipe.tokenizer.model_max_length = 77
    if flavour == "sdxl":  # ComfyUI pads CLIP-L with the end token and bigG with "!" (id 0), as diffusers
        (pipe.text_encoder, _), (pipe.text_encoder_2, _) = hf_sdxl_text_encoders()
        pipe.tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(comfyui, "comfy", "sd1_tokenizer"))
        pipe.tokenizer_2.model_max_length = 77
        pipe.tokenizer_2.pad_token = "!"
        return pipe
    hf, small = hf_text_encoder(flavour, text_config)
    if flavour == "sd2":
        cut = CLIPTextModel(CLIPTextConfig(**{**small, "num_hidden_layers": small["num_hidden_layers"] - 1},
                                           bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
        missing, _ = cut.load_state_dict(hf.state_dict(), strict=False)
        assert not missing, missing
        hf = cut
        pipe.tokenizer.pad_token = "!"
    pipe.text_encoder = hf
    return pipe


def tiny_clip(flavour: str = "sd1", dtype: torch.dtype = torch.float32, text_config: dict | None = None):
    """A comfy CLIP with a tiny CLIP-L-shaped text encoder (SD 1.x) or OpenCLIP-H-shaped one
    read at the penultimate layer (SD 2.x), the real tokenizer, weights stored in `dtype`;
    `text_config`: as hf_text_encoder's (not for "sdxl")."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy import sdxl_clip
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd2_clip

    def load(encoder, hf, small):
        sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
              for k, v in hf.state_dict().items()}
        sd.setdefault("text_projection.weight", torch.eye(small["hidden_size"]))
        missing, _ = encoder.transformer.load_state_dict(sd, strict=False)
        assert not [k for k in missing if "position_ids" not in k], missing

    if flavour == "sdxl":
        (te1, small_l), (te2, small_g) = hf_sdxl_text_encoders()
        clip = comfy.sd.CLIP(ClipTarget(sdxl_clip.SDXLTokenizer, sdxl_clip.SDXLClipModel),
                             model_options={"clip_l_model_config": small_l, "clip_g_model_config": small_g,
                                            "dtype": dtype})
        load(clip.cond_stage_model.clip_l, te1, small_l)
        load(clip.cond_stage_model.clip_g, te2, small_g)
        return clip
    hf, small = hf_text_encoder(flavour, text_config)
    if flavour == "sd2":
        target, name = ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel), "clip_h"
    else:
        target, name = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel), "clip_l"
    clip = comfy.sd.CLIP(target, model_options={f"{name}_model_config": small, "dtype": dtype})
    sd = {}
    for k, v in hf.state_dict().items():
        sd[k if k.startswith("text_model.") else "text_model." + k] = v
    sd.setdefault("text_projection.weight", torch.eye(small["hidden_size"]))
    getattr(clip.cond_stage_model, name).transformer.load_state_dict(sd, strict=False)
    return clip


def tiny_vae():
    import comfy.sd
    import comfy.taesd.taesd

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        taesd = comfy.taesd.taesd.TAESD()
        for p in taesd.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return comfy.sd.VAE(sd=taesd.state_dict())


def comfyui_path() -> str | None:
    return os.environ.get("COMFYUI_PATH")


def import_pack():
    """This repository as ComfyUI imports it (tools.pack, shared with the maintainer scripts)."""
    from tools.pack import import_pack as imported

    return imported()


SD15_TINY = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_linear_in_transformer": False, "legacy": False, "use_spatial_transformer": True,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _init_(module: torch.nn.Module) -> None:
    """comfy.ops layers are not initialised: small random weights, unit norms, zero biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def save_sd15_controlnet(path: str) -> str:
    """A ControlNet (ComfyUI's LDM layout) for save_sd15_checkpoint's UNet, random weights."""
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.utils

    config = {k: v for k, v in SD15_TINY.items() if k != "out_channels"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, dtype=torch.float32, device="cpu",
                                         operations=comfy.ops.disable_weight_init)
        _init_(net)
    comfy.utils.save_torch_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def save_sd15_checkpoint(path: str) -> str:
    """A single-file checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD 1.5:
    a one-level 320-channel UNet with 768-wide cross-attention (~26 M parameters, random),
    a full-size CLIP-L text encoder (random, CLIP-L's shape is fixed by the loader) and a
    TAESD VAE. Small enough to run whole workflows on a CPU; its images are noise."""
    import json

    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy import model_base
    from comfy.supported_models_base import ClipTarget
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {**SD15_TINY, "dtype": torch.float32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_base.BaseModel(comfy.supported_models.SD15(dict(config)), device="cpu")
        _init_(model.diffusion_model)
        with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
            hf_config = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}
        hf = CLIPTextModel(CLIPTextConfig(**hf_config))
    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float32})
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in hf.state_dict().items()}
    sd.setdefault("text_projection.weight", torch.eye(768))
    clip.cond_stage_model.clip_l.transformer.load_state_dict(sd, strict=False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    comfy.sd.save_checkpoint(path, patcher, clip, tiny_vae())
    return path


# The smallest UNet ComfyUI's detection takes for an SDXL-family model. Detection
# (comfy.model_detection) reads the layout from the keys and matches a supported model's
# unet_config only: KOALA_700M's per-res-block transformer_depth [0, 2, 5] with model_channels
# 320, context_dim 2048, adm_in_channels 2816 and linear proj_in/out. The rest is free: one
# level of three res blocks (no down/upsampling), no transformers in the output blocks and no
# middle block (transformer_depth_middle -2, as in KOALA-700M itself: code that walks the UNet's
# blocks meets middle_block None). This is what detection returns for it, less the dtype.
SDXL_TINY = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [3], "transformer_depth": [0, 2, 5],
    "transformer_depth_output": [0, 0, 0, 0], "channel_mult": [1], "transformer_depth_middle": -2,
    "use_linear_in_transformer": True, "context_dim": 2048, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def save_sdxl_checkpoint(path: str) -> str:
    """A single-file checkpoint that ComfyUI's CheckpointLoaderSimple detects as an SDXL-family
    model (supported_models.KOALA_700M, a model_base.SDXL: pooled text and size conditioning):
    SDXL_TINY's UNet (~50 M parameters), SDXL's text encoders CLIP-L and OpenCLIP-G at their
    full size (~820 M parameters; the loader fixes their shapes) and a TAESD VAE (SDXL's latents
    have 4 channels too). All random, seeded; stored in float16 (1.74 GB, 80 % of it CLIP-G),
    which the loader casts to its own dtypes."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    from comfy import model_base
    from comfy.supported_models_base import ClipTarget

    dtype = torch.float16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_base.SDXL(comfy.supported_models.KOALA_700M({**SDXL_TINY, "dtype": dtype}), device="cpu")
        _init_(model.diffusion_model)
        clip = comfy.sd.CLIP(ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                             model_options={"dtype": dtype})
        _init_(clip.cond_stage_model)
    sd = model.state_dict_for_saving(clip.get_sd(), tiny_vae().get_sd())
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path)
    return path


def tiny_controlnet(flavour: str = "sd1"):
    """A comfy ControlNet for tiny_model(flavour) (random weights, nonzero zero-convs so it acts)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in unet_config(flavour).items() if k != "out_channels"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="cpu",
                                         operations=comfy.ops.disable_weight_init)
        _init_(net)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))
