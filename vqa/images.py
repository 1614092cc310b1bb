"""The one place where images are opened, turned upright and converted to RGB, with size
limits, and the one place that turns an image into what the model sees (ModelTransform).

Any mode (1, L, LA, P, RGBA, CMYK, I;16, I, F) becomes 8-bit RGB; transparency is
composited on white; animated images give their first frame; the EXIF orientation of
phone photos is applied. Images over MAX_PIXELS or MAX_ASPECT_RATIO are refused before
decoding (decompression bombs), except JPEGs over MAX_PIXELS, which decode downscaled
(PIL's draft mode) and so use bounded memory. Importing this module changes nothing in
PIL or in the warnings filters.
"""

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000
MAX_BYTES = 50 * 1024 * 1024
# Letterboxed into a square input, a 20:1 image fills 11 of 224 rows (3 of 64): beyond that the
# model sees a line, not a picture. Web banners (728x90 = 8:1, 970x90 = 11:1) still pass.
MAX_ASPECT_RATIO = 20
# ModelTransform's resize first box-averages by an integer factor while the image stays at least
# this many times the model's input, then resamples: 8000x5000 -> 224x140 bicubic took 61 ms
# instead of 375 ms (measured, noise image). Images under 4x the input (all of easy-VQA, COCO at
# 224) take the exact path timm's eval transform takes.
REDUCING_GAP = 4.0

# warnings.catch_warnings swaps the process-wide filter list and restores it on exit: two threads
# inside it at once could restore each other's copies, so our own uses take turns.
_warnings_lock = threading.Lock()


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the uploaded image"


def open_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open a path, bytes, PIL image or array as an upright 8-bit RGB PIL image, or raise InputError.

    An upright RGB PIL image is returned as it is, not copied.
    """
    name = _describe(source)
    if isinstance(source, np.ndarray):
        source = _array_to_image(source)
    image = source if isinstance(source, Image.Image) else _open_bytes(_read_bytes(source, name), name)
    _check_size(image, name)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        # Phones store the sensor's pixels plus an EXIF Orientation tag (2..8) saying how to turn them.
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{name} could not be decoded ({error})") from error


def _read_bytes(source: str | Path | bytes, name: str) -> bytes:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise InputError(f"image file {path} is {size} bytes, over the limit of {MAX_BYTES}")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise InputError(f"{name} is {len(data)} bytes, over the limit of {MAX_BYTES}")
    return data


def _open_bytes(data: bytes, name: str) -> Image.Image:
    """Read the header only; PIL's own bomb warning is silenced here, since _check_size decides."""
    try:
        with _warnings_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # over 2 x PIL's limit (179 M pixels): refused on opening
        raise InputError(f"{name} is over the limit of {MAX_PIXELS} pixels ({error})") from error
    except UnidentifiedImageError as error:
        raise InputError(f"{name} is not a readable image (not a format PIL recognises)") from error
    except (OSError, ValueError) as error:
        raise InputError(f"{name} is not a readable image ({error})") from error


def _check_size(image: Image.Image, name: str) -> None:
    """Refuse images with no pixels, too many, or too extreme a shape; downscale big JPEGs while decoding."""
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(f"{name} is {width}x{height}, an aspect ratio of {ratio:.1f}:1, "
                         f"over the limit of {MAX_ASPECT_RATIO}:1")
    if width * height > MAX_PIXELS:
        if image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale, the least reduction that fits the limit.
            scale = next((s for s in (2, 4, 8) if width * height <= MAX_PIXELS * s * s), 8)
            image.draft("RGB", (width // scale, height // scale))
        if image.size[0] * image.size[1] > MAX_PIXELS:
            raise InputError(
                f"{name} is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS}"
            )


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputError(f"image array has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: scale the used range to 0..255 instead of clipping it.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # An RGB image is returned as it is: a copy would double the peak memory of a 40 MP photo.
    return image if image.mode == "RGB" else image.convert("RGB")


def content_box(width: int, height: int, input_size: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): where a width x height image lands in the model's input.

    `input_size` is timm's (3, H, W) or (H, W). The image keeps its aspect ratio, its longer
    side fills the input, and it is centred; the rest of the input is padding.
    """
    in_height, in_width = input_size[-2:]
    scale = min(in_width / width, in_height / height)
    w = min(in_width, max(1, round(width * scale)))
    h = min(in_height, max(1, round(height * scale)))
    left, top = (in_width - w) // 2, (in_height - h) // 2
    return left, top, left + w, top + h


def input_position(x: float, y: float, image_size: tuple[int, int], input_size: tuple[int, ...]) -> tuple[float, float]:
    """Where pixel (x, y) of a (width, height) image lands in the model's letterboxed input, as
    fractions 0..1 of its width and height (pixel centres: x + 0.5)."""
    left, top, right, _ = content_box(image_size[0], image_size[1], input_size)
    scale = (right - left) / image_size[0]
    in_height, in_width = input_size[-2:]
    return (left + (x + 0.5) * scale) / in_width, (top + (y + 0.5) * scale) / in_height


class ModelTransform:
    """PIL image -> (3, H, W) float tensor: the whole image, letterboxed into the model's input.

    timm's eval transform resizes the short side to the input and centre-crops the long one:
    objects near the sides of a wide photo were cut off, and a 1 x 10,000 PNG grew to
    64 x 640,000 pixels on the way (+193 MB measured at 64, +2 GB at 224). Here the longer side
    is resized to fit, so the work never exceeds H x W output pixels, and the padding is 0 after
    normalisation (the mean colour). A square image gives exactly timm's pixels at crop_pct=1.0,
    which the shipped easy-VQA checkpoint was trained with; crop_pct is not used.
    """

    def __init__(self, data_config: dict):
        """`data_config`: timm's resolved data config (input_size, interpolation, mean, std, ...)."""
        self.input_size = tuple(int(n) for n in data_config["input_size"])  # (3, H, W)
        self.interpolation = str(data_config.get("interpolation", "bilinear"))
        try:
            self.resample = Image.Resampling[self.interpolation.upper()]
        except KeyError:
            raise ValueError(f"unknown interpolation {self.interpolation!r} "
                             f"(one of {', '.join(m.name.lower() for m in Image.Resampling)})") from None
        self.mean = tuple(float(m) for m in data_config["mean"])
        self.std = tuple(float(s) for s in data_config["std"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = to_rgb(image)
        left, top, right, bottom = content_box(image.width, image.height, self.input_size)
        resized = image.resize((right - left, bottom - top), self.resample, reducing_gap=REDUCING_GAP)
        pixels = torch.zeros(self.input_size)  # (3, H, W)
        pixels[:, top:bottom, left:right] = TF.normalize(TF.to_tensor(resized), self.mean, self.std)
        return pixels

    def __repr__(self) -> str:
        # The feature cache compares transforms by this text: it names everything that changes pixels.
        return (f"ModelTransform(letterbox, input_size={self.input_size}, interpolation={self.interpolation!r}, "
                f"reducing_gap={REDUCING_GAP}, mean={self.mean}, std={self.std})")


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, or InputError as `open_image` would give for a
    missing, empty, unrecognised or oversized file: a check before long work that decodes nothing."""
    name = _describe(path)
    image = _open_bytes(_read_bytes(path, name), name)
    _check_size(image, name)
    return image.size
