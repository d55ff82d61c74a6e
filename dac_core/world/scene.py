"""Scenes of the synthetic world: specs, the renderer, captions and edit cases.

A scene is a structured spec: a background (colour and texture) and one to three objects,
each with a shape, colour, size and position. Two details are in the spec but not in the
caption, like the many details of a real photo that no caption names: each object's height
(`dy`, pixels above or below the middle) and the phase of the stripes or checks (`phase`).
A caption does not fix the image; only an edit that keeps the source's details preserves
it. `render` draws a scene deterministically and `caption` describes it in plain English.
A `Case` is an edit (a source and a target scene): `default_cases` are the benchmark's,
`DEMO_CASE` is the demo's. `dac_core.world.checker` measures an image against a spec.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..demo import SOURCE_IMAGE
from ..files import atomic_path, write_json

SIZE = 64  # pixels; the world is drawn at this size (the demo model's native size)
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {  # well separated in RGB; objects use the first six
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUND_COLOURS = tuple(COLOURS)
TEXTURES = ("plain", "striped", "checked")
SIZES = {"small": 6, "large": 9}  # radius in pixels at SIZE = 64
POSITIONS = {"left": 12, "center": 32, "right": 52}  # x of the object's centre; y is the middle
STRIPE = 8  # period of stripes and checks in pixels
# Objects stand up to this many pixels above or below the middle. The height is not in the
# caption, so a text-to-image model can only hedge over it; at 8 px the shipped model drew small
# objects twice (one copy per guessed height) in 31 of 49 failed images, at 2 px it stops.
MAX_DY = 2


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str  # left, center or right: the x of its centre
    dy: int = 0  # height of its centre below the middle, in pixels (not in the caption)


@dataclass(frozen=True)
class Scene:
    background: str
    texture: str
    objects: tuple[Obj, ...] = field(default_factory=tuple)
    phase: int = 0  # shift of the stripes or checks, in pixels (not in the caption)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        scene = cls(data["background"], data["texture"], tuple(Obj(**o) for o in data["objects"]),
                    data.get("phase", 0))
        return validate(scene)


def validate(scene: Scene) -> Scene:
    """Raise ValueError naming what is wrong with a spec; return it unchanged if valid."""
    if scene.background not in BACKGROUND_COLOURS:
        raise ValueError(f"background {scene.background!r} is not one of {', '.join(BACKGROUND_COLOURS)}")
    if scene.texture not in TEXTURES:
        raise ValueError(f"texture {scene.texture!r} is not one of {', '.join(TEXTURES)}")
    if not (isinstance(scene.phase, int) and 0 <= scene.phase < STRIPE):
        raise ValueError(f"phase {scene.phase!r} is not an integer from 0 to {STRIPE - 1}")
    if not 1 <= len(scene.objects) <= 3:
        raise ValueError(f"a scene has one to three objects, not {len(scene.objects)}")
    seen = set()
    for o in scene.objects:
        for attr, allowed in (("shape", SHAPES), ("colour", OBJECT_COLOURS), ("size", SIZES), ("position", POSITIONS)):
            if getattr(o, attr) not in allowed:
                raise ValueError(f"object {attr} {getattr(o, attr)!r} is not one of {', '.join(allowed)}")
        if not (isinstance(o.dy, int) and -MAX_DY <= o.dy <= MAX_DY):
            raise ValueError(f"object dy {o.dy!r} is not an integer from {-MAX_DY} to {MAX_DY}")
        if o.position in seen:
            raise ValueError(f"two objects at position {o.position!r}")
        if o.colour == scene.background:
            raise ValueError(f"a {o.colour} object on a {o.colour} background cannot be seen")
        seen.add(o.position)
    return scene


def _shade(rgb, amount: float) -> tuple[int, int, int]:
    """Lighter (amount > 0) or darker (amount < 0) version of a colour, for textures."""
    target = 255 if amount > 0 else 0
    return tuple(int(round(c + (target - c) * abs(amount))) for c in rgb)


def texture_colours(scene: Scene) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    base = COLOURS[scene.background]
    second = _shade(base, -0.35) if sum(base) > 300 else _shade(base, 0.35)
    return base, second


def texture_pattern(texture: str, phase: int = 0) -> np.ndarray:
    """Boolean [SIZE, SIZE]: where a texture shows its second tone (plain: nowhere)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    half = STRIPE // 2
    if texture == "plain":
        return np.zeros((SIZE, SIZE), bool)
    if texture == "striped":
        return ((xx + phase) // half) % 2 == 1
    return (((xx + phase) // half) + ((yy + phase) // half)) % 2 == 1


def _background(scene: Scene) -> np.ndarray:
    a, b = texture_colours(scene)
    pick = texture_pattern(scene.texture, scene.phase)
    out = np.empty((SIZE, SIZE, 3), np.uint8)
    out[:] = a
    out[pick] = b
    return out


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return pts
    return None


def object_mask(obj: Obj) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of one object as `render` draws it (read-only)."""
    return _mask(obj.shape, obj.size, obj.position, obj.dy)


def objects_mask(*scenes: Scene) -> np.ndarray:
    """Boolean [SIZE, SIZE] union of the objects' masks of every scene given."""
    mask = np.zeros((SIZE, SIZE), bool)
    for scene in scenes:
        for obj in scene.objects:
            mask |= object_mask(obj)
    return mask


@functools.cache
def _mask(shape: str, size: str, position: str, dy: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(img)
    obj = Obj(shape, "red", size, position, dy)
    cx, cy, r = POSITIONS[obj.position], SIZE / 2 + obj.dy, SIZES[obj.size]
    poly = _polygon(obj.shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    mask = np.asarray(img) > 127
    mask.setflags(write=False)
    return mask


def render(scene: Scene):
    """The scene as a 64x64 RGB PIL image. Deterministic: the same spec, the same pixels."""
    from PIL import Image

    validate(scene)
    out = _background(scene)
    for obj in scene.objects:
        out[object_mask(obj)] = COLOURS[obj.colour]
    return Image.fromarray(out, "RGB")


_ORDER = tuple(POSITIONS)


def caption(scene: Scene) -> str:
    """Plain English, objects from left to right: 'a small red circle on the left and a large
    blue square on the right on a striped green background'."""
    where = {"left": "on the left", "center": "in the middle", "right": "on the right"}
    parts = [f"a {o.size} {o.colour} {o.shape} {where[o.position]}"
             for o in sorted(scene.objects, key=lambda o: _ORDER.index(o.position))]
    objects = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    texture = "" if scene.texture == "plain" else f"{scene.texture} "
    return f"{objects} on a {texture}{scene.background} background"


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    background = rng.choice(BACKGROUND_COLOURS)
    n = n_objects or rng.randint(1, 3)
    positions = rng.sample(list(POSITIONS), n)
    colours = [c for c in OBJECT_COLOURS if c != background]
    objects = tuple(Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(list(SIZES)), p,
                        rng.randint(-MAX_DY, MAX_DY)) for p in positions)
    return Scene(background, rng.choice(TEXTURES), objects, rng.randrange(STRIPE))


# --- edits --------------------------------------------------------------------------------

EDIT_TYPES = ("manipulation", "replacement", "addition", "removal", "style", "size")


@dataclass(frozen=True)
class Case:
    """An edit: the source scene and the target scene; prompts come from `caption`."""

    edit: str
    source: Scene
    target: Scene

    @property
    def source_prompt(self) -> str:
        return caption(self.source)

    @property
    def target_prompt(self) -> str:
        return caption(self.target)

    def to_json(self) -> dict:
        return {"edit": self.edit, "source": self.source.to_json(), "target": self.target.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Case:
        if data.get("edit") not in EDIT_TYPES:
            raise ValueError(f"edit {data.get('edit')!r} is not one of {', '.join(EDIT_TYPES)}")
        return cls(data["edit"], Scene.from_json(data["source"]), Scene.from_json(data["target"]))


def make_edit(edit: str, source: Scene, rng: random.Random) -> Case:
    """A target scene that differs from `source` by one edit of the given type."""
    objs = list(source.objects)
    i = rng.randrange(len(objs))
    if edit == "manipulation":  # colour
        choices = [c for c in OBJECT_COLOURS if c not in (objs[i].colour, source.background)]
        objs[i] = replace(objs[i], colour=rng.choice(choices))
    elif edit == "replacement":  # shape
        objs[i] = replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
    elif edit == "size":
        objs[i] = replace(objs[i], size="large" if objs[i].size == "small" else "small")
    elif edit == "addition":
        if len(objs) == 3:
            raise ValueError("addition needs a scene with a free position")
        free = [p for p in POSITIONS if p not in {o.position for o in objs}]
        colours = [c for c in OBJECT_COLOURS if c != source.background]
        objs.append(Obj(rng.choice(SHAPES), rng.choice(colours), rng.choice(list(SIZES)), rng.choice(free),
                        rng.randint(-MAX_DY, MAX_DY)))
    elif edit == "removal":
        if len(objs) < 2:
            raise ValueError("removal needs a scene with two or three objects (a scene keeps at least one)")
        objs.pop(i)
    elif edit == "style":  # background texture
        return Case(edit, source, replace(source, texture=rng.choice([t for t in TEXTURES if t != source.texture])))
    else:
        raise ValueError(f"edit {edit!r} is not one of {', '.join(EDIT_TYPES)}")
    return Case(edit, source, validate(replace(source, objects=tuple(objs))))


def edit_types_for(n_objects: int) -> tuple[str, ...]:
    """The edit types a scene of `n_objects` objects admits: an addition needs a free
    position (one or two objects), a removal must leave an object (two or three)."""
    return tuple(e for e in EDIT_TYPES
                 if not (e == "addition" and n_objects >= len(POSITIONS)) and not (e == "removal" and n_objects < 2))


def default_cases(per_type: int = 6, seed: int = 0, n_objects: int = 2) -> list[Case]:
    """The benchmark's default case set, fixed by seed: `per_type` source scenes, each edited
    once per edit type. Every source has two objects, the one count that admits all six
    edits (an addition needs a free position, a removal one of two or three objects); a
    method that fits a model to the source (DAC's UNet LoRA) fits it once per source, not
    per case. `n_objects` 1 or 3 gives sources with that many objects, each edited once per
    edit type it admits (`edit_types_for`: five); 2, the default, is the benchmark's set."""
    if n_objects not in (1, 2, 3):
        raise ValueError(f"a scene has one to three objects, not {n_objects}")
    rng = random.Random(seed)
    cases = []
    for _ in range(per_type):
        source = random_scene(rng, n_objects)
        cases += [make_edit(edit, source, rng) for edit in edit_types_for(n_objects)]
    return cases


def save_cases(cases: list[Case], path: str) -> None:
    write_json(path, [c.to_json() for c in cases])


def load_cases(path: str) -> list[Case]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a case file is a JSON list of cases")
    cases = []
    for k, item in enumerate(data):
        try:
            cases.append(Case.from_json(item))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: case {k}: {e}") from None
    return cases


# The edit of `dac-edit --demo` (`dac_core.demo`, whose prompts are these scenes' captions):
# the circle turns green; the square, the background and the details no caption names (the
# objects' heights, the stripes' phase) must stay.
DEMO_CASE = Case("manipulation",
                 Scene("blue", "striped", (Obj("circle", "red", "large", "left", dy=-2),
                                           Obj("square", "yellow", "small", "right", dy=2)), phase=3),
                 Scene("blue", "striped", (Obj("circle", "green", "large", "left", dy=-2),
                                           Obj("square", "yellow", "small", "right", dy=2)), phase=3))


def write_demo_source(path: str = SOURCE_IMAGE) -> None:
    """Render the demo's source picture (the bundled PNG is this, byte for byte in pixels)."""
    with atomic_path(path) as tmp:
        render(DEMO_CASE.source).save(tmp, format="PNG")
