"""Time per step of DAC's three stages in the ComfyUI backend against the diffusers backend,
on the same weights.

Each stage runs with the stage functions of dac_core on both backends: Abduction-1 (UNet
LoRA U, rank 512, trains), Abduction-2 (text-encoder LoRA Delta, rank 4, trains through U
frozen at gamma(t)) and counterfactual sampling (DDIM, cfg 4, U at gamma(t), Delta at -1),
float32, batch 1. Variants:

- `diffusers`: DiffusersBackend as it runs by default (each LoRA layer the cheaper path of
  dac_core.lora_layers, U frozen multiplied out once, fused AdamW);
- `comfy`: the ComfyUI backend of this checkout (nodes/comfy_backend.py), as the nodes run it
  (built under inference mode, trained under inference_mode(False) + enable_grad);
- `comfy-weight`, `comfy-activation`: the same with every LoRA forced through the weights or
  onto the activations (`ComfyBackend(lora_path=...)`, where the backend has that choice);
- `comfy-before`: the ComfyUI backend of another commit (`--before REV`, extracted with
  git archive into a temporary folder), the same script driving it.

Same weights: `tiny` is tests/comfy_tiny.py's UNet and text encoder (tiny_model / tiny_clip
and parity_pipeline, 32/64 channels, 64 px); `mid` (64/128/256 channels, 128 px, the
layout of benchmarks/speed.py's mid UNet) and `sd21` (Stable Diffusion 2.1-base's UNet,
v-prediction, 512 px) are built in ComfyUI from their LDM configs, initialised as
comfy_tiny._init_ (seeded), and the same tensors are loaded into a diffusers
UNet2DConditionModel through ComfyUI's own key map. The text encoder stays small: the
tests' CLIP for tiny and mid, and for sd21 a two-layer OpenCLIP-H-wide one (1024 wide, so
the UNet's cross-attention has its real width): sd21 times the UNet's stages, not SD 2.1's
text encoder.

Timing, two modes (`--mode`), both made for a machine shared with other work:

- `steps` (default for tiny and mid): every variant of a (size, stage) in one process, each
  stage in its own thread, one step each in turn (a baton handed on at each step's end, so
  one computes at a time): neighbouring steps of all variants see the same load. The ratio
  to `diffusers` is taken step by step (each variant's k-th step against diffusers' k-th)
  and its median reported, with its range.
- `processes` (default for sd21, whose variants do not fit in memory together): each
  (stage, variant) in a fresh process, `--rounds` times, the variants' order reversed every
  other round; the ratio is taken per round. Each process also reports its peak resident
  memory ("added": the peak minus the memory held once the models and LoRAs were loaded).

s/step is the median over all measured steps (after warm-up) of a variant. ComfyUI computes
attention with PyTorch's SDPA (`--use-pytorch-cross-attention`, its default on NVIDIA GPUs,
and what diffusers uses) unless `--comfy-attention default` (on a CPU ComfyUI then uses its
sub-quadratic attention). `--gradient-checkpointing` turns it on in both backends (what
Abduction-1/2 at SD size need to fit in about 20 GB).

Denormal floats are flushed to zero (torch.set_flush_denormal) in every process: with the
random N(0, 0.02) weights some activations of the mid UNet fall into the denormal range,
where a CPU computes many times slower (a diffusers forward of the mid UNet took 2.4 s
instead of 0.11 s); trained weights do not do that, and the flag changes nothing else here.

A process is stopped when its resident memory passes `--max-rss-gb` or the machine's
available memory falls under 1 GiB (the row then says so), so that a size too large for the
machine does not take memory from other work.

`--layers`: instead of whole stages, time every LoRA'd layer of the UNet alone (each distinct
layer shape at the number of positions it sees at the size's resolution, times how many
layers share it): forward + backward as in Abduction-1 (the LoRA trains) and Abduction-2 (U
frozen, gradients to the input only), forward only as in sampling, through ComfyUI's weight
wrapper and on the activations, and which of the two dac_core.lora_layers' cost model picks.
It needs no memory beyond one layer, so it also covers sizes whose whole stages do not fit.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_speed.py [--sizes tiny,mid,sd21]
        [--stages abduction1,abduction2,sampling] [--variants diffusers,comfy,...] [--mode steps|processes]
        [--rounds N] [--steps N] [--before REV] [--gradient-checkpointing] [--json out.json] [--layers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from _env import environment, peak_rss_mb, rss_mb  # noqa: E402

STAGES = ("abduction1", "abduction2", "sampling")
SIZES = ("tiny", "mid", "sd21")
VARIANTS = ("diffusers", "comfy", "comfy-weight", "comfy-activation", "comfy-before")
SIDE = {"tiny": 64, "mid": 128, "sd21": 512}
WARMUP = {"tiny": 3, "mid": 2, "sd21": 1}
MEASURED = {"tiny": 8, "mid": 6, "sd21": 2}  # steps measured after warm-up (--mode processes), unless --steps
MEASURED_INTERLEAVED = {"tiny": 20, "mid": 12, "sd21": 2}  # the same, --mode steps
UNET_RANK, TEXT_RANK = 512, 4
PROMPT = "a red disc with a hat"
ETA = 0.8

# The LDM (ComfyUI) configs of the mid and SD 2.1 UNets, and their diffusers twins.
_LDM_COMMON = {"image_size": 32, "in_channels": 4, "out_channels": 4, "legacy": False, "use_spatial_transformer": True,
               "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False}
MID_LDM = {**_LDM_COMMON, "model_channels": 64, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 4],
           "transformer_depth": [1, 1, 0], "transformer_depth_output": [1, 1, 1, 1, 0, 0],
           "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 8, "num_head_channels": -1,
           "use_linear_in_transformer": False}
SD21_LDM = {**_LDM_COMMON, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
            "context_dim": 1024, "num_heads": -1, "num_head_channels": 64, "use_linear_in_transformer": True}
# OpenCLIP-H's width and heads, two layers read (ComfyUI builds one more, which it never reads)
SD21_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 2,
             "projection_dim": 1024}


def diffusers_unet_config(size: str) -> dict:
    from sd_shapes import SD21

    from dac_core import tiny

    if size == "mid":  # benchmarks/speed.py's mid UNet
        return {**tiny.UNET_CONFIG, "block_out_channels": (64, 128, 256), "sample_size": 16,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    return {**SD21, "sample_size": 64}


def flavour(size: str) -> str:
    return "sd2" if size == "sd21" else "sd1"


def text_config(size: str) -> dict | None:
    return SD21_TEXT if size == "sd21" else None


# --- models ---------------------------------------------------------------------------------
# --share-weights: the UNet's tensors every variant of this process uses (size -> LDM state dict)
SHARED: dict[str, dict] = {}
SHARE = False


def comfy_unet(size: str):
    """A ModelPatcher of the size's UNet, built in ComfyUI, weights as comfy_tiny._init_ (seeded).
    With SHARE, a second call builds the model on the meta device and gives it the first's
    tensors (its own modules, so its own weight functions and object patches)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy_tiny
    import torch
    from comfy import model_base

    if size == "tiny":
        return comfy_tiny.tiny_model("sd1")
    ldm = MID_LDM if size == "mid" else SD21_LDM
    cls = comfy.supported_models.SD15 if size == "mid" else comfy.supported_models.SD20
    supported = cls({**ldm, "dtype": torch.float32})
    supported.set_inference_dtype(torch.float32, comfy.model_management.unet_manual_cast(torch.float32,
                                                                                        torch.device("cpu")))
    supported.unet_config.update(num_heads=ldm["num_heads"], num_head_channels=ldm["num_head_channels"])
    kind = model_base.ModelType.V_PREDICTION if size == "sd21" else model_base.ModelType.EPS
    if SHARE and size in SHARED:
        model = model_base.BaseModel(supported, model_type=kind, device="meta")
        model.diffusion_model.load_state_dict(SHARED[size], strict=True, assign=True)
        assert not [n for n, t in model.named_parameters() if t.is_meta]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_base.BaseModel(supported, model_type=kind, device="cpu")
            comfy_tiny._init_(model.diffusion_model)
        if SHARE:
            SHARED[size] = model.diffusion_model.state_dict()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def diffusers_pipeline(size: str, comfyui: str):
    """The diffusers pipeline with the same UNet and text-encoder weights as comfy_models(size)."""
    import comfy.utils
    import comfy_tiny
    import torch
    from diffusers import UNet2DConditionModel

    pipe = comfy_tiny.parity_pipeline(comfyui, flavour(size), text_config(size))
    if size == "tiny":
        return pipe
    ldm = MID_LDM if size == "mid" else SD21_LDM
    patcher = None if SHARE and size in SHARED else comfy_unet(size)
    ldm_sd = SHARED[size] if patcher is None else patcher.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(ldm)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(size))
    sd = {d: ldm_sd[k] for d, k in mapping.items() if k in ldm_sd}
    assert len(sd) == len(ldm_sd), set(ldm_sd) - set(mapping.values())
    unet.load_state_dict(sd, strict=True, assign=True)  # the very tensors ComfyUI's UNet holds
    assert not [n for n, t in (*unet.named_parameters(), *unet.named_buffers()) if t.is_meta]
    del patcher, ldm_sd, sd
    pipe.unet = unet
    return pipe


