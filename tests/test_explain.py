"""Occlusion heatmaps and attention overlays: sizes and ranges on a tiny model, the letterbox
mapped back to the image, localisation on the shipped model."""

import numpy as np
import pytest
import torch
from fixtures import COLORS, QUESTION, SHAPES, SHIPPED_CHECKPOINT, draw_shape
from PIL import Image, ImageChops

from vqa.checkpoint import load_checkpoint
from vqa.explain import DISPLAY_SIDE, attention_overlays, explain_answer, overlay, to_image_size
from vqa.images import content_box
from vqa.predict import Predictor


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
    assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() == pytest.approx(1.0)
    assert explanation.overlay.mode == "RGB" and explanation.overlay.size == (DISPLAY_SIDE[0],) * 2
    top, probability = next(iter(predictor.answer(image, QUESTION, top_k=1).items()))
    assert explanation.answer == top
    assert explanation.probability == pytest.approx(probability, abs=1e-5)


def test_explaining_leaves_the_model_as_it_was(tiny_checkpoint):
    """A model with gradients enabled (as in training): explaining it computes no gradient,
    switches nothing off and changes no weight or buffer (BatchNorm statistics included)."""
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    model.eval()
    assert all(p.requires_grad for p in model.parameters())
    before = {key: value.clone() for key, value in model.state_dict().items()}
    ids = tokenizer.encode(QUESTION, model.config.max_question_tokens)
    explanation = explain_answer(model, model.image_transform(), draw_shape("green", "rectangle"), ids,
                                 model.config.answers)
    assert explanation.heatmap.max() > 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() and not model.training
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_a_blank_image_has_no_heat(predictor):
    """Covering white with its own background colour changes nothing."""
    explanation = predictor.explain(Image.new("RGB", (64, 64), "white"), QUESTION)
    assert explanation.heatmap.max() == 0


def test_a_shape_at_the_side_of_a_wide_image_stays_in_the_heatmap(predictor):
    # A centre crop cut the sides of a wide image off: their heat was exactly 0. Letterboxed, the
    # model sees the whole image, so covering a shape at its edge changes the answer.
    image = Image.new("RGB", (128, 64), "white")
    image.paste(draw_shape("blue", "circle", size=40, seed=1), (84, 12))
    explanation = predictor.explain(image, QUESTION)
    assert explanation.heatmap.shape == (64, 128)
    assert explanation.overlay.size == (256, 128)
    assert explanation.heatmap[shape_box(image)].max() > 0.1


def test_to_image_size_maps_the_letterbox_content_back_onto_the_image():
    # A 128 x 64 image lies in a 64 x 64 input at rows 16..48 (half size); above and below is padding.
    assert content_box(128, 64, (64, 64)) == (0, 16, 64, 48)
    heat = np.zeros((64, 64), np.float32)
    heat[:16] = 1.0  # heat on the padding belongs to no pixel of the image
    heat[48:] = 1.0
    heat[24:32, 48:56] = 1.0  # a blob at input rows 24..32, columns 48..56
    out = to_image_size(heat, 128, 64)
    assert out.shape == (64, 128) and out.dtype == np.float32
    # ... is image rows (24 - 16) * 2 .. (32 - 16) * 2 = 16..32, columns 96..112.
    assert out[18:30, 98:110].min() > 0.9
    blob = np.zeros((64, 128), bool)
    blob[14:34, 94:114] = True  # the blob with a margin for bilinear resampling
    assert out[~blob].max() < 1e-6
    rows, columns = np.nonzero(out > 0.5)
    assert (rows.mean(), columns.mean()) == pytest.approx((24, 104), abs=1)


def test_to_image_size_of_a_tall_image_and_a_square_one():
    heat = np.zeros((64, 64), np.float32)
    heat[:, :16] = 1.0  # padding left of a 32 x 64 image (columns 16..48)
    heat[0:8, 16:24] = 1.0  # the image's top-left corner
    out = to_image_size(heat, 32, 64)
    assert out.shape == (64, 32)
    assert out[:6, :6].min() > 0.9 and out[:, 12:].max() < 1e-6 and out[12:].max() < 1e-6
    square = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    assert np.allclose(to_image_size(square, 64, 64), square, atol=1e-6)  # no letterbox: the same map


def test_overlay_keeps_cold_pixels_and_colours_hot_ones():
    image = draw_shape("yellow", "rectangle", size=300)
    heat = np.zeros((300, 300), np.float32)
    heat[:, 150:] = 1.0
    blended = np.asarray(overlay(image, heat), np.int16)
    original = np.asarray(image, np.int16)
    assert np.abs(blended[:, :140] - original[:, :140]).max() <= 1
    assert np.abs(blended[:, 160:] - original[:, 160:]).mean() > 40
    assert overlay(Image.new("RGB", (4000, 1000)), np.zeros((1000, 4000), np.float32)).size == (1024, 256)


def test_attention_overlays_colour_where_each_glimpse_looked():
    image = Image.new("RGB", (128, 64), "white")
    maps = torch.zeros(2, 8, 8)
    maps[0, 4, 7] = 1.0  # glimpse 1: input rows 32..40, columns 56..64 -> image rows 32..48, columns 112..128
    maps[1, 4, 0] = 1.0  # glimpse 2: the same rows at the left edge
    overlays = attention_overlays(image, maps, (64, 64))
    assert len(overlays) == 2 and all(o.size == (256, 128) for o in overlays)  # display size: 2x
    plain = np.asarray(image.resize((256, 128)), np.int16)
    changed = [np.abs(np.asarray(o, np.int16) - plain).sum(axis=2) > 30 for o in overlays]
    for mask, (lo, hi) in zip(changed, [(192, 256), (0, 64)]):
        rows, columns = np.nonzero(mask)
        assert lo <= columns.mean() < hi, columns.mean()
        assert 48 <= rows.mean() <= 112, rows.mean()  # the middle band of the image's rows (0..128)
        assert not mask[:32].any() and not mask[:, 96:160].any()


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
