"""Out-of-distribution image sets made offline, for measuring an OOD detector's AUROC.

    from benchmarks.ood_sets import ALL_SETS
    images = ALL_SETS["textures"](50, 224)          # 50 PIL RGB images of 224 x 224

Every set is a function `(n, size, seed=0) -> list[PIL.Image]` of RGB images; `size` is
an int (square) or (width, height). Image i depends only on (seed, i), so the same
call gives the same images, and asking for more images keeps the first ones.

- `uniform_noise`: every pixel uniform in 0..255, independently per channel.
- `gradients`: linear (random angle) or radial (random centre) blends of two or three colours.
- `textures`: sinusoidal gratings, checkerboards, and blurred multi-octave value noise
  (Perlin-like), in random colour pairs.
- `text_images`: random words in PIL's default font at random sizes on flat or gradient backgrounds.
- `package_photos`: views (crops, flips) of the real photos that installed packages ship.
  Found on this machine with `find site-packages /usr/share -iname '*.jpg' ...`:
  matplotlib `mpl-data/sample_data/grace_hopper.jpg` (portrait, 512x600), gradio
  `media_assets/images/{cheetah.jpg, cheetah1.jpg, lion.jpg, tower.jpg, groot.jpeg}`
  (animals, the Eiffel tower, a film still) and gradio `test_data/cheetah2.jpg`: 7 photos.
  Logos, icons and screenshots also found there (matplotlib logo2.png, gradio bus.png,
  avatar.png, logo.png, hf-logo_transpng.png, screenshot.gif, /usr/share/icons) are left
  out: they are drawings, not photos. Whichever of the 7 are installed are used.
"""

import importlib.util
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# (package, path inside the package) of each real photo; see the module docstring.
PACKAGE_PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("gradio", "media_assets/images/cheetah.jpg"),
    ("gradio", "media_assets/images/cheetah1.jpg"),
    ("gradio", "media_assets/images/lion.jpg"),
    ("gradio", "media_assets/images/tower.jpg"),
    ("gradio", "media_assets/images/groot.jpeg"),
    ("gradio", "test_data/cheetah2.jpg"),
)
# Photos found outside Python packages (absolute paths; used where present): the Rust embedded
# book's two photos of an STM32F3 board on a light table (720 x 477).
OTHER_PHOTOS = (
    "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/assets/f3.jpg",
    "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/assets/verify.jpeg",
)
# The photos split by file: nothing about the detector was chosen looking at the held-out ones.
HELDOUT_PHOTOS = ("tower.jpg", "cheetah2.jpg", "f3.jpg", "verify.jpeg")
PHOTO_VIEWS = 3  # views per photo by default: 7 photos -> 21 images
WORDS = ("kitchen", "cup", "zebra", "umbrella", "laptop", "pizza", "train", "giraffe", "clock", "surfboard",
         "OPEN", "SALE", "Stop", "2024", "exit", "menu", "bus", "ticket", "hello", "42", "VQA", "north")


def _size(size) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(width), int(height)


