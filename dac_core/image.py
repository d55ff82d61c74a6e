"""Reading the source photo: any common mode, aspect ratio kept, sides multiples of 8."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .errors import DACError


def load_image(path: str | os.PathLike):
    """Open an image file as 8-bit RGB. Grayscale, RGBA, palette and 16-bit are converted."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DACError(f"image {path!r} does not exist")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise DACError(f"image {path!r} is not a readable file")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DACError(f"image {path!r} is not an image PIL can read (PNG, JPEG, WebP, ...): {e}") from None


def to_rgb(img):
    """8-bit RGB from any PIL mode; transparency is composited over white."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" and (img.mode.startswith("I;16") or arr.max() > 255) else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def fit_size(width: int, height: int, native_side: int, multiple: int = 8) -> tuple[int, int]:
    """(w, h) with the photo's aspect ratio, about native_side**2 pixels, sides multiples of 8."""
    scale = math.sqrt(native_side * native_side / (width * height))
    w = max(multiple, round(width * scale / multiple) * multiple)
    h = max(multiple, round(height * scale / multiple) * multiple)
    return w, h


def image_to_tensor(img, size: tuple[int, int]) -> torch.Tensor:
    """Resize (PIL bicubic, antialiased) to `size` = (w, h); return [1, 3, H, W] in [-1, 1]."""
    from PIL import Image

    img = to_rgb(img)
    if img.size != tuple(size):
        img = img.resize(tuple(size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def before_after(source, edited: list, source_caption: str, target_caption: str, min_side: int = 256):
    """One picture: the source photo, then each edited image, captions above, at least
    `min_side` pixels high (small images are enlarged without smoothing)."""
    from PIL import Image, ImageDraw

    w, h = edited[0].size
    scale = max(1, math.ceil(min_side / h))
    tiles = [source.convert("RGB").resize((w, h), Image.BICUBIC), *edited]
    tiles = [t.resize((w * scale, h * scale), Image.NEAREST) for t in tiles]
    pad, text_h = 6, 30
    out = Image.new("RGB", (pad + len(tiles) * (w * scale + pad), text_h + h * scale + pad), "white")
    draw = ImageDraw.Draw(out)
    for i, tile in enumerate(tiles):
        x = pad + i * (w * scale + pad)
        label = f"before: {source_caption}" if i == 0 else f"after: {target_caption}"
        lines = wrap(draw, label, w * scale)
        if len(lines) > 2:
            lines = [lines[0], lines[1][: max(1, len(lines[1]) - 3)] + "..."]
        draw.multiline_text((x, 2), "\n".join(lines), fill="black", spacing=2)
        out.paste(tile, (x, text_h))
    return out


def wrap(draw, text: str, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (a longer word keeps its own line)."""
    lines = [""]
    for word in text.split():
        if lines[-1] and draw.textlength(f"{lines[-1]} {word}") > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def labelled_grid(corner, corner_label: str, row_labels: list[str], column_labels: list[str], cells: list[list[list]],
                  min_side: int = 128):
    """A grid picture: `corner` (the source) top left, the column labels across the top row,
    the row labels down the first column, and cells[row][column] (a list of images, shown
    side by side) in between, enlarged without smoothing to at least `min_side` pixels high.
    Returns (picture, boxes): boxes[(row, column)] = (left, top) of each cell's first image."""
    from PIL import Image, ImageDraw

    w, h = cells[0][0][0].size
    k = max(len(images) for row in cells for images in row)
    scale = max(1, math.ceil(min_side / h))
    tw, th = w * scale, h * scale
    cw, pad, text_h = tw * k, 6, 30
    width = pad + (1 + len(column_labels)) * (cw + pad)
    out = Image.new("RGB", (width, pad + (1 + len(row_labels)) * (th + text_h + pad)), "white")
    draw = ImageDraw.Draw(out)

    def label(x: int, y: int, text: str, width: int) -> None:
        lines = wrap(draw, text, width)
        draw.multiline_text((x, y), "\n".join(lines[:2]), fill="black", spacing=2)

    def tile(img, x: int, y: int) -> None:
        out.paste(img.convert("RGB").resize((tw, th), Image.NEAREST), (x, y))

    tile(corner.convert("RGB").resize((w, h), Image.BICUBIC), pad, pad + text_h)
    label(pad, pad, corner_label, cw)
    for j, text in enumerate(column_labels):
        label(pad + (1 + j) * (cw + pad), pad + text_h + th // 2, text, cw)
    boxes = {}
    for i, text in enumerate(row_labels):
        y = pad + (1 + i) * (th + text_h + pad)
        label(pad, y + text_h + th // 2, text, cw)
        for j, images in enumerate(cells[i]):
            x = pad + (1 + j) * (cw + pad)
            boxes[(i, j)] = (x, y + text_h)
            for n, img in enumerate(images):
                tile(img, x + n * tw, y + text_h)
    return out, boxes