def comfy_models(size: str):
    import comfy_tiny

    return comfy_unet(size), comfy_tiny.tiny_clip(flavour(size), text_config=text_config(size))


# --- one (size, stage, variant) in this process ---------------------------------------------
def import_comfy(comfyui: str, attention: str) -> None:
    sys.path.insert(0, comfyui)
    import comfy.cli_args
    import comfy_tiny

    comfy.cli_args.args.use_pytorch_cross_attention = attention == "pytorch"
    comfy_tiny.import_comfy(comfyui)


def import_pack(root: str, name: str = "dac_pack"):
    """The pack at `root` as ComfyUI imports it (a package, here `name`): its ComfyUI backend,
    stages, backend names and LoRA modules."""
    import importlib

    from tools.pack import import_pack as imported

    imported(root, name)
    return tuple(importlib.import_module(f"{name}.{m}") for m in ("nodes.comfy_backend", "dac_core.stages",
                                                                    "dac_core.backend", "dac_core.lora"))


class Variant:
    """One variant's backend, its own stage functions and LoRA module, and its LoRAs/latents."""

    def __init__(self, size: str, name: str, comfyui: str, before_root: str | None, checkpointing: bool = False,
                 share_from: Variant | None = None):
        import torch

        self.name, self.size = name, size
        if name == "diffusers":
            from dac_core import backend as backend_mod
            from dac_core import lora as lora_mod
            from dac_core import stages
            from dac_core.diffusers_backend import DiffusersBackend

            self.backend = DiffusersBackend(diffusers_pipeline(size, comfyui), device="cpu", dtype="float32",
                                            gradient_checkpointing=checkpointing)
            self.comfy_module = None
        else:
            root, package = (before_root, "dac_pack_before") if name == "comfy-before" else (ROOT, "dac_pack")
            self.comfy_module, stages, backend_mod, lora_mod = import_pack(root, package)
            options = {"lora_path": name.split("-")[1]} if name in ("comfy-weight", "comfy-activation") else {}
            options["gradient_checkpointing"] = checkpointing
            model, clip = comfy_models(size)
            with torch.inference_mode():  # as ComfyUI's executor runs a node
                self.backend = self.comfy_module.ComfyBackend(model, clip, None, **options)
        self.stages, self.names = stages, backend_mod
        side = SIDE[size] // self.backend.latent_factor
        g = torch.Generator().manual_seed(0)
        self.latents = backend_mod.LatentDistribution(torch.randn(1, 4, side, side, generator=g),
                                                      0.1 * torch.ones(1, 4, side, side))
        if share_from is not None:  # the same LoRA tensors (this pack's classes): no second copy in memory
            self.u, self.delta = (
                lora_mod.LoRA({k: lora_mod.LoRALayer(v.down, v.up, v.alpha) for k, v in x.layers.items()})
                for x in (share_from.u, share_from.delta))
            return
        self.u = lora_mod.fresh_lora(self.backend.lora_shapes(backend_mod.UNET), UNET_RANK, g)
        self.delta = lora_mod.fresh_lora(self.backend.lora_shapes(backend_mod.TEXT_DELTA), TEXT_RANK, g)
        for layer in (*self.u.layers.values(), *self.delta.layers.values()):  # a trained LoRA's up is not zero
            layer.up.normal_(0, 1e-3, generator=g)

    def run(self, stage: str, steps: int, progress) -> None:
        """The stage, as the nodes run it on ComfyUI (sampling under inference mode, training
        with gradients inside it) and as the CLI runs it on diffusers."""
        import torch

        stages, size = self.stages, self.size
        if stage == "sampling":
            with torch.inference_mode() if self.comfy_module else torch.no_grad():
                stages.counterfactual_sample(self.backend, PROMPT, self.u, self.delta, (SIDE[size], SIDE[size]),
                                             eta=ETA, steps=steps, progress=progress, decode=False)
            return
        with torch.inference_mode(False), torch.enable_grad():
            if stage == "abduction1":
                stages.abduct_unet_lora(self.backend, self.latents, PROMPT, stages.TrainSettings(steps, rank=UNET_RANK),
                                        progress=progress)
            else:
                stages.abduct_text_lora(self.backend, self.latents, PROMPT, self.u,
                                        stages.TrainSettings(steps, rank=TEXT_RANK), eta=ETA, progress=progress)

    def release(self) -> None:
        if self.comfy_module is not None:
            clip = self.backend.clip
            self.comfy_module.release(self.backend.model, clip.patcher if clip is not None else None)

    def attention(self) -> str:
        import comfy.ldm.modules.attention

        return comfy.ldm.modules.attention.optimized_attention.__name__ if self.comfy_module else "SDPA (diffusers)"


