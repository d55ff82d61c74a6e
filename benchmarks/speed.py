"""Time per step and peak memory of DAC's three stages, against the floors they cannot beat.

For each model size and stage, each variant runs in a fresh process (so each peak memory is
its own) on the diffusers backend, with the stage functions of dac_core themselves:

- Abduction-1 (UNet LoRA U, rank 512, trains): `reference` (as the reference scripts
  compute: every LoRA on the activations, peft's operations, torch's default AdamW;
  `DiffusersBackend(exact_reference=True)`), `auto` (the default: each layer the cheaper
  path, fused AdamW) and the floor `bare`: the same loss and AdamW training the adapted
  weights themselves, no LoRA.
- Abduction-2 (text-encoder LoRA Delta, rank 4, trains through U frozen at gamma(t)):
  `reference`, `auto`, and the floor `bare`: no U, the text encoder's adapted weights
  trained (the UNet computes no weight gradients).
- Counterfactual sampling (DDIM, cfg 4, U at gamma(t), Delta at -1): `reference`, `auto`,
  and the floor `fixed U`: U multiplied into the UNet's weights once, no LoRA.

Sizes: `tiny` (the tests' UNet, 32/64 channels, 64 px), `mid` (64/128/256 channels,
128 px) and `sd21` (Stable Diffusion 2.1-base's UNet and text encoder, random weights,
512 px). s/step is the median over the measured steps after warm-up; peak memory is the
process's peak RSS on the CPU, torch.cuda.max_memory_allocated on CUDA, and what the stage
added to the memory held after loading the model and the LoRAs (the stage's own cost).

    python benchmarks/speed.py [--sizes tiny,mid,sd21] [--steps N] [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _env import environment, peak_rss_mb, rss_mb  # noqa: E402
from sd_shapes import OPENCLIP_H, SD21  # noqa: E402

STAGES = {"abduction1": ("reference", "auto", "bare"), "abduction2": ("reference", "auto", "bare"),
          "sampling": ("reference", "auto", "fixed U")}
SIZES = ("tiny", "mid", "sd21")
SIDE = {"tiny": 64, "mid": 128, "sd21": 512}
WARMUP = {"tiny": 3, "mid": 2, "sd21": 1}
MEASURED = {"tiny": 8, "mid": 6, "sd21": 2}  # steps measured after warm-up, unless --steps says
UNET_RANK, TEXT_RANK = 512, 4
PROMPT = "a red disc with a hat"


def pipeline(size: str):
    from dac_core import tiny
    from dac_core.build import build_sd_pipeline

    if size == "tiny":
        return tiny.tiny_pipeline("sd1")
    if size == "mid":
        unet = {**tiny.UNET_CONFIG, "block_out_channels": (64, 128, 256), "sample_size": 16,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
        text, scheduler = tiny.TEXT_CONFIG, tiny.SCHEDULER_CONFIG
    else:
        unet = {**SD21, "sample_size": 64}
        text = {**OPENCLIP_H, "hidden_act": "gelu", "max_position_embeddings": 77, "projection_dim": 512}
        scheduler = {**tiny.SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    return build_sd_pipeline(unet, tiny.VAE_CONFIG, text, scheduler, tiny.tiny_tokenizer(), 0)


def _bare_fit(backend, weights, latents, cond_fn, steps, progress):
    """The stages' loop (same draws, loss and AdamW) training `weights` themselves."""
    import torch

    from dac_core import stages

    for w in weights:
        w.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=1e-4, betas=stages.ADAM_BETAS, weight_decay=stages.WEIGHT_DECAY,
                                  eps=stages.ADAM_EPS, fused=backend.device.type in ("cpu", "cuda") or None)
    generator = torch.Generator().manual_seed(42)
    for step in range(steps):
        x0 = latents.sample(1, generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.randint(0, backend.num_train_timesteps, (1,), generator=generator)
        loss = backend.loss(x0, noise, t.to(backend.device), cond_fn()).mean()
        loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step + 1, steps, None)


