"""DAC: Doubly Abductive Counterfactual inference for text-based image editing (CVPR 2024).

The algorithm, importable without ComfyUI:

    from dac_core import edit
    result = edit("cat.jpg", source="A cat.", target="A cat wearing a wool cap.", model="path/or/hub-id")

or stage by stage with `dac_core.stages` on a backend (`dac_core.diffusers_backend`).
"""

__version__ = "0.1.0"