def child(args) -> dict:
    """One (size, stage, variant) in this process (--mode processes)."""
    size, stage, variant = args.child
    import_comfy(args.comfyui, args.comfy_attention)
    import torch

    torch.set_flush_denormal(True)  # see the module's docstring
    v = Variant(size, variant, args.comfyui, args.pack_root, args.gradient_checkpointing)
    times: list[float] = []
    steps = args.steps or MEASURED[size]
    loaded = rss_mb()  # the models and LoRAs in memory
    start = time.perf_counter()
    v.run(stage, WARMUP[size] + steps, lambda *a: times.append(time.perf_counter()))
    durations = [b - a for a, b in zip([start, *times[:-1]], times)][WARMUP[size]:]
    peak = peak_rss_mb()
    return {"size": size, "stage": stage, "variant": variant, "s_per_step": statistics.median(durations),
            "durations": [round(d, 5) for d in durations], "peak_mb": round(peak), "added_mb": round(peak - loaded),
            "attention": v.attention(), "flush_denormal": True, "gradient_checkpointing": args.gradient_checkpointing,
            **environment("cpu", "float32")}


class Turns:
    """Threads that run one step each in turn: a thread hands the baton on at each step's end
    and waits for it to come back, so only one computes at a time."""

    def __init__(self, names: list[str]):
        self.names, self.current, self.finished = list(names), names[0], set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def hand_on(self, name: str, finished: bool = False) -> None:
        with self.cond:
            if finished:
                self.finished.add(name)
            i = self.names.index(name)
            for k in range(1, len(self.names) + 1):
                nxt = self.names[(i + k) % len(self.names)]
                if nxt not in self.finished:
                    self.current = nxt
                    break
            self.cond.notify_all()


