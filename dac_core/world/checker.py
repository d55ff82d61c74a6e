"""The checker: an image measured against a scene spec (`dac_core.world.scene`).

Per object whether shape, colour, size and position match, whether the background colour
and texture are right and nothing stands where the spec has no object, and, against a
reference image, how well the region that should not change is kept (PSNR outside the
objects). It only ever looks at pixels and specs; it is never tuned on any method's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import (
    BACKGROUND_COLOURS,
    COLOURS,
    MAX_DY,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZES,
    STRIPE,
    Obj,
    Scene,
    _mask,
    object_mask,
    objects_mask,
    texture_colours,
    texture_pattern,
    validate,
)


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