def child(size: str, stage: str, variant: str, steps: int, device: str, dtype: str) -> dict:
    import torch

    from dac_core import stages
    from dac_core.backend import TEXT_DELTA, UNET, LatentDistribution
    from dac_core.diffusers_backend import DiffusersBackend
    from dac_core.lora import fresh_lora

    backend = DiffusersBackend(pipeline(size), device=device, dtype=dtype, exact_reference=variant == "reference")
    side = SIDE[size] // backend.latent_factor
    g = torch.Generator().manual_seed(0)
    latents = LatentDistribution(torch.randn(1, 4, side, side, generator=g).to(backend.device),
                                 0.1 * torch.ones(1, 4, side, side, device=backend.device))
    u = fresh_lora(backend.lora_shapes(UNET), UNET_RANK, g)
    delta = fresh_lora(backend.lora_shapes(TEXT_DELTA), TEXT_RANK, g)
    for layer in (*u.layers.values(), *delta.layers.values()):  # a trained LoRA's up is not zero
        layer.up.normal_(0, 1e-3, generator=g)
    times: list[float] = []

    def progress(step, total, loss=None):
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    total = WARMUP[size] + steps
    cuda = backend.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()  # model and LoRAs in memory
    start = time.perf_counter()
    if stage == "abduction1":
        if variant == "bare":
            with torch.no_grad():
                cond = backend.encode_prompts([PROMPT])
            weights = [backend.unet.get_submodule(n).weight for n in backend._targets(UNET).values()]
            _bare_fit(backend, weights, latents, lambda: cond, total, progress)
        else:
            stages.abduct_unet_lora(backend, latents, PROMPT, stages.TrainSettings(total, rank=UNET_RANK),
                                    progress=progress)
    elif stage == "abduction2":
        if variant == "bare":
            text = backend._model_of(TEXT_DELTA)  # the text encoder(s), by kohya prefix
            weights = [text.get_submodule(n).weight for n in backend._targets(TEXT_DELTA).values()]
            _bare_fit(backend, weights, latents, lambda: backend.encode_prompts([PROMPT]), total, progress)
        else:
            stages.abduct_text_lora(backend, latents, PROMPT, u, stages.TrainSettings(total, rank=TEXT_RANK),
                                    eta=0.8, progress=progress)
    else:
        unet_lora = u
        if variant == "fixed U":
            with torch.no_grad():  # multiplied into the weights once, before sampling
                for stem, name in backend._targets(UNET).items():
                    w = backend.unet.get_submodule(name).weight
                    w += u.layers[stem].delta().to(w)
            unet_lora = None
        stages.counterfactual_sample(backend, PROMPT, unet_lora, delta, (SIDE[size], SIDE[size]), steps=total,
                                     progress=progress, decode=False)
    durations = [b - a for a, b in zip([start, *times[:-1]], times)][WARMUP[size]:]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"size": size, "stage": stage, "variant": variant, "s_per_step": statistics.median(durations),
            "steps_measured": len(durations), "peak_mb": round(peak), "added_mb": round(peak - loaded),
            **environment(str(backend.device), dtype)}


def ratio(rows: list[dict], size: str, stage: str, a: str, b: str, key: str = "s_per_step") -> float | None:
    found = {r["variant"]: r[key] for r in rows if r["size"] == size and r["stage"] == stage}
    return found[a] / found[b] if a in found and b in found else None


def markdown(rows: list[dict]) -> str:
    head = ("| model, side | stage (floor) | s/step: reference | auto | floor | auto / floor | auto / reference "
            "| peak MB: reference | auto | floor | added by the stage, MB: reference | auto | auto / reference |")
    lines = [head, "|" + "---|" * 13]
    for size in SIZES:
        for stage, variants in STAGES.items():
            got = {r["variant"]: r for r in rows if r["size"] == size and r["stage"] == stage}
            if len(got) < 3:
                continue
            act, auto, floor = (got[v] for v in variants)
            lines.append(
                f"| {size}, {SIDE[size]} px | {stage} ({variants[2]}) | {act['s_per_step']:.3f} | "
                f"{auto['s_per_step']:.3f} | {floor['s_per_step']:.3f} | "
                f"{auto['s_per_step'] / floor['s_per_step']:.2f} | {auto['s_per_step'] / act['s_per_step']:.2f} | "
                f"{act['peak_mb']} | {auto['peak_mb']} | {floor['peak_mb']} | {act['added_mb']} | {auto['added_mb']} | "
                f"{auto['added_mb'] / max(act['added_mb'], 1):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps per variant, after warm-up (default: tiny 8, mid 6, sd21 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", help="write every row here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--child", nargs=3, metavar=("SIZE", "STAGE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(child(*args.child, args.steps or MEASURED[args.child[0]], device, args.dtype)))
        return
    rows = []
    for size in args.sizes.split(","):
        for stage in args.stages.split(","):
            for variant in STAGES[stage]:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", size, stage, variant,
                                      "--steps", str(args.steps or MEASURED[size]), "--device", device,
                                      "--dtype", args.dtype],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    sys.exit(f"{size} {stage} {variant} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{size:<5} {stage:<11} {variant:<11} {row['s_per_step']:8.3f} s/step "
                      f"{row['peak_mb']:7d} MB peak, "
                      f"{row['added_mb']:6d} MB added", flush=True)
    env = {k: rows[0][k] for k in ("device", "dtype", "threads", "torch")}
    print(f"\n{env}\n")
    print(markdown(rows))
    if args.json:
        from dac_core.files import write_json

        write_json(args.json, {"environment": env, "rows": rows}, indent=2)
    if args.markdown:
        from dac_core.files import atomic_path

        with atomic_path(args.markdown) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