def interleaved_child(args) -> list[dict]:
    """Every variant of one (size, stage) in this process, one step each in turn (--mode steps)."""
    size, stage = args.interleaved_child
    import_comfy(args.comfyui, args.comfy_attention)
    import torch

    torch.set_flush_denormal(True)
    global SHARE
    SHARE = args.share_weights
    names = args.variants.split(",")
    variants: dict[str, Variant] = {}
    for n in names:  # with --share-weights the variants share the UNet's and the LoRAs' tensors
        first = next(iter(variants.values()), None) if SHARE else None
        variants[n] = Variant(size, n, args.comfyui, args.pack_root, args.gradient_checkpointing, first)
    steps = WARMUP[size] + (args.steps or MEASURED_INTERLEAVED[size])
    turns = Turns(names)
    durations: dict[str, list[float]] = {n: [] for n in names}
    starts: dict[str, float] = {}
    errors: dict[str, BaseException] = {}

    def on_step(name):
        durations[name].append(time.perf_counter() - starts[name])
        turns.hand_on(name)
        turns.wait(name)
        starts[name] = time.perf_counter()

    def work(name):
        torch.set_flush_denormal(True)  # the floating-point mode is per thread
        turns.wait(name)
        starts[name] = time.perf_counter()
        try:
            variants[name].run(stage, steps, lambda *a: on_step(name))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors[name] = e
        finally:
            turns.hand_on(name, finished=True)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next(iter(errors.values()))
    rows = []
    base = durations.get("diffusers")
    for n in names:
        measured = durations[n][WARMUP[size]:]
        row = {"size": size, "stage": stage, "variant": n, "s_per_step": statistics.median(measured),
               "durations": [round(d, 5) for d in measured], "attention": variants[n].attention(),
               "flush_denormal": True, "gradient_checkpointing": args.gradient_checkpointing,
               **environment("cpu", "float32")}
        if base is not None:
            row["paired_ratios"] = [round(a / b, 4) for a, b in zip(measured, base[WARMUP[size]:])]
        rows.append(row)
    for v in variants.values():
        v.release()
    return rows


