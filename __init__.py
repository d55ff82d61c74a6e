"""DAC for ComfyUI: Doubly Abductive Counterfactual inference for text-based image editing.

This file is what ComfyUI imports when it loads the pack from custom_nodes/. It must stay
cheap: no torch, no comfy, no downloads at import time. The algorithm lives in `dac_core/`
(usable without ComfyUI); the ComfyUI nodes live in `nodes/` and are imported only when
ComfyUI asks for them.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes.dac_nodes import comfy_entrypoint as entrypoint

    return await entrypoint()
