"""What each DAC node looks like to ComfyUI: ids, names, inputs, outputs, tooltips.

Plain data, importable without ComfyUI, so the test suite checks the schemas and the
example workflows in CI; `nodes.dac_nodes` turns each entry into a V3 `io.Schema`.
Sampler and scheduler lists are filled in from ComfyUI at load time ("COMBO" with
options=None below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..dac_core import params as P

CATEGORY = "DAC"
DAC_LORA = "DAC_LORA"  # a dac_core.lora.LoRA: UNet or text-encoder layers with DAC metadata
LOSS_MAP = "LOSS_MAP"  # ComfyUI's own loss-history type ({"loss": [...]}), plotted by its Plot Loss Graph node


@dataclass(frozen=True)
class In:
    name: str
    type: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    optional: bool = False
    multiline: bool = False
    options: tuple | None = None  # COMBO choices; None: filled from ComfyUI
    control_after_generate: bool = False
    is_list: bool = False  # takes a list (ComfyUI then hands the node every input as a list)

    @property
    def is_widget(self) -> bool:
        return self.type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class Out:
    name: str
    type: str
    tooltip: str


@dataclass(frozen=True)
class Node:
    id: str
    display_name: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    output_node: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def input_is_list(self) -> bool:
        """ComfyUI's list inputs are per node: every input comes as a list when one is a list."""
        return any(i.is_list for i in self.inputs)


def _param(param: P.Param, tooltip: str, name: str | None = None, **extra) -> In:
    """A widget input for a `dac_core.params` parameter: its default and range from there;
    `name` where the node scopes it (an abduction's `steps` is its stage's steps)."""
    kind = {int: "INT", float: "FLOAT", str: "STRING"}[param.kind]
    low = param.ui_low if param.low_open else param.low
    default = extra.pop("default", param.default)
    return In(name or param.name, kind, tooltip, default, low, param.high, param.ui_step, **extra)


_MODEL = In("model", "MODEL", "The base diffusion model (an SD 1.x, 2.x or SDXL checkpoint). It is never modified.")
_CLIP = In("clip", "CLIP", "The checkpoint's text encoder (SDXL: both, CLIP-L and bigG). It is never modified.")
_VAE = In("vae", "VAE", "Encodes the source photo into latents.")
_IMAGE = In("image", "IMAGE", "The one photo to edit (a batch of one image).")
_UNET_LORA = In("unet_lora", DAC_LORA, "The UNet LoRA from Abduct UNet LoRA (or Load DAC LoRA).")
_TEXT_LORA = In("text_lora", DAC_LORA, "The text-encoder LoRA from Abduct Text-Encoder LoRA (or Load DAC LoRA).")
_EXTRA = In("extra_text_lora", DAC_LORA, "Optional frozen extra text-encoder LoRA T fitted on the source prompt, for "
            "complex photos whose content would leak into the edit (kept at +1).", optional=True)
_ETA = _param(P.ETA, "Annealing: the UNet LoRA's strength at pure noise, rising to 1 at the clean end. Lower makes "
              "the edit easier but less faithful (paper: 0.4-0.8).")
# No control_after_generate: a seed that changed after every queue would retrain every time.
_SEED_TRAIN = _param(P.TRAIN_SEED, "Seed of the training noise, timesteps and LoRA init.", "seed")
_LR = _param(P.LEARNING_RATE, "AdamW learning rate (constant).")
_CLIP_NORM = _param(P.MAX_GRAD_NORM, "Clip the gradient norm to this value; 0 = no clipping (the default, as the "
                    "reference code really trains: its scripts ask for 1 but never clip).")
_DTYPE = In("training_dtype", "COMBO", "What the model computes in while training, whatever dtype the checkpoint "
            "is stored in (ComfyUI stores SD checkpoints in fp16 on most GPUs). fp32: exact, most memory. bf16: "
            "about half the activation memory, needs a GPU with bf16 (RTX 30xx / A100 or newer). fp16: as bf16 on "
            "any CUDA GPU, with loss scaling; steps whose gradients overflow are skipped and counted. LoRA weights "
            "and the optimizer stay float32 in every case.", "fp32", options=("fp32", "bf16", "fp16"))
_CHECKPOINTING = In("gradient_checkpointing", "BOOLEAN", "Recompute activations in the backward pass: less memory, "
                    "more time per step.", False)
_PREVIEW = In("preview_every", "INT", "Show a reconstruction preview every N steps (0: never).", 100, 0, 100000)
_BETA = _param(P.BETA, "Edit strength: the text-encoder LoRA is applied at -beta. -1 reconstructs the photo, values "
               "between change attributes gradually, above 1 exaggerates.")