def _rngs(n: int, seed: int, salt: int):
    """One generator per image, seeded by (seed, set, i): image i does not depend on n."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [np.random.default_rng([seed, salt, i]) for i in range(n)]


def _colour(rng) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def _blend(t: np.ndarray, colours: list[np.ndarray]) -> np.ndarray:
    """t in [0, 1] of shape (H, W) -> (H, W, 3), piecewise linear through the colours."""
    t = np.clip(t, 0, 1) * (len(colours) - 1)
    low = np.minimum(t.astype(int), len(colours) - 2)
    frac = (t - low)[..., None]
    stack = np.stack(colours)  # (K, 3)
    return stack[low] * (1 - frac) + stack[low + 1] * frac


def _grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return x / max(width - 1, 1), y / max(height - 1, 1)  # both in [0, 1]


def uniform_noise(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    width, height = _size(size)
    return [_to_image(rng.integers(0, 256, (height, width, 3))) for rng in _rngs(n, seed, 1)]


def gradients(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    width, height = _size(size)
    x, y = _grid(width, height)
    images = []
    for rng in _rngs(n, seed, 2):
        colours = [_colour(rng) for _ in range(rng.integers(2, 4))]
        if rng.random() < 0.5:
            angle = rng.uniform(0, 2 * math.pi)
            t = x * math.cos(angle) + y * math.sin(angle)
            t = (t - t.min()) / max(t.max() - t.min(), 1e-12)
        else:
            cx, cy = rng.uniform(0, 1, 2)
            t = np.hypot(x - cx, y - cy)
            t = t / max(t.max(), 1e-12)
        images.append(_to_image(_blend(t, colours)))
    return images


def _value_noise(rng, width: int, height: int, octaves: int = 4) -> np.ndarray:
    """Sum of random grids upsampled bicubically, halving amplitude per octave, in [0, 1]."""
    total = np.zeros((height, width))
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
        total += np.asarray(grid.resize((width, height), Image.BICUBIC), dtype=np.float64) / 255 * 0.5 ** octave
    total = (total - total.min()) / max(total.max() - total.min(), 1e-12)
    return total


def textures(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    width, height = _size(size)
    x, y = _grid(width, height)
    images = []
    for i, rng in enumerate(_rngs(n, seed, 3)):
        colours = [_colour(rng), _colour(rng)]
        kind = i % 3  # the three kinds in turn, so any n >= 3 holds each
        if kind == 0:  # sinusoidal grating
            angle, cycles = rng.uniform(0, math.pi), rng.uniform(3, 20)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * cycles * (x * math.cos(angle) + y * math.sin(angle))
                                   + rng.uniform(0, 2 * math.pi))
        elif kind == 1:  # checkerboard
            cells = rng.integers(2, 16)
            t = ((np.floor(x * cells * 0.999) + np.floor(y * cells * 0.999)) % 2).astype(np.float64)
        else:  # blurred value noise
            t = _value_noise(rng, width, height)
        image = _to_image(_blend(t, colours))
        if kind == 2:
            image = image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 100))
        images.append(image)
    return images


def text_images(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    width, height = _size(size)
    x, y = _grid(width, height)
    images = []
    for rng in _rngs(n, seed, 4):
        background = _colour(rng)
        if rng.random() < 0.5:
            array = np.broadcast_to(background, (height, width, 3))
        else:
            array = _blend(x if rng.random() < 0.5 else y, [background, _colour(rng)])
        image = _to_image(array)
        draw = ImageDraw.Draw(image)
        # Dark ink on a light background and light on dark (BT.601 luma), slightly tinted.
        luma = background @ np.array([0.299, 0.587, 0.114])
        ink = tuple(int(v) for v in np.clip((20 if luma > 128 else 235) + rng.integers(-20, 21, 3), 0, 255))
        lines = rng.integers(1, 5)
        font_size = max(6, int(min(width, height) / rng.uniform(4, 10)))
        font = ImageFont.load_default(size=font_size)
        for line in range(lines):
            words = " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), rng.integers(1, 4)))
            left = int(rng.uniform(0, 0.3) * width)
            top = int((line + rng.uniform(0, 0.5)) * height / lines)
            draw.text((left, top), words, fill=ink, font=font)
        images.append(image)
    return images


def _photo_paths(part: str | None = None) -> list[Path]:
    """The installed photos (PACKAGE_PHOTOS, then OTHER_PHOTOS); `part` "tuning" or "heldout"
    keeps the files outside or inside HELDOUT_PHOTOS."""
    paths = []
    for package, inside in PACKAGE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / inside
        if path.is_file():
            paths.append(path)
    paths += [Path(p) for p in OTHER_PHOTOS if Path(p).is_file() and Path(p).name not in {q.name for q in paths}]
    if part is not None:
        if part not in ("tuning", "heldout"):
            raise ValueError(f"part must be 'tuning' or 'heldout', got {part!r}")
        paths = [p for p in paths if (p.name in HELDOUT_PHOTOS) == (part == "heldout")]
    return paths


def package_photos(n: int | None = None, size=224, seed: int = 0, part: str | None = None) -> list[Image.Image]:
    """n views of the installed packages' photos (default PHOTO_VIEWS per photo).

    The photos are taken in an order shuffled by `seed`, in turn. The first view of each is
    its centre square; later ones are random crops (25 % to 100 % of the area, aspect 3:4
    to 4:3), half of them mirrored.
    """
    width, height = _size(size)
    paths = _photo_paths(part)
    if not paths:
        raise FileNotFoundError(f"none of the photos ({part or 'any'} part) in PACKAGE_PHOTOS is installed "
                                f"({', '.join(f'{p}/{f}' for p, f in PACKAGE_PHOTOS)})")
    if n is None:
        n = PHOTO_VIEWS * len(paths)
    photos = [Image.open(paths[k]).convert("RGB") for k in np.random.default_rng([seed, 5]).permutation(len(paths))]
    images = []
    for i, rng in enumerate(_rngs(n, seed, 5)):
        photo = photos[i % len(photos)]
        w, h = photo.size
        if i < len(photos):
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        else:
            area = rng.uniform(0.25, 1.0) * w * h
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = min(w, int(round(math.sqrt(area * aspect)))), min(h, int(round(math.sqrt(area / aspect))))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (left, top, left + cw, top + ch)
        view = photo.resize((width, height), Image.BICUBIC, box=box)
        if i >= len(photos) and rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        images.append(view)
    return images


def varied_photos(n: int, size=224, seed: int = 0, part: str = "tuning") -> list[Image.Image]:
    """n varied views of one part of the photos (HELDOUT_PHOTOS or the rest), in turn: random
    crops from 4 % to 100 % of the photo (aspect 1:2 to 2:1, squeezed to `size`), mirrored half
    the time, then one of: as it is, greyscale, colour-jittered (brightness, contrast,
    saturation 0.6 to 1.4), blurred, or JPEG-compressed at quality 20 to 60."""
    import io

    from PIL import ImageEnhance

    width, height = _size(size)
    paths = _photo_paths(part)
    if not paths:
        raise FileNotFoundError(f"no photo of the {part} part is installed")
    photos = [Image.open(p).convert("RGB") for p in paths]
    images = []
    for i, rng in enumerate(_rngs(n, seed, 7 if part == "tuning" else 8)):
        photo = photos[i % len(photos)]
        w, h = photo.size
        area = rng.uniform(0.04, 1.0) * w * h
        aspect = math.exp(rng.uniform(math.log(1 / 2), math.log(2)))
        cw = max(8, min(w, int(round(math.sqrt(area * aspect)))))
        ch = max(8, min(h, int(round(math.sqrt(area / aspect)))))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = photo.resize((width, height), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        kind = int(rng.integers(0, 5))
        if kind == 1:
            view = view.convert("L").convert("RGB")
        elif kind == 2:
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                view = enhance(view).enhance(rng.uniform(0.6, 1.4))
        elif kind == 3:
            view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0) * max(width, height) / 100))
        elif kind == 4:
            buffer = io.BytesIO()
            view.save(buffer, "JPEG", quality=int(rng.integers(20, 61)))
            view = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        images.append(view)
    return images


def tuning_photos(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    return varied_photos(n, size, seed, "tuning")


def heldout_photos(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    return varied_photos(n, size, seed, "heldout")


def whole_photos(part: str | None = None) -> list[Image.Image]:
    """Each photo file whole, at its own size and aspect (the model's transform letterboxes it)."""
    return [Image.open(p).convert("RGB") for p in _photo_paths(part)]


def synthetic_photos(n: int, size=224, seed: int = 0) -> list[Image.Image]:
    """Procedural photo-like scenes: a sky gradient over textured ground at a random horizon,
    a few shaded, blurred blobs (objects), a light falloff, sensor noise and JPEG compression,
    in random palettes."""
    import io

    width, height = _size(size)
    x, y = _grid(width, height)
    images = []
    for rng in _rngs(n, seed, 6):
        sky = _blend(y, [_colour(rng) * 0.4 + np.array([120, 160, 220]) * 0.6, _colour(rng) * 0.3 + 180])
        ground_colours = [_colour(rng) * 0.5 + np.array([90, 80, 50]) * 0.5 for _ in range(2)]
        ground = _blend(_value_noise(rng, width, height, octaves=5), ground_colours)
        horizon = rng.uniform(0.2, 0.7) + 0.05 * np.sin(2 * math.pi * x * rng.uniform(0.5, 3))
        array = np.where((y > horizon)[..., None], ground, sky)
        for _ in range(int(rng.integers(1, 5))):
            cx, cy = rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.9)
            rx, ry = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
            d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
            shade = np.clip(1.2 - 0.6 * np.hypot(x - cx + rx / 3, y - cy + ry / 3) / max(rx, ry), 0.3, 1.2)
            colour = _colour(rng)
            texture = 0.8 + 0.4 * _value_noise(rng, width, height, octaves=3)
            inside = (d < 1)[..., None]
            array = np.where(inside, colour * (shade * texture)[..., None], array)
        light = 1.15 - 0.4 * np.hypot(x - rng.uniform(0, 1), y - rng.uniform(0, 1))
        array = array * light[..., None] + rng.normal(0, rng.uniform(2, 8), array.shape)
        image = _to_image(array).filter(ImageFilter.GaussianBlur(radius=max(width, height) / 300))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(rng.integers(50, 90)))
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return images


