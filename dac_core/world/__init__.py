"""The lab: a synthetic world in which edits can be checked exactly, a small text-to-image
model of it and the edit-quality benchmark. The library (the rest of `dac_core`) never
imports it.

- `scene`: scene specs, the renderer, captions and edit cases (re-exported here);
- `checker`: an image measured against a spec (`check`, `blobs`; re-exported here);
- `model`: the world model's configs, tokenizer and untrained pipeline;
- `train`: its training, `python -m dac_core.world.train --out DIR`;
- `evaluate`: how often a model draws unseen captions right;
- `bench`: the benchmark, `python -m dac_core.world.bench`.

    from dac_core import world as W
    W.check(case.target, image, reference=W.render(case.source), reference_scene=case.source)
"""

from .checker import ObjectCheck, Report, blobs, check
from .scene import (
    BACKGROUND_COLOURS,
    COLOURS,
    DEMO_CASE,
    EDIT_TYPES,
    MAX_DY,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    STRIPE,
    TEXTURES,
    Case,
    Obj,
    Scene,
    caption,
    default_cases,
    edit_types_for,
    load_cases,
    make_edit,
    object_mask,
    objects_mask,
    random_scene,
    render,
    save_cases,
    texture_colours,
    texture_pattern,
    validate,
    write_demo_source,
)

__all__ = [
    "BACKGROUND_COLOURS", "COLOURS", "DEMO_CASE", "EDIT_TYPES", "MAX_DY", "OBJECT_COLOURS", "POSITIONS", "SHAPES",
    "SIZE", "SIZES", "STRIPE", "TEXTURES", "Case", "Obj", "ObjectCheck", "Report", "Scene", "blobs", "caption",
    "check", "default_cases", "edit_types_for", "load_cases", "make_edit", "object_mask", "objects_mask",
    "random_scene", "render", "save_cases", "texture_colours", "texture_pattern", "validate", "write_demo_source",
]
