"""The one place where images are opened and converted to RGB, with size limits.

Any mode (1, L, LA, P, RGBA, CMYK, I;16, I, F) becomes 8-bit RGB; transparency is
composited on white; animated images give their first frame. Images over MAX_PIXELS
are refused before decoding (decompression bombs), except JPEGs, which decode
downscaled (PIL's draft mode) and so use bounded memory.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 40_000_000  # e.g. 8000 x 5000
MAX_BYTES = 50 * 1024 * 1024

# PIL's own guard, raised to ours: we check sizes ourselves, before decoding, so its warning
# for sizes between MAX_PIXELS and 2 x MAX_PIXELS says nothing new.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the uploaded image"


def open_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open a path, bytes, PIL image or array as an 8-bit RGB PIL image, or raise InputError."""
    name = _describe(source)
    if isinstance(source, np.ndarray):
        source = _array_to_image(source)
    if isinstance(source, Image.Image):
        image = source
    else:
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
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:  # over 2 x MAX_PIXELS: PIL refuses it on opening
            raise InputError(f"{name} is over the limit of {MAX_PIXELS} pixels ({error})") from error
        except UnidentifiedImageError as error:
            raise InputError(f"{name} is not a readable image (not a format PIL recognises)") from error
        except (OSError, ValueError) as error:
            raise InputError(f"{name} is not a readable image ({error})") from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        if image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale, the least reduction that fits the limit.
            scale = next((s for s in (2, 4, 8) if width * height <= MAX_PIXELS * s * s), 8)
            image.draft("RGB", (width // scale, height // scale))
        if image.size[0] * image.size[1] > MAX_PIXELS:
            raise InputError(
                f"{name} is {width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS}"
            )
    if width == 0 or height == 0:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{name} could not be decoded ({error})") from error


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
    return image.convert("RGB")