# --- the parent -------------------------------------------------------------------------------
def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_child(argv: list[str], max_rss_mb: float) -> tuple[dict | list | None, str]:
    """Run one child; stop it when it passes `max_rss_mb` or the machine runs short of memory."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stopped: list[str] = []

    def watch():
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                rss = 0
            if rss > max_rss_mb or mem_available_mb() < 1024:
                stopped.append(f"stopped at {rss:.0f} MB resident ({mem_available_mb():.0f} MB available): "
                               f"the limit is {max_rss_mb:.0f} MB")
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if stopped:
        return None, stopped[0]
    if proc.returncode:
        return None, f"failed (exit {proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), ""


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per (size, stage, variant): the median s/step over every measured step, and the median
    (and range) of its ratio to `diffusers`: per step, paired with diffusers' step of the same
    turn (--mode steps), or per round of processes (--mode processes)."""
    out = []
    keys = sorted({(r["size"], r["stage"]) for r in rows}, key=lambda k: (SIZES.index(k[0]), STAGES.index(k[1])))
    for size, stage in keys:
        here = [r for r in rows if r["size"] == size and r["stage"] == stage]
        base = {r["round"]: r["s_per_step"] for r in here if r["variant"] == "diffusers" and "s_per_step" in r}
        for variant in variants:
            mine = [r for r in here if r["variant"] == variant]
            done = [r for r in mine if "s_per_step" in r]
            row = {"size": size, "stage": stage, "variant": variant, "processes": len(done)}
            if not done:
                row["note"] = mine[0].get("note", "not run") if mine else "not run"
                out.append(row)
                continue
            paired = [q for r in done for q in r.get("paired_ratios", [])]
            ratios = paired or [r["s_per_step"] / base[r["round"]] for r in done if r["round"] in base]
            row.update({"s_per_step": statistics.median([d for r in done for d in r["durations"]]),
                        "steps_measured": sum(len(r["durations"]) for r in done),
                        "ratio_pairs": "steps" if paired else "rounds"})
            if all("peak_mb" in r for r in done):
                row.update({"peak_mb": max(r["peak_mb"] for r in done), "added_mb": max(r["added_mb"] for r in done)})
            if ratios:
                row.update({"vs_diffusers": statistics.median(ratios),
                            "vs_diffusers_range": [min(ratios), max(ratios)]})
            out.append(row)
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| model, side | stage | variant | s/step (median) | / diffusers: median (range) | paired by "
             "| steps measured | peak MB | added MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        head = f"| {r['size']}, {SIDE[r['size']]} px | {r['stage']} | {r['variant']} |"
        if "s_per_step" not in r:
            lines.append(f"{head} {r['note'].splitlines()[0]} | | | | | |")
            continue
        ratio = (f"{r['vs_diffusers']:.2f} ({r['vs_diffusers_range'][0]:.2f}-{r['vs_diffusers_range'][1]:.2f})"
                 if "vs_diffusers" in r else "")
        lines.append(f"{head} {r['s_per_step']:.3f} | {ratio} | {r['ratio_pairs']} | {r['steps_measured']} | "
                     f"{r.get('peak_mb', '')} | {r.get('added_mb', '')} |")
    return "\n".join(lines)


