"""Peak memory of DAC's two abductions inside ComfyUI, per training dtype.

Runs Abduct UNet LoRA and Abduct Text-Encoder LoRA (the nodes themselves, as ComfyUI's
executor runs them) on the SD1.5-shaped checkpoint the server tests generate
(tests/comfy_tiny.py: a one-level 320-channel UNet with 768-wide cross-attention, a full
CLIP-L text encoder, TAESD), loaded as CheckpointLoaderSimple loads it. Each dtype runs in
a fresh process, so each peak is its own:

- on a CUDA GPU: torch.cuda.max_memory_allocated during training, the checkpoint stored in
  fp16 as ComfyUI stores it there;
- on the CPU: the process's peak resident memory (ru_maxrss) and how much training added to
  the resident memory after loading. The checkpoint is stored in fp16 and ComfyUI is told
  the device computes in fp16 (as on a GPU); CPU fp16 arithmetic is slow, so keep steps low.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_training_memory.py [--steps 3] [--rank 64]
        [--size 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _env import cpu_name, peak_rss_mb, rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("fp32", "bf16", "fp16")


def child(args) -> dict:
    """One dtype, in this process: load, train both LoRAs, report the peaks as JSON."""
    sys.path[:0] = [args.comfyui, os.path.join(ROOT, "tests")]
    import comfy.cli_args

    cuda = args.device == "cuda"
    comfy.cli_args.args.cpu = not cuda
    comfy.cli_args.args.base_directory = tempfile.mkdtemp(prefix="dac-bench-")
    import comfy.model_management as mm
    import comfy.sd
    import comfy_tiny
    import numpy as np
    import torch

    if not cuda:
        mm.should_use_fp16 = lambda *a, **k: True  # ComfyUI stores and computes in fp16 as on a GPU
    options = {"dtype": torch.float16}
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, model_options=options,
                                                                te_model_options=options)
    comfy_tiny.import_pack()
    import importlib

    nodes = importlib.import_module("dac_pack.nodes.dac_nodes")
    from dac_core.tiny import demo_image

    image = torch.from_numpy(np.asarray(demo_image((args.size, args.size)), dtype=np.float32) / 255)[None]
    loaded_rss = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        u = nodes.AbductUNetLoRA.execute(model, clip, vae, image, "a red disc", args.steps, 1e-4, args.rank, 42,
                                         args.dtype, False, 0).args[0]
        t1 = time.perf_counter()
        unet_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        nodes.AbductTextLoRA.execute(model, clip, vae, image, "a red disc with a hat", u, 0.8, args.steps, 1e-4, 4,
                                     42, args.dtype)
    t2 = time.perf_counter()
    peak_rss = peak_rss_mb()
    return {
        "dtype": args.dtype, "device": torch.cuda.get_device_name() if cuda else cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps, "rank": args.rank,
        "size": args.size, "loaded_rss_mb": round(loaded_rss), "peak_rss_mb": round(peak_rss),
        "training_added_mb": round(peak_rss - loaded_rss),
        "unet_peak_cuda_mb": round(unet_peak) if cuda else None,
        "text_peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "unet_s_per_step": round((t1 - t0) / args.steps, 3), "text_s_per_step": round((t2 - t1) / args.steps, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="steps per abduction (default 3)")
    p.add_argument("--rank", type=int, default=64, help="UNet LoRA rank (default 64)")
    p.add_argument("--size", type=int, default=512, help="photo side in pixels (default 512)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of fp32, bf16, fp16")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (or COMFYUI_PATH)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.comfyui:
        p.error("give --comfyui or set COMFYUI_PATH to a ComfyUI checkout")
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "sd15_shaped.safetensors")
        subprocess.run([sys.executable, "-c", (
            f"import sys; sys.path[:0] = [{args.comfyui!r}, {os.path.join(ROOT, 'tests')!r}, {ROOT!r}]\n"
            "import tempfile, comfy.cli_args\n"
            "comfy.cli_args.args.cpu = True; comfy.cli_args.args.base_directory = tempfile.mkdtemp()\n"
            f"import comfy_tiny; comfy_tiny.save_sd15_checkpoint({checkpoint!r})")], check=True, cwd=ROOT)
        for dtype in args.dtypes.split(","):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--checkpoint", checkpoint,
                                  "--dtype", dtype, "--device", device, "--steps", str(args.steps), "--rank",
                                  str(args.rank), "--size", str(args.size), "--comfyui", args.comfyui],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{dtype} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"device {first['device']} ({device}), torch {first['torch']}, {first['threads']} threads; "
          f"SD1.5-shaped checkpoint stored in fp16, {args.size}x{args.size} photo, UNet LoRA rank {args.rank}, "
          f"{args.steps} steps per abduction")
    if device == "cuda":
        print(f"{'dtype':<6}{'Abduction-1 peak MB':>22}{'Abduction-2 peak MB':>22}{'s/step U':>10}{'s/step Δ':>10}")
        for r in rows:
            print(f"{r['dtype']:<6}{r['unet_peak_cuda_mb']:>22}{r['text_peak_cuda_mb']:>22}"
                  f"{r['unet_s_per_step']:>10}{r['text_s_per_step']:>10}")
    else:
        print(f"{'dtype':<6}{'loaded RSS MB':>15}{'peak RSS MB':>13}{'training added MB':>19}{'s/step U':>10}"
              f"{'s/step Δ':>10}")
        for r in rows:
            print(f"{r['dtype']:<6}{r['loaded_rss_mb']:>15}{r['peak_rss_mb']:>13}{r['training_added_mb']:>19}"
                  f"{r['unet_s_per_step']:>10}{r['text_s_per_step']:>10}")
    if args.json:
        sys.path.insert(0, ROOT)
        from dac_core.files import write_json

        write_json(args.json, rows, indent=2)


if __name__ == "__main__":
    main()
