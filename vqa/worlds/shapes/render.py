"""Drawing a shapes-world scene graph as pixels (PIL, 2x supersampled)."""

import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import BACKGROUND, COLORS, NOISE, OUTLINE, SUPERSAMPLE, WorldConfig

_DIAMOND_WIDTH = 0.62  # half-width of a diamond over its half-height: no mistaking it for a square
_INRADIUS = {"circle": 1.0, "square": math.sqrt(0.5), "triangle": 0.5,
             "diamond": _DIAMOND_WIDTH / math.hypot(1, _DIAMOND_WIDTH)}  # centre-to-side, per unit radius


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """A shape whose farthest point is r from (cx, cy): it never leaves its circle."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    h, w = math.sqrt(0.5) * r, _DIAMOND_WIDTH * r
    points = {"square": [(-h, -h), (h, -h), (h, h), (-h, h)],
              "triangle": [(0, -r), (r * math.sqrt(0.75), r / 2), (-r * math.sqrt(0.75), r / 2)],
              "diamond": [(0, -r), (w, 0), (0, r), (-w, 0)]}[shape]
    draw.polygon([(cx + px, cy + py) for px, py in points], fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: int, color, background) -> None:
    x, y = obj["pixel_coords"]
    cx, cy, r = (x + 0.5) * scale, (y + 0.5) * scale, obj["radius"] * scale
    _draw_shape(draw, obj["shape"], cx, cy, r, color)
    if obj["material"] == "outline":
        # The same shape shrunk about its centre: a band of even width OUTLINE * r on every side.
        inradius = _INRADIUS[obj["shape"]] * r
        stroke = max(OUTLINE * r, scale)
        _draw_shape(draw, obj["shape"], cx, cy, r * (inradius - stroke) / inradius, background)


def render_scene(scene: dict, config: WorldConfig | None = None) -> Image.Image:
    """The scene as an RGB image of config.image_size pixels; the same scene gives the same pixels."""
    side = (config or WorldConfig()).image_size
    background = tuple(scene.get("background", BACKGROUND))
    image = Image.new("RGB", (side * SUPERSAMPLE, side * SUPERSAMPLE), background)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _draw_object(draw, obj, SUPERSAMPLE, COLORS[obj["color"]], background)
    image = np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.int16)
    rng = np.random.default_rng(scene.get("noise_seed", 0))
    noise = np.rint(rng.standard_normal((side, side, 1), dtype=np.float32) * NOISE).astype(np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


