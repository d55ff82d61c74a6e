"""ComfyUI side of the pack: thin V3 node classes over `dac_core` and a ComfyUI backend
that implements `dac_core.backend.DACBackend` on ComfyUI's MODEL / CLIP / VAE objects.

Everything that imports `comfy` lives here, never in `dac_core`.
"""
