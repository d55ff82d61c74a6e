"""The one LoRA-format module: DAC's LoRAs in memory, on disk, and between naming schemes.

In memory a `LoRA` maps kohya layer names ("stems") to (down, up, alpha):

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    lora_te_text_model_encoder_layers_0_self_attn_q_proj      (SD 1.x / 2.x)
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj     (SDXL: CLIP-L)
    lora_te2_text_model_encoder_layers_0_self_attn_q_proj     (SDXL: OpenCLIP-bigG)

and the delta a layer adds to its base weight W is  (alpha / rank) * up @ down.

On disk it is a safetensors file in kohya naming (`<stem>.lora_down.weight`,
`<stem>.lora_up.weight`, `<stem>.alpha`), which diffusers' `load_lora_weights`, ComfyUI's
stock LoraLoader and A1111-style tools read. Reading also accepts diffusers/peft files
(`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, the older
`.lora.down.weight` / `.lora_linear_layer.down.weight`, `text_encoder_2.` for SDXL's second
encoder), e.g. the reference DAC code's `pytorch_lora_weights.safetensors`; a file without
alphas gets alpha = rank (scale 1), as diffusers assumes. A file with one text encoder
named `lora_te1_` is read as `lora_te_` (SD 1.x / 2.x), one with two as SDXL's.

transformers 5.x dropped the `text_model` level of CLIPTextModel, so its module names read
`encoder.layers.0...`; stems always carry `text_model_` so files match every other tool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .errors import DACError
from .files import atomic_path

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
TEXT1_PREFIX, TEXT2_PREFIX = "lora_te1_", "lora_te2_"  # SDXL's two text encoders
TEXT_PREFIXES = (TEXT_PREFIX, TEXT1_PREFIX, TEXT2_PREFIX)
FORMAT_VERSION = "1"

# kohya suffixes, then (down, up) suffix pairs of the diffusers/peft formats we read.
_KOHYA = (".lora_down.weight", ".lora_up.weight", ".alpha")
_OTHER_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_PREFIXES = {"unet.": UNET_PREFIX, "text_encoder.": TEXT_PREFIX, "text_encoder_2.": TEXT2_PREFIX}


# The layers DAC's LoRAs target (reference code), as diffusers module-name suffixes.
UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_UNET_BLOCKS = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")


def is_unet_target(stem: str) -> bool:
    """Whether a diffusers-named UNet stem is one of DAC's UNet LoRA layers."""
    return stem.startswith(_UNET_BLOCKS) and stem.endswith(tuple("_" + t.replace(".", "_") for t in UNET_TARGETS))


def is_text_target(stem: str) -> bool:
    return stem.startswith(tuple(p + "text_model_encoder_layers_" for p in TEXT_PREFIXES)) and stem.endswith(
        tuple("_self_attn_" + t for t in TEXT_TARGETS))


def unet_stem(module_name: str) -> str:
    """kohya stem of a diffusers UNet module name ("down_blocks.0.resnets.0.conv1")."""
    return UNET_PREFIX + module_name.replace(".", "_")


def text_encoder_stem(module_name: str, prefix: str = TEXT_PREFIX) -> str:
    """kohya stem of a CLIP text-encoder module name, with or without `text_model.`;
    `prefix` names the encoder (TEXT_PREFIX, or SDXL's TEXT1_PREFIX / TEXT2_PREFIX)."""
    if module_name.startswith("text_model."):
        module_name = module_name[len("text_model.") :]
    return prefix + "text_model_" + module_name.replace(".", "_")


@dataclass
class LoRALayer:
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down, shaped like the base weight."""
        up, down = self.up.float(), self.down.float()
        d = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            d = d.reshape(up.shape[0], *down.shape[1:])
        return d * (self.alpha / self.rank)


@dataclass
class LoRA:
    layers: dict[str, LoRALayer]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "LoRA"  # how errors name it, e.g. "LoRA file 'x.safetensors'"; not saved

    def part(self, prefix: str | tuple[str, ...]) -> LoRA:
        return LoRA({k: v for k, v in self.layers.items() if k.startswith(prefix)}, dict(self.metadata), self.source)

    @property
    def unet(self) -> LoRA:
        return self.part(UNET_PREFIX)

    @property
    def text_encoder(self) -> LoRA:
        """The layers of every text encoder (SDXL's two included)."""
        return self.part(TEXT_PREFIXES)

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    def num_parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)


