import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from fixtures import ROOT, exif_jpeg
from PIL import Image
from timm.data import create_transform

from vqa.errors import InputError
from vqa.images import MAX_ASPECT_RATIO, MAX_PIXELS, ModelTransform, content_box, input_position, open_image


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


def test_importing_and_opening_leave_pil_and_warnings_as_they_were(tmp_path):
    # A 9500 x 9500 JPEG is over PIL's own bomb limit (89.5 M pixels): PIL warns when it opens it,
    # open_image silences that warning for its own call only and decodes it downscaled.
    path = tmp_path / "big.jpg"
    Image.new("L", (9500, 9500), 90).save(path, quality=50)
    code = (
        "import sys, warnings\n"
        "import torch, torchvision.transforms.functional\n"  # their own filters are theirs, not ours
        "from PIL import Image\n"
        "state = lambda: (Image.MAX_IMAGE_PIXELS, list(warnings.filters))\n"
        "before = state()\n"
        "from vqa.images import open_image\n"
        "assert state() == before, 'import changed ' + repr(state())\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    image = open_image(sys.argv[1])\n"
        "assert caught == [], [str(w.message) for w in caught]\n"
        "assert state() == before, 'open_image changed ' + repr(state())\n"
        "assert image.size == (4750, 4750), image.size\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image(orientation):
    # Six 16 x 16 blocks of different colours (48 wide, 32 tall): every flip and turn looks different.
    colours = [(220, 30, 30), (30, 180, 30), (30, 30, 220), (230, 220, 30), (30, 200, 200), (120, 40, 160)]
    upright = np.zeros((32, 48, 3), np.uint8)
    for k, colour in enumerate(colours):
        upright[16 * (k // 3):16 * (k // 3 + 1), 16 * (k % 3):16 * (k % 3 + 1)] = colour
    image = open_image(exif_jpeg(upright, orientation))
    assert image.size == (48, 32)
    difference = np.abs(np.asarray(image, np.int16) - upright)
    assert difference.mean() < 3 and np.median(difference) <= 2  # JPEG noise, not a turned image


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (21, 1), (2100, 100)])
def test_extreme_aspect_ratios_are_refused_before_decoding(size):
    width, height = size
    data = encode(Image.new("L", size, 0))
    assert len(data) < 2_000
    with pytest.raises(InputError, match=f"is {width}x{height}, an aspect ratio of .*over the limit of "
                                         f"{MAX_ASPECT_RATIO}:1"):
        open_image(data)
    with pytest.raises(InputError, match="aspect ratio"):
        open_image(Image.new("L", size, 0))  # the same rule for images handed over already decoded


def test_twenty_to_one_is_allowed():
    assert open_image(encode(Image.new("RGB", (2000, 100), (1, 2, 3)))).size == (2000, 100)
    assert open_image(encode(Image.new("RGB", (1, 20), (1, 2, 3)))).size == (1, 20)


# Opening and transforming in a fresh process; prints the peak resident memory (VmHWM) over the
# baseline taken after the imports.
MEMORY_PROBE = """
import json, sys
from vqa.errors import InputError
from vqa.images import ModelTransform, open_image

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

transform = ModelTransform({"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3})
baseline = peak_mb()
results = []
for path in sys.argv[1:]:
    try:
        results.append(list(transform(open_image(path)).shape))
    except InputError as error:
        results.append(str(error))
print(json.dumps({"results": results, "growth_mb": peak_mb() - baseline}))
"""


def test_memory_is_bounded_by_what_the_model_sees(tmp_path):
    # timm's eval transform resized the short side to the input: a 1 x 100,000 PNG (a few hundred
    # bytes) became 224 x 22,400,000 pixels, 15 GB of RGB (1 x 10,000 measured +2 GB). Now such
    # shapes are refused, and an allowed 20:1 image costs about its decoded size (60 MB here;
    # +83 MB peak measured in all).
    paths = []
    for size in [(1, 100_000), (100_000, 1), (20_000, 1_000)]:
        paths.append(tmp_path / f"{size[0]}x{size[1]}.png")
        Image.new("RGB", size, (200, 30, 30)).save(paths[-1])
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, paths)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    wide, tall, allowed = report["results"]
    assert "aspect ratio" in wide and "aspect ratio" in tall
    assert allowed == [3, 224, 224]
    assert report["growth_mb"] < 150, report


DATA_CONFIG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 1.0, "crop_mode": "center"}


