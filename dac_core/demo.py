"""The embedded demo, `dac-edit --demo`: the world model that ships with the package, the
bundled source picture, the edit's prompts and DAC's settings scaled to that model.

Constants only, so that the library can run the demo without the lab (`dac_core.world`),
where the same edit is a case of scenes (`dac_core.world.DEMO_CASE`, whose captions are
these prompts) and the model was trained (`python -m dac_core.world.train`).
"""

from __future__ import annotations

import os

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SHIPPED_MODEL = os.path.join(_ASSETS, "world_model")  # a diffusers folder
SOURCE_IMAGE = os.path.join(_ASSETS, "demo_source.png")  # the demo case's source scene, rendered

# A colour edit of one of two objects: the other object, the background and the details no
# caption names (the objects' heights, the stripes' phase) must stay.
SOURCE_PROMPT = "a large red circle on the left and a small yellow square on the right on a striped blue background"
TARGET_PROMPT = "a large green circle on the left and a small yellow square on the right on a striped blue background"

# DAC on the world model: the reference defaults scaled to a 4.7 M-parameter UNet (32-128
# channels; rank 32 is about half rank there), to the demo's 3 minutes on 2 CPU cores and
# to the benchmark's 45 minutes. Measured: the UNet LoRA reproduces the source (PSNR ~30 dB
# outside the objects) from about 150-200 steps at lr 5e-4 (100 steps: 13 dB on some
# sources); the text LoRA scored the same after 50 steps as after 100 (6 cases, 2 seeds);
# a benchmark run at 50 text steps and 20 sampling steps was on course for 47 min, hence 40
# and 16 (DDIM, trailing spacing); 300 + 300 steps at lr 1e-4 took 241 s and kept the
# demo's stripes less well (PSNR 17 dB against 23). Used by `dac-edit --demo` and the
# benchmark (`dac_core.world.bench`).
# Clipped at norm 1 (paper defaults: no clipping): every figure of the demo and the
# benchmark was measured so.
SETTINGS = dict(unet_steps=200, text_steps=40, unet_rank=32, text_rank=4, learning_rate=5e-4, max_grad_norm=1.0,
                eta=0.8, sample_steps=16, cfg=4.0)  # names of dac_core.params


def model_path() -> str:
    """The world model that ships with the package (a diffusers folder)."""
    if not os.path.isfile(os.path.join(SHIPPED_MODEL, "model_index.json")):
        from .errors import DACError

        raise DACError(f"no world model in {SHIPPED_MODEL} (none ships yet): train one with "
                       "`python -m dac_core.world.train --out DIR` and pass --model DIR")
    return SHIPPED_MODEL