_LOSS = Out("loss", LOSS_MAP, "Loss per step; connect to Plot Loss Graph to see it.")

ABDUCT_UNET = Node(
    "DACAbductUNetLoRA",
    "Abduct UNet LoRA",
    "DAC Abduction-1: over-fits a UNet LoRA to the photo with its source caption, so the model can reproduce the "
    "photo in every detail (fidelity). Train once per photo; changing only the target prompt or sampling settings "
    "does not re-run it.",
    (
        _MODEL, _CLIP, _VAE, _IMAGE,
        _param(P.SOURCE_PROMPT, "A caption of the photo as it is, e.g. 'A cat.'", multiline=True),
        _param(P.UNET_STEPS, "Training steps. 250-500 keep the model more editable, 1000 is the paper's.", "steps"),
        _LR,
        _param(P.UNET_RANK, "LoRA rank. 512 is near full rank for SD's layers (the paper's choice, about 2 GB of "
               "weights on SD 2.1); lower saves memory. SDXL: 128 trains on a 24 GB GPU (bf16, gradient "
               "checkpointing); 512 needs about 30 GB before activations.", "rank",
               default=P.UNET_RANK_DEFAULTS["sd"]),
        _SEED_TRAIN, _DTYPE, _CHECKPOINTING, _PREVIEW, _CLIP_NORM,
        In("init_lora", DAC_LORA, "Optional UNet LoRA to continue training from.", optional=True),
    ),
    (
        Out("unet_lora", DAC_LORA, "The UNet LoRA U."),
        Out("model", "MODEL", "The model with U at full strength: sample the source prompt to check the "
            "reconstruction."),
        _LOSS,
    ),
)

ABDUCT_TEXT = Node(
    "DACAbductTextLoRA",
    "Abduct Text-Encoder LoRA",
    "DAC Abduction-2: fits a small text-encoder LoRA so that the target caption reproduces the photo through the "
    "frozen, annealed UNet LoRA. It learns the 'visual transition' that Counterfactual Sample subtracts.",
    (
        _MODEL, _CLIP, _VAE, _IMAGE,
        _param(P.TARGET_PROMPT, "A caption of the wanted result, e.g. 'A cat wearing a wool cap.'", multiline=True),
        _UNET_LORA, _ETA,
        _param(P.TEXT_STEPS, "Training steps (paper: 1000).", "steps"),
        _LR,
        _param(P.TEXT_RANK, "LoRA rank of the text encoder (paper: 4).", "rank"),
        _SEED_TRAIN, _DTYPE, _CLIP_NORM, _CHECKPOINTING, _EXTRA,
    ),
    (Out("text_lora", DAC_LORA, "The text-encoder LoRA Delta."), _LOSS),
)

COUNTERFACTUAL = Node(
    "DACCounterfactualSample",
    "Counterfactual Sample",
    "DAC prediction: samples the target prompt from pure noise with the UNet LoRA at its annealed strength every "
    "step and the text-encoder LoRA subtracted (-beta). Decode the LATENT with VAE Decode.",
    (
        _MODEL, _CLIP, _UNET_LORA, _TEXT_LORA,
        _param(P.TARGET_PROMPT, "The target caption; leave empty to use the one the text-encoder LoRA was fitted on.",
               multiline=True),
        _param(P.NEGATIVE_PROMPT, "Negative prompt; it goes through the same -beta text encoder.", multiline=True),
        _ETA,
        _BETA,
        _param(P.SEED, "Sampling seed.", control_after_generate=True),
        _param(P.SAMPLE_STEPS, "Denoising steps.", "steps"),
        _param(P.CFG, "Classifier-free guidance scale (reference: 4)."),
        In("sampler_name", "COMBO", "Sampler.", "ddim"),
        In("scheduler", "COMBO", "Noise schedule.", "ddim_uniform"),
        _param(P.BATCH_SIZE, "Number of candidates K to sample (the paper picks the best of 8)."),
        In("latent", "LATENT", "Optional latent: its size is used (default: the source photo's size).", optional=True),
        In("positive", "CONDITIONING", "Optional positive conditioning to carry along (e.g. from ControlNet Apply): "
           "its extras (control, area, ...) are kept, its text embedding is replaced by the -beta encoding of "
           "target_prompt.", optional=True),
        In("negative", "CONDITIONING", "Optional negative conditioning to carry along, as positive.", optional=True),
        _EXTRA,
    ),
    (Out("latent", "LATENT", "The edited latent(s); decode with VAE Decode."),),
)

