import io

import numpy as np
import pytest
from PIL import Image

from vqa.errors import InputError
from vqa.images import MAX_PIXELS, open_image


def encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("make, fmt", [
    (lambda: Image.new("L", (20, 10), 128), "PNG"),
    (lambda: Image.new("1", (20, 10), 1), "PNG"),
    (lambda: Image.new("P", (20, 10), 3), "PNG"),
    (lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
    (lambda: Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)), "PNG"),
    (lambda: Image.new("LA", (20, 10), (10, 255)), "PNG"),
])
def test_every_mode_becomes_rgb(make, fmt):
    image = open_image(encode(make(), fmt))
    assert image.mode == "RGB" and image.size == (20, 10)


def test_transparency_is_composited_on_white_and_cmyk_keeps_colour():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_image(encode(rgba)).getpixel((0, 0)) == (255, 255, 255)
    red = open_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")).getpixel((4, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_sixteen_bit_range_is_scaled_not_clipped():
    array = np.zeros((4, 4), dtype=np.uint16)
    array[:, 2:] = 60000
    image = open_image(encode(Image.fromarray(array)))
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((3, 0)) == (255, 255, 255)


def test_animated_images_give_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = open_image(data).getpixel((4, 4))
    assert r > 200 and b < 50


def test_empty_corrupt_and_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="empty"):
        open_image(b"")
    with pytest.raises(InputError, match="not a readable image"):
        open_image(b"GIF89a but not really")
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:300]
    with pytest.raises(InputError, match="not a readable image|could not be decoded"):
        open_image(truncated)
    with pytest.raises(InputError, match="not found: .*nope.png"):
        open_image(tmp_path / "nope.png")


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000 x 20000 PNG of one colour compresses to a few hundred KB.
    bomb = encode(Image.new("L", (20000, 20000), 0))
    assert len(bomb) < 2_000_000
    with pytest.raises(InputError, match=f"over the limit of {MAX_PIXELS} pixels"):
        open_image(bomb)


def test_huge_jpeg_decodes_downscaled():
    huge = encode(Image.new("RGB", (12000, 6000), (0, 200, 0)), "JPEG", quality=50)
    image = open_image(huge)
    assert image.width * image.height <= MAX_PIXELS and image.width / image.height == 2
    assert image.getpixel((10, 10))[1] > 150


def test_arrays_from_gradio_are_accepted():
    assert open_image(np.zeros((5, 6, 3), dtype=np.uint8)).size == (6, 5)
    assert open_image(np.zeros((5, 6, 4), dtype=np.uint8)).mode == "RGB"
    with pytest.raises(InputError, match="shape"):
        open_image(np.zeros((5,), dtype=np.uint8))
