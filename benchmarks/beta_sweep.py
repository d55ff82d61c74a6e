"""Why DAC loses on the world model: joint success against beta and Abduction-1's length.

On cases other than the benchmark's (`world.default_cases(2, seed=1)`: 2 per edit type),
for each Abduction-1 length it fits U and Δ once per case, then samples Abduction-1 only
(U, no Δ, no annealing) and DAC at each beta, with the benchmark's settings, seeds and
scores (`dac_core.world.bench`). Prints edit / keep / joint counts and mean PSNR per setting.

    python benchmarks/beta_sweep.py [--unet-steps 200,600] [--betas 0,0.25,0.5,1] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from dac_core import world as W
from dac_core.demo import model_path
from dac_core.diffusers_backend import DiffusersBackend
from dac_core.files import write_json
from dac_core.image import image_to_tensor, tensor_to_images
from dac_core.stages import TrainSettings, abduct_text_lora, abduct_unet_lora, counterfactual_sample
from dac_core.world import bench as B


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="world model folder (default: the shipped one)")
    p.add_argument("--unet-steps", default="200,600", help="Abduction-1 lengths, comma-separated")
    p.add_argument("--betas", default="0,0.25,0.5,1", help="betas, comma-separated")
    p.add_argument("--per-type", type=int, default=2, help="cases per edit type (default 2)")
    p.add_argument("--seeds", type=int, default=2, help="sampling seeds per setting (default 2)")
    p.add_argument("--json", help="write every score here")
    args = p.parse_args()
    s = B.Settings()
    backend = DiffusersBackend.from_model(args.model or model_path(), device="cpu")
    cases = W.default_cases(args.per_type, seed=1)
    rows = []
    start = time.time()
    for k, case in enumerate(cases):
        latents = backend.encode_image(image_to_tensor(W.render(case.source), (W.SIZE, W.SIZE)))
        for unet_steps in (int(x) for x in args.unet_steps.split(",")):
            train_u = TrainSettings(unet_steps, s.learning_rate, s.unet_rank, max_grad_norm=s.max_grad_norm)
            u = abduct_unet_lora(backend, latents, case.source_prompt, train_u).lora
            train_delta = TrainSettings(s.text_steps, s.learning_rate, s.text_rank, max_grad_norm=s.max_grad_norm)
            delta = abduct_text_lora(backend, latents, case.target_prompt, u, train_delta, eta=s.eta).lora

            def scores(text_lora, eta, beta, case=case, u=u):
                images = tensor_to_images(counterfactual_sample(
                    backend, case.target_prompt, u, text_lora, (W.SIZE, W.SIZE), eta=eta, beta=beta,
                    steps=s.sample_steps, cfg=s.cfg, seed=0, batch_size=args.seeds))
                return [B.score(case, image) for image in images]

            settings = {"Abduction-1 only": scores(None, 1.0, 1.0)}
            for beta in (float(x) for x in args.betas.split(",")):
                settings[f"DAC beta={beta:g}"] = scores(delta, s.eta, beta)
            for name, sc in settings.items():
                rows.append({"case": k, "edit": case.edit, "unet_steps": unet_steps, "setting": name,
                             "edit_ok": [x.edit_ok for x in sc], "keep": [x.preserved for x in sc],
                             "psnr": [x.psnr for x in sc]})
        print(f"case {k + 1}/{len(cases)} ({case.edit}) {time.time() - start:.0f} s", flush=True)
    totals: dict = defaultdict(lambda: [0, 0, 0, 0.0, 0])
    for r in rows:
        t = totals[(r["unet_steps"], r["setting"])]
        for e, kept, psnr in zip(r["edit_ok"], r["keep"], r["psnr"]):
            t[0] += e
            t[1] += kept
            t[2] += e and kept
            t[3] += psnr
            t[4] += 1
    for (unet_steps, name), (e, kept, joint, psnr, n) in totals.items():
        print(f"Abduction-1 {unet_steps} steps, {name}: edit {e}/{n} keep {kept}/{n} joint {joint}/{n} "
              f"PSNR {psnr / n:.1f} dB")
    print(f"{time.time() - start:.0f} s; {B.environment('cpu')}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
