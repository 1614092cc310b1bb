"""Property: whatever bytes arrive as an image and whatever text as a question, the Predictor
either answers with valid probabilities or raises InputError. Nothing else."""

import pytest
from fixtures import QUESTION, draw_shape, png_bytes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vqa.errors import InputError
from vqa.predict import Answer, Predictor

VALID_PNG = png_bytes(draw_shape("red", "circle", size=32))


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
# Any text, lone surrogates included (what a command line's non-UTF-8 bytes become).
questions = st.one_of(st.text(max_size=400), st.text(st.characters(categories=["Cs", "L", "Zs"]), max_size=20),
                      st.none())


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=image_bytes, question=questions)
@example(data=VALID_PNG, question=QUESTION)
@example(data=b"", question="")
@example(data=VALID_PNG, question="\x00")
@example(data=VALID_PNG, question="what \udcff color")
def test_predictor_answers_or_raises_input_error(predictor, data, question):
    try:
        answer = predictor.assess(data, question, top_k=len(predictor.answers))
    except InputError as error:
        assert str(error)
        return
    assert isinstance(answer, Answer)
    assert set(answer.answers) == set(predictor.answers)  # every answer, each a known one
    values = list(answer.answers.values())
    assert all(0 <= p <= 1 for p in values) and sum(values) == pytest.approx(1.0, abs=1e-5)
    assert values == sorted(values, reverse=True) and answer.confidence == values[0]
    assert not any("\ud800" <= c <= "\udfff" for c in question)  # such text is refused, never answered