APPLY = Node(
    "DACApplyLoRAs",
    "Apply DAC LoRAs",
    "Returns a MODEL whose UNet LoRA strength follows DAC's annealing gamma(t) at every step of any sampler and "
    "scheduler, and a CLIP with the text-encoder LoRA at -beta. Use them with the stock CLIP Text Encode, "
    "ControlNet Apply, KSampler and upscaling nodes.",
    (_MODEL, _CLIP, _UNET_LORA, _TEXT_LORA, _ETA, _BETA, _EXTRA),
    (Out("model", "MODEL", "The model with the annealed UNet LoRA."),
     Out("clip", "CLIP", "The text encoder with the text-encoder LoRA at -beta.")),
)

SAVE = Node(
    "DACSaveLoRA",
    "Save DAC LoRA",
    "Saves the UNet and text-encoder LoRAs as one kohya-format .safetensors file in models/loras (the stock "
    "LoraLoader lists it: strength_model +1, strength_clip -1 approximates DAC without annealing).",
    (_UNET_LORA, _TEXT_LORA,
     In("filename_prefix", "STRING", "File name prefix inside models/loras.", "dac/edit")),
    (),
    output_node=True,
)

LOAD = Node(
    "DACLoadLoRA",
    "Load DAC LoRA",
    "Loads a file saved by Save DAC LoRA (or dac-edit's LoRA files) from models/loras.",
    (In("lora_name", "COMBO", "A LoRA file in models/loras holding DAC UNet and/or text-encoder layers."),),
    (Out("unet_lora", DAC_LORA, "The UNet LoRA U."), Out("text_lora", DAC_LORA, "The text-encoder LoRA Delta.")),
)

SWEEP = Node(
    "DACSweep",
    "DAC Sweep",
    "Samples every (eta, beta) cell of a DAC edit without retraining: one row per text-encoder LoRA, at the eta "
    "it was fitted with, one column per beta, every cell from the same seeds, so only the setting changes between "
    "neighbours. Outputs every cell's latents and a labelled grid image.",
    (
        _MODEL, _CLIP,
        In("vae", "VAE", "Decodes every cell's latents into the grid image."),
        _UNET_LORA,
        In("text_lora", DAC_LORA, "The text-encoder LoRA Delta, or a list of them, one per eta (e.g. Abduct "
           "Text-Encoder LoRA run over a list of eta values): one grid row each, sampled at the eta it was fitted "
           "with, since Abduction-2 depends on eta.", is_list=True),
        _param(P.TARGET_PROMPT, "The target caption; leave empty to use the one each text-encoder LoRA was fitted "
               "on.", multiline=True),
        _param(P.NEGATIVE_PROMPT, "Negative prompt; it goes through the same -beta text encoder.", multiline=True),
        In("betas", "STRING", f"Edit strengths, one grid column each: numbers separated by commas, each "
           f"{P.BETA.valid().removeprefix('a number ')}. The text-encoder LoRA is applied at -beta: 0 leaves it "
           "out, 1 is the default edit, above 1 exaggerates, -1 reconstructs the photo.", "0, 0.5, 1, 1.5"),
        _param(P.ETA, "Annealing (the UNet LoRA's strength at pure noise) for a text-encoder LoRA that does not "
               "record the eta it was fitted with; one from Abduct Text-Encoder LoRA is sampled at its own eta, "
               "the one its row is labelled with."),
        _param(P.SEED, "Sampling seed, the same in every cell (candidate i uses seed + i), so neighbouring cells "
               "differ only in beta or eta.", control_after_generate=True),
        _param(P.SAMPLE_STEPS, "Denoising steps of each cell.", "steps"),
        _param(P.CFG, "Classifier-free guidance scale (reference: 4)."),
        In("sampler_name", "COMBO", "Sampler.", "ddim"),
        In("scheduler", "COMBO", "Noise schedule.", "ddim_uniform"),
        _param(P.BATCH_SIZE, "Candidates K per cell (seed, seed + 1, ...), side by side in each grid cell."),
        In("source", "IMAGE", "Optional source photo, shown top left in the grid (blank without it); its size "
           "is used when the UNet LoRA does not record the source size.", optional=True),
    ),
    (
        Out("latent", "LATENT", "Every cell's latents in one batch: rows (eta) first, then columns (beta), then "
            "the K candidates."),
        Out("grid", "IMAGE", "The labelled grid: one row per eta, one column per beta, the source photo top left."),
    ),
)

NODES: tuple[Node, ...] = (ABDUCT_UNET, ABDUCT_TEXT, COUNTERFACTUAL, SWEEP, APPLY, SAVE, LOAD)
BY_ID = {node.id: node for node in NODES}