@pytest.mark.parametrize("side, interpolation", [(64, "bicubic"), (128, "bicubic"), (100, "bilinear")])
def test_square_images_get_exactly_timms_pixels(side, interpolation):
    # The shipped checkpoint was trained with timm's eval transform at crop_pct=1.0.
    config = {**DATA_CONFIG, "interpolation": interpolation}
    image = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
    ours = ModelTransform(config)(image)
    timms = create_transform(**config, is_training=False)(image)
    assert ours.shape == timms.shape == (3, 64, 64)
    assert (ours - timms).abs().max() < 1e-6


def test_wide_images_are_letterboxed_not_cropped():
    # A 128 x 64 photo with a red object at its left edge and a blue one at its right edge.
    image = Image.new("RGB", (128, 64), (255, 255, 255))
    image.paste((255, 0, 0), (0, 24, 12, 40))
    image.paste((0, 0, 255), (116, 24, 128, 40))
    assert content_box(128, 64, DATA_CONFIG["input_size"]) == (0, 16, 64, 48)

    def seen(pixels):
        rgb = pixels * torch.tensor(DATA_CONFIG["std"])[:, None, None] + torch.tensor(DATA_CONFIG["mean"])[:, None, None]
        red = (rgb[0] > 0.8) & (rgb[1] < 0.2) & (rgb[2] < 0.2)
        blue = (rgb[2] > 0.8) & (rgb[0] < 0.2) & (rgb[1] < 0.2)
        return int(red.sum()), int(blue.sum())

    pixels = ModelTransform(DATA_CONFIG)(image)
    assert min(seen(pixels)) >= 4 * 6  # each object, halved to about 6 x 8 pixels, is there
    assert seen(create_transform(**DATA_CONFIG, is_training=False)(image)) == (0, 0)  # the centre crop lost both
    # The padding is the mean colour: exactly 0 after normalisation.
    assert pixels[:, :16].abs().max() == 0 and pixels[:, 48:].abs().max() == 0
    assert pixels[:, 16:48].abs().min(dim=0).values.gt(0).all()


def test_content_box():
    assert content_box(64, 64, (3, 64, 64)) == (0, 0, 64, 64)
    assert content_box(64, 128, (64, 64)) == (16, 0, 48, 64)
    assert content_box(1, 20, (3, 64, 64)) == (30, 0, 33, 64)  # never less than one pixel
    assert content_box(300, 100, (3, 32, 48)) == (0, 8, 48, 24)


def test_huge_images_are_reduced_first_without_changing_what_the_model_sees():
    # 4000 x 2000 into 64 x 64: PIL box-averages by 15 before resampling (REDUCING_GAP); the
    # result is within a few grey levels of resampling the full image.
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((4000, 2000), Image.BILINEAR)
    ours = ModelTransform(DATA_CONFIG)(image)
    left, top, right, bottom = content_box(4000, 2000, DATA_CONFIG["input_size"])
    exact = TF.normalize(TF.to_tensor(image.resize((right - left, bottom - top), Image.BICUBIC)),
                         DATA_CONFIG["mean"], DATA_CONFIG["std"])
    grey_levels = (ours[:, top:bottom, left:right] - exact).abs() * torch.tensor(DATA_CONFIG["std"])[:, None, None] * 255
    assert grey_levels.mean() < 1 and grey_levels.max() < 8


def test_transform_repr_names_what_changes_pixels():
    text = repr(ModelTransform(DATA_CONFIG))
    assert text == repr(ModelTransform(dict(DATA_CONFIG)))
    assert "letterbox" in text and "(3, 64, 64)" in text and "bicubic" in text and "0.485" in text
    assert repr(ModelTransform({**DATA_CONFIG, "interpolation": "bilinear"})) != text
    assert repr(ModelTransform({**DATA_CONFIG, "input_size": (3, 96, 96)})) != text
    assert repr(pickle.loads(pickle.dumps(ModelTransform(DATA_CONFIG)))) == text  # for DataLoader workers
    with pytest.raises(ValueError, match="unknown interpolation 'random'"):
        ModelTransform({**DATA_CONFIG, "interpolation": "random"})


def test_input_position_follows_the_letterbox():
    # A 128 x 64 image in a 64 x 64 input: scaled by 1/2, 16 rows of padding above and below.
    assert input_position(0, 0, (128, 64), (3, 64, 64)) == pytest.approx((0.25 / 64, (16 + 0.25) / 64))
    assert input_position(127, 63, (128, 64), (3, 64, 64)) == pytest.approx((63.75 / 64, (16 + 31.75) / 64))
    # A tall one: the padding is left and right.
    assert input_position(10, 20, (64, 128), (64, 64)) == pytest.approx(((16 + 5.25) / 64, 10.25 / 64))
