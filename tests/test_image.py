import numpy as np
import pytest
from PIL import Image

from dac_core.errors import DACError
from dac_core.image import fit_size, image_to_tensor, load_image


def test_fit_size_keeps_aspect_and_multiples_of_8():
    w, h = fit_size(1024, 768, 512)
    assert w % 8 == 0 and h % 8 == 0
    assert abs(w / h - 1024 / 768) < 0.03
    assert abs(w * h - 512 * 512) / (512 * 512) < 0.05
    assert fit_size(512, 512, 512) == (512, 512)
    assert fit_size(3000, 10, 64) [1] == 8  # never below one latent pixel


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (20, 12), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16))
    else:
        img = rgb.convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('I;16', 'CMYK') else 'png'}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 12)
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert out.getpixel((0, 0)) == (156, 156, 156)
    t = image_to_tensor(out, (16, 8))
    assert t.shape == (1, 3, 8, 16) and t.min() >= -1 and t.max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_missing_and_non_images_are_named(tmp_path):
    with pytest.raises(DACError, match=r"image '.*nope.png' does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "notes.png"
    bad.write_text("hello, not a picture")
    with pytest.raises(DACError, match=r"image '.*notes.png' is not an image"):
        load_image(bad)
