"""DAC: Doubly Abductive Counterfactual inference for text-based image editing (CVPR 2024).

The algorithm, importable without ComfyUI. The whole edit with a work folder:

    from dac_core.edit import EditParams, edit
    result = edit("cat.jpg", EditParams(source="A cat.", target="A cat wearing a wool cap.", model="path/or/hub-id"))

or stage by stage with `dac_core.stages` on a backend (`dac_core.diffusers_backend`).
"""

__version__ = "0.1.0"
