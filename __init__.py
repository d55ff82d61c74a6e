"""DAC for ComfyUI: Doubly Abductive Counterfactual inference for text-based image editing.

This file is what ComfyUI imports when it loads the pack from custom_nodes/. It must stay
cheap: no torch, no comfy, no downloads at import time. The algorithm lives in `dac_core/`
(usable without ComfyUI); the ComfyUI nodes live in `nodes/`.
"""

__version__ = "0.1.0"
