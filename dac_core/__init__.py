"""DAC: Doubly Abductive Counterfactual inference for text-based image editing (CVPR 2024).

The algorithm, importable without ComfyUI. The whole edit with a work folder:

    from dac_core.edit import EditParams, edit
    result = edit("cat.jpg", EditParams(source="A cat.", target="A cat wearing a wool cap.", model="path/or/hub-id"))

or stage by stage with `dac_core.stages` on a backend (`dac_core.diffusers_backend`).

`dac_core.world` is a lab on top of it (a synthetic world with an exact checker, a small
text-to-image model of that world, the edit-quality benchmark); nothing else in dac_core
imports it. `dac_core.demo` holds what `dac-edit --demo` needs.
"""

__version__ = "0.1.0"
