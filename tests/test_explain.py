"""Occlusion heatmaps: sizes and ranges on a tiny model, localisation on the shipped one."""

import numpy as np
import pytest
from PIL import Image, ImageChops
from torchvision import transforms

from conftest import COLORS, SHAPES, SHIPPED_CHECKPOINT, draw_shape
from vqa.explain import DISPLAY_SIDE, model_view_box, overlay, to_image_size
from vqa.predict import Predictor

QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def shipped() -> Predictor:
    if not (SHIPPED_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"the shipped checkpoint {SHIPPED_CHECKPOINT} is not there (train it with training/train.py)")
    return Predictor.from_checkpoint(SHIPPED_CHECKPOINT)


def shape_box(image: Image.Image) -> np.ndarray:
    """Mask of the bounding box of the non-white pixels."""
    left, top, right, bottom = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    mask = np.zeros((image.height, image.width), bool)
    mask[top:bottom, left:right] = True
    return mask


def test_explanation_has_the_image_size_and_values_in_0_1(predictor):
    image = draw_shape("red", "circle")
    explanation = predictor.explain(image, QUESTION)
    assert explanation.heatmap.shape == (64, 64) and explanation.heatmap.dtype == np.float32
    assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1
    assert explanation.overlay.mode == "RGB" and explanation.overlay.size == (DISPLAY_SIDE[0],) * 2
    top, probability = next(iter(predictor.answer(image, QUESTION, top_k=1).items()))
    assert explanation.answer == top
    assert explanation.probability == pytest.approx(probability, abs=1e-5)


def test_explaining_leaves_the_model_without_gradients(predictor):
    predictor.explain(draw_shape("green", "rectangle"), QUESTION)
    assert all(p.grad is None and not p.requires_grad for p in predictor.model.parameters())


def test_a_blank_image_has_no_heat(predictor):
    """Covering white with its own background colour changes nothing."""
    explanation = predictor.explain(Image.new("RGB", (64, 64), "white"), QUESTION)
    assert explanation.heatmap.max() == 0


def test_heat_of_a_wide_image_lies_in_the_centre_square_the_model_sees(predictor):
    image = Image.new("RGB", (300, 100), "white")
    image.paste(draw_shape("blue", "circle", size=100), (100, 0))
    explanation = predictor.explain(image, QUESTION)
    assert explanation.heatmap.shape == (100, 300)
    assert explanation.heatmap[:, :100].max() == 0 and explanation.heatmap[:, 200:].max() == 0
    assert explanation.overlay.size == (300, 100)


def test_model_view_box_follows_resize_and_centre_crop():
    transform = transforms.Compose([transforms.Resize(50), transforms.CenterCrop(40), transforms.ToTensor()])
    # 200x100 -> 100x50 (x0.5) -> centre 40x40 at (30, 5) -> (60, 10, 140, 90) in the original.
    assert model_view_box(transform, 200, 100) == pytest.approx((60, 10, 140, 90))
    stretch = transforms.Compose([transforms.Resize((32, 64))])
    assert model_view_box(stretch, 640, 480) == pytest.approx((0, 0, 640, 480))
    assert model_view_box(transforms.Compose([]), 33, 44) == (0, 0, 33, 44)


def test_to_image_size_fills_the_box_only():
    heat = np.ones((8, 8), np.float32)
    out = to_image_size(heat, (10, 0, 30, 20), 40, 20)
    assert out.shape == (20, 40)
    assert out[:, 10:30].min() == pytest.approx(1) and out[:, :10].max() == 0 and out[:, 30:].max() == 0


def test_overlay_keeps_cold_pixels_and_colours_hot_ones():
    image = draw_shape("yellow", "rectangle", size=300)
    heat = np.zeros((300, 300), np.float32)
    heat[:, 150:] = 1.0
    blended = np.asarray(overlay(image, heat), np.int16)
    original = np.asarray(image, np.int16)
    assert np.abs(blended[:, :140] - original[:, :140]).max() <= 1
    assert np.abs(blended[:, 160:] - original[:, 160:]).mean() > 40
    assert overlay(Image.new("RGB", (4000, 1000)), np.zeros((1000, 4000), np.float32)).size == (1024, 256)


def test_the_shipped_model_looks_at_the_shape(shipped):
    """Mean heat inside the shape's bounding box over mean heat outside it, per image and question."""
    ratios = []
    for n, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        image = draw_shape(color, shape, seed=n)
        inside = shape_box(image)
        for question in (QUESTION, f"is there a {color} shape?"):
            heat = shipped.explain(image, question).heatmap
            ratios.append(heat[inside].mean() / max(heat[~inside].mean(), 1e-6))
    assert np.median(ratios) > 3, np.round(ratios, 2)
    assert min(ratios) > 1.5, np.round(ratios, 2)