def fresh_lora(shapes: dict[str, torch.Size], rank: int, generator: torch.Generator) -> LoRA:
    """A new LoRA for layers of these base-weight shapes: down ~ N(0, 1/rank), up = 0, alpha =
    rank (peft's "gaussian" init, as the reference). Drawn in sorted layer order, so every
    backend gets the same LoRA from the same generator."""
    layers = {}
    for stem in sorted(shapes):
        shape = tuple(shapes[stem])
        down = torch.randn((rank, shape[1], *shape[2:]), generator=generator) / rank
        up = torch.zeros((shape[0], rank, *((1, 1) if len(shape) == 4 else ())))
        layers[stem] = LoRALayer(down, up, float(rank))
    return LoRA(layers)


TEXT_METADATA = "dac.text."  # a combined file keeps the text-encoder LoRA's dac.* metadata under this


def combine(unet_lora: LoRA, text_lora: LoRA) -> LoRA:
    """U's and Delta's layers in one LoRA, for one file that every LoRA loader reads: U's
    `dac.*` metadata as it is, Delta's under `dac.text.*` (`split` undoes this)."""
    metadata = {k: v for k, v in unet_lora.metadata.items() if not k.startswith(TEXT_METADATA)}
    metadata.update({TEXT_METADATA + k[len("dac."):]: v
                     for k, v in text_lora.metadata.items() if k.startswith("dac.")})
    metadata["dac.stage"] = "unet+text"
    return LoRA({**unet_lora.unet.layers, **text_lora.text_encoder.layers}, metadata)


def split(lora: LoRA) -> tuple[LoRA, LoRA]:
    """(UNet part, text-encoder part) of a LoRA, each with its own `dac.*` metadata: a file
    written from `combine` gives each part back what it had; any other file gives both
    parts its metadata as it is."""
    unet, text = lora.unet, lora.text_encoder
    meta = lora.metadata
    if meta.get("dac.stage") == "unet+text":
        unet.metadata = {k: v for k, v in meta.items() if not k.startswith(TEXT_METADATA)} | {"dac.stage": "unet"}
        text.metadata = {k: v for k, v in meta.items() if not k.startswith("dac.")}
        text.metadata.update({"dac." + k[len(TEXT_METADATA):]: v
                              for k, v in meta.items() if k.startswith(TEXT_METADATA)})
    return unet, text


def to_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    sd = {}
    for stem, layer in sorted(lora.layers.items()):
        sd[stem + ".lora_down.weight"] = layer.down.detach().contiguous().cpu()
        sd[stem + ".lora_up.weight"] = layer.up.detach().contiguous().cpu()
        sd[stem + ".alpha"] = torch.tensor(float(layer.alpha))
    return sd