def extract(rev: str) -> str:
    """The tree of commit `rev` in a temporary folder (removed at exit)."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="dac-before-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def stages_main(args) -> dict:
    variants = args.variants.split(",")
    before = extract(args.before) if "comfy-before" in variants else None
    common = ["--comfyui", args.comfyui, "--comfy-attention", args.comfy_attention, "--variants", args.variants]
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    if args.share_weights:
        common.append("--share-weights")
    if args.steps:
        common += ["--steps", str(args.steps)]
    if before:
        common += ["--pack-root", before]
    rows = []

    def limit():
        return args.max_rss_gb * 1024 if args.max_rss_gb else mem_available_mb() - 1536

    for size in args.sizes.split(","):
        mode = args.mode or ("processes" if size == "sd21" else "steps")
        for rnd in range(args.rounds or (1 if mode == "steps" else 2)):
            for stage in args.stages.split(","):
                if mode == "steps":
                    got, note = run_child(["--interleaved-child", size, stage, *common], limit())
                    for row in got or [{"size": size, "stage": stage, "variant": v, "note": note} for v in variants]:
                        row["round"] = rnd
                        rows.append(row)
                        print(f"round {rnd} {size:<5} {stage:<11} {row['variant']:<17} "
                              + (f"{row['s_per_step']:8.3f} s/step" if got else note.splitlines()[0]), flush=True)
                    continue
                order = variants if rnd % 2 == 0 else variants[::-1]
                for variant in order:
                    if any(r.get("note") and r["size"] == size and r["stage"] == stage and r["variant"] == variant
                           for r in rows):
                        continue  # stopped or failed in an earlier round: not again
                    row, note = run_child(["--child", size, stage, variant, *common], limit())
                    if row is None:
                        rows.append({"size": size, "stage": stage, "variant": variant, "round": rnd, "note": note})
                        print(f"round {rnd} {size:<5} {stage:<11} {variant:<17} {note.splitlines()[0]}", flush=True)
                        continue
                    row["round"] = rnd
                    rows.append(row)
                    print(f"round {rnd} {size:<5} {stage:<11} {variant:<17} {row['s_per_step']:8.3f} s/step "
                          f"{row['peak_mb']:7d} MB peak {row['added_mb']:6d} MB added", flush=True)
    done = [r for r in rows if "s_per_step" in r]
    env = {k: done[0][k] for k in ("device", "dtype", "threads", "torch")} if done else {}
    env.update({"comfyui": comfyui_version(args.comfyui),
                "comfy_attention": sorted({r["attention"] for r in done if r["variant"] != "diffusers"}),
                "before": args.before if before else None, "load_average_at_end": os.getloadavg()})
    summary = summarise(rows, variants)
    print(f"\n{env}\n\n{markdown(summary)}")
    return {"environment": env, "summary": summary, "rows": rows}


def comfyui_version(comfyui: str) -> str:
    try:
        with open(os.path.join(comfyui, "comfyui_version.py")) as f:
            return next(line.split("=")[1].strip().strip("\"'") for line in f if line.startswith("__version__"))
    except (OSError, StopIteration):
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--variants", default="diffusers,comfy", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--mode", choices=("steps", "processes"), default=None,
                   help="steps: all variants in one process, one step each in turn; processes: a fresh process "
                        "per variant, interleaved (default: steps, processes for sd21)")
    p.add_argument("--rounds", type=int, default=None, help="processes per (stage, variant) (default: 1 with "
                                                             "--mode steps, 2 with processes)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps per process, after warm-up (default: tiny 20, mid 12 in turns; "
                        "tiny 8, mid 6, sd21 2 in separate processes)")
    p.add_argument("--before", default=None, help="the commit whose ComfyUI backend `comfy-before` runs")
    p.add_argument("--comfy-attention", default="pytorch", choices=("pytorch", "default"))
    p.add_argument("--share-weights", action="store_true",
                   help="--mode steps: the variants' UNets hold the same weight tensors (SD 2.1 size then fits)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="both backends recompute the UNet's blocks in the backward pass (less memory)")
    p.add_argument("--max-rss-gb", type=float, default=None,
                   help="stop a process past this resident memory (default: what is available, less 1.5 GiB)")
    p.add_argument("--layers", action="store_true", help="time each LoRA'd layer alone instead of whole stages")
    p.add_argument("--repeats", type=int, default=5, help="--layers: timed repeats per layer shape (median)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    p.add_argument("--child", nargs=3, metavar=("SIZE", "STAGE", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--layers-child", metavar="SIZE", help=argparse.SUPPRESS)
    p.add_argument("--interleaved-child", nargs=2, metavar=("SIZE", "STAGE"), help=argparse.SUPPRESS)
    p.add_argument("--pack-root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.comfyui:
        p.error("give --comfyui or set COMFYUI_PATH to a ComfyUI checkout")
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.layers_child:
        print(json.dumps(layers_child(args)))
        return
    if args.interleaved_child:
        print(json.dumps(interleaved_child(args)))
        return
    result = layers_main(args) if args.layers else stages_main(args)
    if args.json:
        from dac_core.files import write_json

        write_json(args.json, result, indent=2)


# --- --layers: each LoRA'd layer alone ---------------------------------------------------------
# regime: (batch, the LoRA trains, gradients flow)
REGIMES = {"abduction1": (1, True, True), "abduction2": (1, False, True), "sampling": (2, False, False)}
LAYER_PATHS = ("before", "weight", "activation")  # before: the wrapper as it was (no cache)


def unet_layer_inputs(size: str, comfy_backend) -> dict[tuple, int]:
    """(kind, weight shape, stride, padding, input shape without the batch) -> how many of the
    UNet's LoRA'd layers have it, from one forward of the UNet at the size's resolution."""
    import comfy.utils
    import torch

    patcher = comfy_unet(size)
    with torch.inference_mode():
        keys = comfy_backend.ComfyBackend(patcher, None)._unet_keys  # the LoRA'd layers' weight keys
    seen: dict[str, tuple] = {}
    hooks = []
    for key in keys.values():
        layer = comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
        kind = "linear" if isinstance(layer, torch.nn.Linear) else "conv"
        conv = (tuple(layer.stride), tuple(layer.padding)) if kind == "conv" else (None, None)

        def hook(m, a, key=key, kind=kind, conv=conv):
            seen.setdefault(key, (kind, tuple(m.weight.shape), *conv, tuple(a[0].shape[1:])))

        hooks.append(layer.register_forward_pre_hook(hook))
    side = SIDE[size] // 8
    unet = patcher.model.diffusion_model
    context_dim = {"tiny": 32, "mid": 32, "sd21": 1024}[size]
    with torch.no_grad():
        unet(torch.randn(1, 4, side, side), timesteps=torch.tensor([500.0]), context=torch.randn(1, 77, context_dim))
    for h in hooks:
        h.remove()
    assert len(seen) == len(keys), (len(seen), len(keys))
    groups: dict[tuple, int] = {}
    for sig in seen.values():
        groups[sig] = groups.get(sig, 0) + 1
    return groups