# Near-world edits: the in-distribution images themselves, changed in ways a user's image may be.
def _each(images, seed: int, salt: int, edit) -> list[Image.Image]:
    """edit(RGB image, its own rng) for each image."""
    return [edit(image.convert("RGB"), rng) for image, rng in zip(images, _rngs(len(images), seed, salt))]


def rotated(images, seed: int = 0) -> list[Image.Image]:
    """Rotated by 15 to 75 degrees either way (never a right angle), corners filled black."""
    return _each(images, seed, 11, lambda image, rng: image.rotate(rng.uniform(15, 75) * rng.choice([-1, 1]),
                                                                  resample=Image.BILINEAR))


def inverted(images, seed: int = 0) -> list[Image.Image]:
    """Colour negatives."""
    return [Image.fromarray(255 - np.asarray(image.convert("RGB"))) for image in images]


def bordered(images, seed: int = 0) -> list[Image.Image]:
    """A frame of 8 % to 20 % of the side in a random colour, the picture shrunk inside it."""
    def frame(image, rng):
        w, h = image.size
        margin = rng.uniform(0.08, 0.2)
        framed = Image.new("RGB", (w, h), tuple(int(v) for v in _colour(rng)))
        inner = image.resize((max(1, int(w * (1 - 2 * margin))), max(1, int(h * (1 - 2 * margin)))), Image.BILINEAR)
        framed.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
        return framed

    return _each(images, seed, 12, frame)


def zoomed(images, seed: int = 0) -> list[Image.Image]:
    """A random crop of 25 % to 50 % of the side, upscaled back to the image's size (blocky)."""
    def zoom(image, rng):
        w, h = image.size
        side = rng.uniform(0.25, 0.5)
        cw, ch = max(2, int(w * side)), max(2, int(h * side))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return image.resize((w, h), Image.NEAREST, box=(left, top, left + cw, top + ch))

    return _each(images, seed, 13, zoom)


NEAR_WORLD_EDITS = {"rotated": rotated, "inverted": inverted, "bordered": bordered, "zoomed": zoomed}


ALL_SETS = {
    "uniform_noise": uniform_noise,
    "gradients": gradients,
    "textures": textures,
    "text_images": text_images,
    "package_photos": package_photos,
    "tuning_photos": tuning_photos,
    "heldout_photos": heldout_photos,
    "synthetic_photos": synthetic_photos,
}