def save_lora(lora: LoRA, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write `lora` as a kohya-named safetensors file, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    meta = {**lora.metadata, **(metadata or {})}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    meta.setdefault("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(lora.rank)
    alphas = {layer.alpha for layer in lora.layers.values()}
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "mixed"
    meta["dac.format_version"] = FORMAT_VERSION
    with atomic_path(path) as tmp:
        save_file(to_state_dict(lora), tmp, metadata=meta)
    return path


def _stem_of(key_without_suffix: str) -> str | None:
    for prefix, kohya_prefix in _PREFIXES.items():
        if key_without_suffix.startswith(prefix):
            module = key_without_suffix[len(prefix) :]
            return unet_stem(module) if kohya_prefix == UNET_PREFIX else text_encoder_stem(module, kohya_prefix)
    return None


def from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict") -> LoRA:
    """Parse kohya or diffusers/peft keys into a LoRA. Keys of other kinds are an error."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith((UNET_PREFIX, *TEXT_PREFIXES)):
            stem = key.split(".", 1)[0]
            if key.endswith(_KOHYA[0]):
                downs[stem] = value
            elif key.endswith(_KOHYA[1]):
                ups[stem] = value
            elif key.endswith(_KOHYA[2]):
                alphas[stem] = float(value)
            else:
                unknown.append(key)
            continue
        for down_suffix, up_suffix in _OTHER_SUFFIXES:
            if key.endswith(down_suffix) or key.endswith(up_suffix):
                is_down = key.endswith(down_suffix)
                stem = _stem_of(key[: -len(down_suffix if is_down else up_suffix)])
                if stem is not None:
                    (downs if is_down else ups)[stem] = value
                    break
        else:
            if key.endswith(".alpha") and _stem_of(key[: -len(".alpha")]):
                alphas[_stem_of(key[: -len(".alpha")])] = float(value)
            else:
                unknown.append(key)
    if unknown:
        raise DACError(
            f"{source}: key {unknown[0]!r} is not a LoRA key this reader knows "
            "(kohya lora_unet_/lora_te_/lora_te1_/lora_te2_ keys or diffusers unet./text_encoder./"
            "text_encoder_2. lora_A/lora_B keys)"
        )
    if not downs:
        raise DACError(f"{source} holds no LoRA layers")
    # One text encoder: lora_te_ (SD 1.x / 2.x); two: lora_te1_ and lora_te2_ (SDXL).
    sdxl = any(stem.startswith(TEXT2_PREFIX) for stem in downs)
    old, new = (TEXT_PREFIX, TEXT1_PREFIX) if sdxl else (TEXT1_PREFIX, TEXT_PREFIX)
    for table in (downs, ups, alphas):
        for stem in [s for s in table if s.startswith(old)]:
            table[new + stem[len(old):]] = table.pop(stem)
    layers = {}
    for stem in sorted(downs):
        if stem not in ups:
            raise DACError(f"{source}: layer {stem} has a down weight but no up weight")
        down, up = downs[stem], ups[stem]
        layers[stem] = LoRALayer(down, up, alphas.get(stem, float(down.shape[0])))
    return LoRA(layers)


def load_lora(path: str | os.PathLike) -> LoRA:
    """Read a LoRA file (kohya or diffusers/peft naming) with its metadata."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DACError(f"LoRA file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise DACError(f"LoRA file {path!r} is not a readable safetensors file ({e})") from None
    source = f"LoRA file {path!r}"
    lora = from_state_dict(sd, source=source)
    lora.metadata, lora.source = metadata, source
    return lora


def fitting_part(lora: LoRA, unet: bool, weight_shapes: dict[str, torch.Size]) -> LoRA:
    """The UNet (or text-encoder) layers of `lora`, checked against the model's weight shapes.
    A LoRA with none of them, or one that does not fit, is a DACError naming `lora.source`."""
    part = lora.unet if unet else lora.text_encoder
    if len(part) == 0:
        has = f"it holds {'text-encoder' if unet else 'UNet'} layers only" if len(lora) else "it is empty"
        raise DACError(f"{lora.source} is not {'a UNet' if unet else 'a text-encoder'} LoRA: {has}")
    check_fits(part, weight_shapes, lora.source)
    return part


def check_fits(lora: LoRA, weight_shapes: dict[str, torch.Size], source: str) -> None:
    """Raise a DACError naming `source` and the first layer of `lora` that does not fit.

    `weight_shapes` maps each stem the model offers to its base weight's shape.
    """
    for stem, layer in lora.layers.items():
        if stem not in weight_shapes:
            raise DACError(f"{source} does not fit this model: it has layer {stem}, which the model lacks "
                           "(a LoRA fits the architecture it was trained on: SD 1.x, SD 2.x or SDXL)")
        shape = tuple(weight_shapes[stem])
        want_down = (layer.rank, shape[1], *shape[2:])
        want_up = (shape[0], layer.rank, *((1, 1) if len(shape) == 4 else ()))
        if tuple(layer.down.shape) != want_down or tuple(layer.up.shape) != want_up:
            raise DACError(
                f"{source} does not fit this model: layer {stem} has down {tuple(layer.down.shape)} / "
                f"up {tuple(layer.up.shape)}, the model's weight there is {shape}"
            )