def layers_child(args) -> dict:
    """Time every distinct LoRA'd layer of the size's UNet under each regime and path."""
    import importlib
    import types

    size = args.layers_child
    import_comfy(args.comfyui, args.comfy_attention)
    import comfy.ops
    import torch

    torch.set_flush_denormal(True)
    comfy_backend, _, _, _ = import_pack(ROOT)
    cost = importlib.import_module("dac_pack.dac_core.lora_layers")
    groups = unet_layer_inputs(size, comfy_backend)
    g = torch.Generator().manual_seed(0)
    rows = []
    for (kind, wshape, stride, padding, in_shape), count in sorted(groups.items(), key=lambda kv: str(kv[0])):
        ops = comfy.ops.disable_weight_init
        if kind == "linear":
            layer = ops.Linear(wshape[1], wshape[0])
        else:
            layer = ops.Conv2d(wshape[1], wshape[0], wshape[2:], stride=stride, padding=padding)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02, generator=g)
            layer.bias.zero_()
        fan_in = layer.weight[0].numel()
        down = torch.randn(UNET_RANK, fan_in, generator=g).view(UNET_RANK, *wshape[1:]) / fan_in**0.5
        up = torch.randn(wshape[0], UNET_RANK, generator=g).view(wshape[0], UNET_RANK, *[1] * (len(wshape) - 2)) * 1e-3
        row = {"kind": kind, "weight": list(wshape), "stride": stride, "input": list(in_shape), "count": count,
               "times": {}, "choice": {}, "positions": {}}
        for regime, (batch, trains, grad) in REGIMES.items():
            x = torch.randn(batch, *in_shape, generator=g)
            with torch.set_grad_enabled(grad):
                row["choice"][regime] = ("weight" if cost.weight_path_cheaper(layer, x, UNET_RANK, trains)
                                         else "activation")
            row["positions"][regime] = cost.positions(layer, x)
            runs = {}
            for path in LAYER_PATHS:
                w = comfy_backend.LoRAWrapper(down, up, 1.0, comfy_backend.Strength(0.8), cache=path != "before")
                w.requires_grad_(trains)
                original = types.MethodType(type(layer).forward, layer)
                patch = comfy_backend.LayerLoRAs(layer, original, "activation" if path == "activation" else "weight")
                patch.wrappers = [w]
                runs[path] = (patch, w)
            xs = x.requires_grad_(grad)
            times: dict[str, list[float]] = {p: [] for p in LAYER_PATHS}
            for rep in range(args.repeats + 1):  # the first round warms up
                for path in (LAYER_PATHS if rep % 2 else LAYER_PATHS[::-1]):
                    patch, w = runs[path]
                    layer.weight_function, layer.bias_function = [w], [comfy_backend._identity]
                    t0 = time.perf_counter()
                    if grad:
                        patch(xs).sum().backward()
                    else:
                        with torch.no_grad():
                            patch(xs)
                    dt = time.perf_counter() - t0
                    xs.grad = w.down.grad = w.up.grad = None
                    if rep:
                        times[path].append(dt)
            row["times"][regime] = {p: statistics.median(v) for p, v in times.items()}
            del runs
        rows.append(row)
        print(f"{kind:<6} {str(wshape):<22} {str(in_shape):<18} x{count:<3} " + "  ".join(
            f"{r}: " + "/".join(f"{row['times'][r][p]:.4f}" for p in LAYER_PATHS) + f" ({row['choice'][r][0]})"
            for r in REGIMES), file=sys.stderr, flush=True)
    return {"size": size, "rows": rows, **environment("cpu", "float32")}


