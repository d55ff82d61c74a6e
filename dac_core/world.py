"""A synthetic world in which edits can be checked exactly.

A scene is a structured spec: a background (colour and texture) and one to three objects,
each with a shape, colour, size and position. Two details are in the spec but not in the
caption, like the many details of a real photo that no caption names: each object's height
(`dy`, pixels above or below the middle) and the phase of the stripes or checks (`phase`).
A caption does not fix the image; only an edit that keeps the source's details preserves
it. `render` draws it deterministically, `caption` describes it in plain English, and
`check` measures an image against a spec: per object whether shape, colour, size and
position match, and how well the region that should not change is preserved. The checker
only ever looks at pixels and specs; it is never tuned on any method's output.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .files import write_json

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
        if len(objs) != 2:
            raise ValueError("removal takes one of two objects")
        objs.pop(i)
    elif edit == "style":  # background texture
        return Case(edit, source, replace(source, texture=rng.choice([t for t in TEXTURES if t != source.texture])))
    else:
        raise ValueError(f"edit {edit!r} is not one of {', '.join(EDIT_TYPES)}")
    return Case(edit, source, validate(replace(source, objects=tuple(objs))))


def default_cases(per_type: int = 6, seed: int = 0) -> list[Case]:
    """The benchmark's default case set, fixed by seed: `per_type` source scenes, each edited
    once per edit type. Every source has two objects, the one count that admits all six
    edits (an addition needs a free position, a removal one of two objects); a method that
    fits a model to the source (DAC's UNet LoRA) fits it once per source, not per case."""
    rng = random.Random(seed)
    cases = []
    for _ in range(per_type):
        source = random_scene(rng, 2)
        cases += [make_edit(edit, source, rng) for edit in EDIT_TYPES]
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


# --- the checker ----------------------------------------------------------------------------

@dataclass
class ObjectCheck:
    expected: Obj
    found_shape: str | None
    found_colour: str | None
    found_size: str | None
    iou: float

    @property
    def shape_ok(self) -> bool:
        return self.found_shape == self.expected.shape

    @property
    def colour_ok(self) -> bool:
        return self.found_colour == self.expected.colour

    @property
    def size_ok(self) -> bool:
        return self.found_size == self.expected.size

    @property
    def position_ok(self) -> bool:  # something of the object's kind sits at its slot
        return self.found_shape is not None

    @property
    def ok(self) -> bool:
        return self.shape_ok and self.colour_ok and self.size_ok and self.position_ok


@dataclass
class Report:
    objects: list[ObjectCheck]
    background_ok: bool
    texture_ok: bool
    extra_objects: list[str]  # positions where something stands that the spec does not have
    psnr: float | None = None  # outside the objects of both specs, against the reference image
    mae: float | None = None

    @property
    def all_ok(self) -> bool:
        return all(o.ok for o in self.objects) and self.background_ok and self.texture_ok and not self.extra_objects


def _nearest(rgb, names) -> str:
    rgb = np.asarray(rgb, float)
    return min(names, key=lambda n: float(((np.asarray(COLOURS[n], float) - rgb) ** 2).sum()))


def _foreground(arr: np.ndarray, scene: Scene) -> np.ndarray:
    """Pixels nearer to some object colour than to both background tones of the scene."""
    tones = [np.asarray(c, float) for c in texture_colours(scene)]
    d_bg = np.minimum(*(((arr - t) ** 2).sum(-1) for t in tones))
    d_obj = np.min([((arr - np.asarray(COLOURS[c], float)) ** 2).sum(-1) for c in OBJECT_COLOURS
                    if c != scene.background], axis=0)
    return d_obj < d_bg


def _slot(position: str) -> np.ndarray:
    window = np.zeros((SIZE, SIZE), bool)
    x = POSITIONS[position]
    window[:, max(0, x - 10) : min(SIZE, x + 11)] = True
    return window


def _check_background(arr: np.ndarray, keep_out: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, texture) read off the pixels outside every object (and a margin around them)."""
    free = ~keep_out
    if free.sum() < 2 * STRIPE * STRIPE:  # object colours nearly everywhere: no background to read
        return None, None
    lum = arr.mean(-1)
    if lum[free].std() < 12:  # one tone
        return _nearest(np.median(arr[free], axis=0), BACKGROUND_COLOURS), "plain"
    low, high = np.percentile(lum[free], [5, 95])
    light = lum > (low + high) / 2
    # the texture whose pattern, at its best phase (not in the caption), agrees most
    agreement = {name: max(abs((light == texture_pattern(name, phase))[free].mean() - 0.5) for phase in range(STRIPE))
                 for name in ("striped", "checked")}
    texture = max(agreement, key=agreement.get)
    # Of the two tones, the base colour is the one that is (nearly) a palette colour; the
    # other is its lighter or darker shade.
    best = None
    for tone in (light, ~light):
        if not (free & tone).any():
            continue
        median = np.median(arr[free & tone], axis=0)
        name = _nearest(median, BACKGROUND_COLOURS)
        dist = float(((np.asarray(COLOURS[name], float) - median) ** 2).sum())
        if best is None or dist < best[1]:
            best = (name, dist)
    return best[0], texture


def check(scene: Scene, image, reference=None, reference_scene: Scene | None = None) -> Report:
    """Measure `image` (PIL or HxWx3 array, any size: resized to 64x64) against `scene`.

    With `reference` (the source image) and `reference_scene` (its spec), PSNR and mean
    absolute error are computed over the pixels outside the objects of both specs."""
    validate(scene)
    arr = _pixels(image)
    fg = _foreground(arr, scene)
    grown = {o.position: _dilate(object_mask(o), 1) for o in scene.objects}
    objects = []
    for obj in scene.objects:
        others = np.zeros((SIZE, SIZE), bool)
        for position, mask in grown.items():
            if position != obj.position:
                others |= mask
        blob = fg & _slot(obj.position) & ~others
        best, best_iou = None, 0.0
        for shape in SHAPES:
            for size in SIZES:
                for dy in range(-MAX_DY, MAX_DY + 1):  # the height is not in the caption: try all
                    template = _mask(shape, size, obj.position, dy)
                    inter = (template & blob).sum()
                    union = (template | blob).sum()
                    iou = inter / union if union else 0.0
                    if iou > best_iou:
                        best, best_iou = (shape, size, dy), iou
        if best is None or best_iou < 0.5:
            objects.append(ObjectCheck(obj, None, None, None, best_iou))
            continue
        core = _mask(best[0], best[1], obj.position, best[2]) & blob
        colour = _nearest(np.median(arr[core], axis=0), OBJECT_COLOURS) if core.any() else None
        objects.append(ObjectCheck(obj, best[0], colour, best[1], best_iou))
    masks = objects_mask(scene)
    around = _dilate(masks, 2)
    extra = [p for p in POSITIONS if p not in grown and (fg & _slot(p) & ~around).sum() > 20]
    colour, texture = _check_background(arr, around | _dilate(fg, 1))
    report = Report(objects, colour == scene.background, texture == scene.texture, extra)
    if reference is not None:
        reference = _pixels(reference)
        keep_out = objects_mask(scene, reference_scene) if reference_scene else masks
        outside = ~_dilate(keep_out, 2)
        diff = arr[outside] - reference[outside]
        mse = float((diff**2).mean())
        report.mae = float(np.abs(diff).mean())
        report.psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return report


def blobs(scene: Scene, image, position: str, min_pixels: int = 30) -> list[int]:
    """Sizes (pixels, largest first) of the separate patches of object colour, `min_pixels`
    or more (a small star has 55, a detached point of a star fewer), in the column
    where `scene` has its object at `position`: an object drawn twice shows as two. For
    looking into failures; `check` does not use it."""
    todo = _foreground(_pixels(image), scene) & _slot(position)
    sizes = []
    for y, x in zip(*np.nonzero(todo)):
        if not todo[y, x]:
            continue
        todo[y, x], stack, n = False, [(y, x)], 0
        while stack:  # flood fill, 4-connected
            a, b = stack.pop()
            n += 1
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < SIZE and 0 <= d < SIZE and todo[c, d]:
                    todo[c, d] = False
                    stack.append((c, d))
        if n >= min_pixels:
            sizes.append(n)
    return sorted(sizes, reverse=True)


def _pixels(image) -> np.ndarray:
    """An image as the checker reads it: HxWx3 floats, a PIL image resized to 64x64 first."""
    if not isinstance(image, np.ndarray):
        from PIL import Image

        image = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
    return image.astype(float)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out
