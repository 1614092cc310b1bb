"""Property: whatever bytes arrive as an image and whatever text as a question, the Predictor
either answers with valid probabilities or raises InputError. Nothing else."""

import io

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import draw_shape
from vqa.errors import InputError
from vqa.predict import Predictor


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PNG = _png(draw_shape("red", "circle", size=32))


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


# Random bytes, and a valid PNG with bytes flipped or cut short: the second reaches the decoder.
def _mutated(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(data[: max(cut, 8)])
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data)


image_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(_mutated, st.just(VALID_PNG), st.integers(0, len(VALID_PNG)),
              st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)),
    st.just(VALID_PNG),
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=image_bytes, question=st.one_of(st.text(max_size=400), st.none()))
@example(data=VALID_PNG, question="what color is the shape?")
@example(data=b"", question="")
@example(data=VALID_PNG, question="\x00")
def test_predictor_answers_or_raises_input_error(predictor, data, question):
    try:
        answers = predictor.answer(data, question)
    except InputError as error:
        assert str(error)
        return
    assert 1 <= len(answers) <= 5
    assert set(answers) <= set(predictor.answers)
    values = list(answers.values())
    assert all(0 <= p <= 1 for p in values) and sum(values) <= 1 + 1e-5
    assert values == sorted(values, reverse=True)