def layer_totals(result: dict) -> dict:
    """Per regime: the sum over layers (times how many share a shape) of each path's time, of the
    path the cost model picks, and of the faster path of each layer as measured."""
    totals = {}
    for regime in REGIMES:
        rows = result["rows"]
        t = {p: sum(r["count"] * r["times"][regime][p] for r in rows) for p in LAYER_PATHS}
        t["cost model's pick"] = sum(r["count"] * r["times"][regime][r["choice"][regime]] for r in rows)
        t["faster of the two, measured"] = sum(r["count"] * min(r["times"][regime]["weight"],
                                                                r["times"][regime]["activation"]) for r in rows)
        t["layers on the activations (cost model)"] = sum(r["count"] for r in rows
                                                         if r["choice"][regime] == "activation")
        t["layers"] = sum(r["count"] for r in rows)
        totals[regime] = t
    return totals


def layers_main(args) -> dict:
    results = []
    for size in args.sizes.split(","):
        argv = ["--layers-child", size, "--comfyui", args.comfyui, "--repeats", str(args.repeats)]
        limit = args.max_rss_gb * 1024 if args.max_rss_gb else mem_available_mb() - 1536
        result, note = run_child(argv, limit)
        if result is None:
            print(f"{size}: {note}", flush=True)
            results.append({"size": size, "note": note})
            continue
        result["totals"] = layer_totals(result)
        results.append(result)
        print(f"\n{size}, {SIDE[size]} px, rank {UNET_RANK}: seconds per call of all LoRA'd layers "
              "(forward + backward for the abductions, forward for sampling)")
        for regime, t in result["totals"].items():
            print(f"  {regime:<11} " + ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                                 for k, v in t.items()), flush=True)
    return {"layers": results, "rank": UNET_RANK, "repeats": args.repeats}


if __name__ == "__main__":
    main()
