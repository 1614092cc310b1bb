"""Predictor: answers, top-k, one CNN pass per image, what to trust (assess), input checking,
shared batches, the CLI."""

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from fixtures import (COLORS, QUESTION, ROOT, SHAPES, ForwardCounter, call_within, draw_shape, exif_jpeg, jpeg_bytes,
                      jpeg_claiming_size, png_bytes, png_claiming_size, wait_until)
from PIL import Image

import vqa.predict
from vqa.errors import InputError
from vqa.predict import MAX_QUESTION_CHARS, Answer, BatchingPredictor, Predictor, check_question
from vqa.predict import main as predict_main
from vqa.predict import percent
from vqa.reliability.ood import FeatureDensity
from vqa.reliability.words import WordVocabulary
from vqa.text import pad_questions

NUM_ANSWERS = 13  # easy-VQA's answers


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


def assert_all_answers(predictor, answers: dict):
    """{answer: probability} over the whole vocabulary: known answers, most likely first, summing to 1."""
    assert set(answers) == set(predictor.answers) and len(answers) == NUM_ANSWERS
    values = list(answers.values())
    assert values == sorted(values, reverse=True) and all(0 < p <= 1 for p in values)
    assert sum(values) == pytest.approx(1.0, abs=1e-5)


# Answers.

def test_answer_gives_top_k_probabilities_most_likely_first(predictor):
    answers = predictor.answer(draw_shape("red", "circle"), QUESTION, top_k=5)
    assert len(answers) == 5
    assert set(answers) <= set(predictor.answers)
    probabilities = list(answers.values())
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6

    everything = predictor.answer(draw_shape("red", "circle"), QUESTION, top_k=100)  # capped at the vocabulary
    assert len(everything) == len(predictor.answers) == 13
    assert sum(everything.values()) == pytest.approx(1.0, abs=1e-5)
    assert list(everything)[:5] == list(answers)
    assert list(predictor.answer(draw_shape("red", "circle"), QUESTION, top_k=1)) == list(answers)[:1]


def test_answer_is_the_softmax_of_the_model_logits(predictor):
    image = draw_shape("blue", "rectangle", seed=3)
    ids = predictor.tokenizer.encode(QUESTION, predictor.config.max_question_tokens)
    input_ids, lengths = pad_questions([ids])
    with torch.no_grad():
        logits = predictor.model(input_ids=input_ids, lengths=lengths, image_index=torch.tensor([0]),
                                 pixel_values=predictor.transform(image)[None]).logits
    expected = logits.softmax(-1)[0]
    for answer, probability in predictor.answer(image, QUESTION, top_k=13).items():
        assert probability == pytest.approx(float(expected[predictor.config.label2id[answer]]), abs=1e-6)


def test_answer_many_runs_the_cnn_once_and_agrees_with_answer(predictor):
    image = draw_shape("green", "circle", seed=1)
    questions = [QUESTION, "is there a circle?", "what shape is it?", "is there not a red shape?"]
    with ForwardCounter(predictor.model.image_encoder.backbone) as cnn:
        many = predictor.answer_many(image, questions, top_k=3)
    assert cnn.batch_sizes == [1]
    assert len(many) == len(questions)
    for question, answers in zip(questions, many):
        single = predictor.answer(image, question, top_k=3)
        assert list(answers) == list(single)
        assert list(answers.values()) == pytest.approx(list(single.values()), abs=1e-6)


def test_answer_batch_shares_one_forward_pass_and_each_image_once(predictor):
    a, b = draw_shape("red", "circle"), draw_shape("blue", "rectangle", seed=2)
    with ForwardCounter(predictor.model.image_encoder.backbone) as cnn:
        batch = predictor.answer_batch([a, b, a], [QUESTION, QUESTION, "is there a circle?"], top_k=2)
    assert cnn.batch_sizes == [2]  # one pass, image a once
    assert [list(r) for r in batch] == [list(predictor.answer(i, q, top_k=2)) for i, q in
                                        [(a, QUESTION), (b, QUESTION), (a, "is there a circle?")]]
    with pytest.raises(InputError, match="request 2 of 2: the question is empty"):
        predictor.answer_batch([a, b], [QUESTION, " "])
    with pytest.raises(InputError, match="2 images but 1 questions"):
        predictor.answer_batch([a, b], [QUESTION])


def test_answer_many_names_the_bad_question(predictor):
    with pytest.raises(InputError, match="question 2 of 3: the question is empty"):
        predictor.answer_many(draw_shape("red", "circle"), [QUESTION, "", QUESTION])
    with pytest.raises(InputError, match="no questions"):
        predictor.answer_many(draw_shape("red", "circle"), [])


def test_describe_reports_the_model_card_facts(predictor):
    facts = predictor.describe()
    assert facts["dataset"] == "easy-vqa"
    assert facts["num_answers"] == 13 and len(facts["answers"]) == 13 and "yes" in facts["answers"]
    assert facts["backbone"] == "test_resnet"
    assert facts["test_accuracy"] == 12.5
    assert facts["parameters"] > 0


def test_forward_gives_probabilities_per_question_and_runs_each_image_once(predictor):
    images = [draw_shape("red", "circle"), draw_shape("blue", "rectangle", seed=2)]
    pixels = torch.stack([predictor.image_pixels(i) for i in images])
    ids = [predictor.encode(q) for q in (QUESTION, "is there a circle?", "what shape is it?")]
    with ForwardCounter(predictor.model.image_encoder.backbone) as cnn:
        probabilities, scores = predictor.forward(pixels, torch.tensor([0, 1, 0]), ids)
    assert cnn.batch_sizes == [2] and scores is None  # no detector in this checkpoint
    assert probabilities.shape == (3, NUM_ANSWERS)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))
    for row, (image, question) in enumerate([(images[0], QUESTION), (images[1], "is there a circle?"),
                                             (images[0], "what shape is it?")]):
        single = predictor.answer(image, question, top_k=NUM_ANSWERS)
        for answer, probability in single.items():
            assert float(probabilities[row, predictor.config.label2id[answer]]) == pytest.approx(probability, abs=1e-6)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_phone_photo_turned_by_exif_gets_the_answers_of_the_upright_image(predictor, orientation):
    upright = draw_shape("red", "rectangle", seed=5)  # the shape sits off-centre: every turn looks different
    stored = exif_jpeg(upright, orientation)
    with Image.open(io.BytesIO(stored)) as photo:
        as_stored = Image.fromarray(np.asarray(photo))  # the sensor's pixels, EXIF dropped: what not to see
    reference = jpeg_bytes(upright, quality=95, subsampling=0)
    seen = predictor.image_pixels(stored)
    assert (seen - predictor.image_pixels(reference)).abs().mean() < 0.01  # JPEG noise only
    assert (predictor.image_pixels(as_stored) - predictor.image_pixels(reference)).abs().mean() > 0.05

    expected = predictor.answer(reference, QUESTION, top_k=NUM_ANSWERS)
    answers = predictor.answer(stored, QUESTION, top_k=NUM_ANSWERS)
    unturned = predictor.answer(as_stored, QUESTION, top_k=NUM_ANSWERS)
    assert max(abs(answers[a] - p) for a, p in expected.items()) < 2e-5
    assert max(abs(unturned[a] - p) for a, p in expected.items()) > 5e-5  # the control: a turn does matter


# What to trust: Predictor.assess and Answer.

def test_assess_without_detectors_has_nothing_to_flag(predictor):
    image = draw_shape("red", "circle")
    answer = predictor.assess(image, QUESTION, top_k=3)
    assert isinstance(answer, Answer)
    assert answer.answers == predictor.answer(image, QUESTION, top_k=3)
    top, probability = next(iter(answer.answers.items()))
    assert answer.confidence == probability
    assert answer.details() == {"answer": top, "confidence": probability, "not_sure": False,
                                "confidence_threshold": None, "unusual_image": False, "image_score": None,
                                "image_threshold": None, "unknown_words": []}


def test_answer_flags_follow_their_thresholds():
    answer = Answer({"red": 0.6, "blue": 0.4}, 0.6, threshold=0.6, image_score=3.0, image_threshold=3.0)
    assert not answer.not_sure and not answer.unusual_image  # at the threshold: not flagged
    answer = Answer({"red": 0.6, "blue": 0.4}, 0.6, threshold=0.61, image_score=3.01, image_threshold=3.0)
    assert answer.not_sure and answer.unusual_image
    assert answer.details()["not_sure"] and answer.details()["unusual_image"]


TRAINING_QUESTIONS = ["what color is the shape?", "is there a circle?", "is there a red shape?",
                      "what shape is in the image?"]


@pytest.fixture(scope="module")
def detecting(tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny checkpoint with a word list, an OOD density fitted on the model's own
    pooled features of drawn shapes (32 fitted, 16 held out), and a card answer_threshold of 0.99."""
    folder = tmp_path_factory.mktemp("detecting") / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    plain = Predictor.from_checkpoint(tiny_checkpoint)
    shapes = [draw_shape(color, shape, seed=n) for n in range(48)
              for color, shape in [(sorted(COLORS)[n % 4], SHAPES[n // 4 % 2])]]
    with torch.no_grad():
        features = plain.model.pooled_features(
            plain.model.image_features(torch.stack([plain.image_pixels(s) for s in shapes]))).numpy()
    density = FeatureDensity().fit(features[:32], features[32:])
    density.save(folder)
    WordVocabulary.from_questions(TRAINING_QUESTIONS).save(folder)
    card = (folder / "README.md").read_text()
    card = card.replace("test_accuracy: 12.5", "test_accuracy: 12.5\nanswer_threshold: 0.99")
    (folder / "README.md").write_text(card)
    return Predictor.from_checkpoint(folder), density, shapes[32:]


def noise_image(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_assess_names_unknown_words_flags_an_unusual_image_and_low_confidence(detecting):
    predictor, density, _ = detecting
    assert predictor.words is not None and predictor.density is not None and predictor.threshold == 0.99
    answer = predictor.assess(noise_image(), "What COLOR is the zorblax in the picture?", top_k=3)
    assert answer.unknown_words == ["zorblax", "picture"]  # "What COLOR" is folded to known words
    assert answer.image_threshold == density.threshold
    assert answer.unusual_image and answer.image_score > density.threshold
    assert answer.not_sure and answer.confidence < 0.99  # an untrained model is never that sure
    details = answer.details()
    assert details["unknown_words"] == ["zorblax", "picture"]
    assert details["unusual_image"] is True and details["image_score"] == answer.image_score
    assert details["image_threshold"] == density.threshold
    assert details["not_sure"] is True and details["confidence_threshold"] == 0.99
    facts = predictor.describe()
    assert facts["answer_threshold"] == 0.99 and facts["ood_threshold"] == density.threshold


def test_assess_many_gives_each_question_the_flags_of_assess(detecting):
    predictor, _, _ = detecting
    questions = ["what color is the shape?", "What COLOR is the zorblax?"]
    many = predictor.assess_many(noise_image(), questions, top_k=3)
    for question, answer in zip(questions, many):
        single = predictor.assess(noise_image(), question, top_k=3)
        assert list(answer.answers) == list(single.answers)
        assert answer.confidence == pytest.approx(single.confidence, abs=1e-6)
        assert answer.notes() == single.notes()
    assert many[0].notes() == ["unusual image", "not sure (below the threshold of 99.00 %)"]
    assert many[1].notes() == ["unusual image", "never seen in training: zorblax",
                               "not sure (below the threshold of 99.00 %)"]
    assert predictor.answer_many(noise_image(), questions, top_k=3) == [a.answers for a in many]


def test_percent_shows_two_decimals():
    assert percent(0.999853253364563) == "99.99 %"
    assert [percent(p) for p in (1.0, 0.05, 0.0)] == ["100.00 %", "5.00 %", "0.00 %"]


def test_assess_scores_the_image_with_the_fitted_density(detecting):
    predictor, density, heldout = detecting
    answer = predictor.assess(heldout[0], "is there a circle?")
    assert answer.unknown_words == []
    with torch.no_grad():
        features = predictor.model.image_features(predictor.image_pixels(heldout[0])[None])
        features = predictor.model.pooled_features(features)
    assert answer.image_score == pytest.approx(float(density.score(features.numpy())[0]), rel=1e-6)
    assert not answer.unusual_image  # a held-out image: the threshold was set at the highest of them
    # The scores come per image from one forward pass, in the order of the image rows.
    pixels = torch.stack([predictor.image_pixels(heldout[0]), predictor.image_pixels(noise_image(1))])
    _, scores = predictor.forward(pixels, torch.tensor([1, 0]), [predictor.encode(QUESTION)] * 2)
    assert scores.shape == (2,) and scores[0] == pytest.approx(answer.image_score, rel=1e-6)
    assert scores[1] > density.threshold


def test_a_batch_gives_each_answer_the_score_of_its_own_image(detecting):
    predictor, density, heldout = detecting
    normal, noise = heldout[0], noise_image(2)

    def alone(image):  # the detector's score of this image by itself
        pixels = predictor.image_pixels(image)[None]
        with torch.no_grad():
            features = predictor.model.pooled_features(predictor.model.image_features(pixels))
        return float(density.score_images(features.numpy(), pixels)[0])

    expected = {"normal": alone(normal), "noise": alone(noise)}
    assert expected["noise"] > density.threshold >= expected["normal"]
    normal_request = predictor.prepare(normal, QUESTION)
    noise_request = predictor.prepare(noise, QUESTION)
    noise_again = dataclasses.replace(noise_request, input_ids=predictor.encode("is there a circle?"))
    answers = predictor.run_prepared([normal_request, noise_request, noise_again])  # one forward pass, 2 images
    assert [a.image_score for a in answers] == pytest.approx(
        [expected["normal"], expected["noise"], expected["noise"]], rel=1e-5)
    assert [a.unusual_image for a in answers] == [False, True, True]


# Attention checkpoints.

def test_attention_gives_one_overlay_per_glimpse(attention_checkpoint, predictor):
    attending = Predictor.from_checkpoint(attention_checkpoint)
    image = draw_shape("green", "circle", size=100)
    overlays = attending.attention(image, QUESTION)
    assert len(overlays) == 2 and all(o.mode == "RGB" and o.size == (256, 256) for o in overlays)
    assert_all_answers(attending, attending.answer(image, QUESTION, top_k=NUM_ANSWERS))
    assert predictor.attention(image, QUESTION) is None  # the pooled model has no maps
    with pytest.raises(InputError, match="no image"):
        attending.attention(None, QUESTION)
    with pytest.raises(InputError, match="question is empty"):
        attending.attention(image, " ")


# Bad input: each is an InputError whose message names the problem.

@pytest.mark.parametrize("question, message", [
    ("", "question is empty"),
    ("   \n\t ", "question is empty"),
    (None, "no question"),
    (42, "must be text"),
    ("what\x00color?", "NUL byte"),
    ("x" * (MAX_QUESTION_CHARS + 1),
     f"{MAX_QUESTION_CHARS + 1} characters long, over the limit of {MAX_QUESTION_CHARS}"),
])
def test_bad_questions_are_refused_by_name(predictor, question, message):
    with pytest.raises(InputError, match=message):
        predictor.answer(draw_shape("red", "circle"), question)


@pytest.mark.parametrize("question", ["\u200b\u200b", "\ufeff", " \u200c\u200d\u2060 ", "\u200b \t\u200b"])
def test_a_question_of_only_zero_width_characters_is_empty(predictor, question):
    with pytest.raises(InputError, match="the question is empty"):
        check_question(question)
    with pytest.raises(InputError, match="the question is empty"):
        predictor.answer(draw_shape("red", "circle"), question)


@pytest.mark.parametrize("question", ["😀😀😀😀", "!!!", "?!", "🔺 🟦 🤔 ?", "-- ... ''", "\u200b!\u200b"])
def test_a_question_without_words_is_refused(predictor, question):
    with pytest.raises(InputError, match=r"the question has no words \(only symbols or emoji\): ask in words"):
        predictor.answer(draw_shape("red", "circle"), question)


def test_a_question_of_unknown_words_is_answered_and_flagged(detecting):
    predictor, _, _ = detecting
    answer = predictor.assess(draw_shape("red", "circle"), "zorblax 😀 flibbertigibbet?!")
    assert answer.unknown_words == ["zorblax", "flibbertigibbet"]  # every word: the notice names them all
    assert check_question(" 7 😀 ") == "7 😀"  # a digit is a word


def test_a_question_at_the_length_limit_is_answered(predictor):
    assert_all_answers(predictor, predictor.answer(draw_shape("red", "circle"), "y" * MAX_QUESTION_CHARS,
                                                   top_k=NUM_ANSWERS))
    with pytest.raises(InputError, match="over the limit"):
        predictor.answer(draw_shape("red", "circle"), "y" * (MAX_QUESTION_CHARS + 1))


@pytest.mark.parametrize("question", ["what \udcff color", "\ud800", "ok \udfff"])
def test_text_that_was_not_utf8_is_refused(predictor, question):
    # Python hands command-line bytes that are not UTF-8 over as lone surrogates (U+DC80..U+DCFF).
    with pytest.raises(InputError, match="not valid UTF-8"):
        check_question(question)
    with pytest.raises(InputError, match="not valid UTF-8"):
        predictor.answer(draw_shape("red", "circle"), question)


def test_no_image_is_refused(predictor):
    with pytest.raises(InputError, match="no image"):
        predictor.answer(None, QUESTION)
    with pytest.raises(InputError, match="no image"):
        predictor.explain(None, QUESTION)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("content, message", [
    (b"this is not an image", "not a readable image"),
    (b"", r"empty \(0 bytes\)"),
    (png_bytes(draw_shape("red", "circle"))[:60], "could not be decoded|not a readable image"),
    (png_claiming_size(20000, 20000), "over the limit of 40000000 pixels"),
    (jpeg_claiming_size(20000, 20000), "over the limit of 40000000 pixels"),
    (png_claiming_size(7000, 7000), "7000x7000 = 49000000 pixels, over the limit of 40000000"),
])
def test_bad_image_files_are_refused_by_name(predictor, tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        predictor.answer(path, QUESTION)
    with pytest.raises(InputError, match=message):
        predictor.answer(content, QUESTION)


def test_missing_image_file_is_refused(predictor, tmp_path):
    with pytest.raises(InputError, match="image file not found"):
        predictor.answer(tmp_path / "nothing.png", QUESTION)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_is_refused_in_bounded_memory(tmp_path):
    """20000 x 20000 RGB would take 1.2 GB decoded, 7000 x 7000 147 MB: each must be refused from its header."""
    (tmp_path / "huge.png").write_bytes(png_claiming_size(20000, 20000))
    (tmp_path / "huge.jpg").write_bytes(jpeg_claiming_size(20000, 20000))
    (tmp_path / "big.png").write_bytes(png_claiming_size(7000, 7000))
    # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, from before
    # exec), taken after the imports (torch alone is hundreds of MB) and after the opening attempts.
    script = (
        "import sys; from vqa.images import open_image; from vqa.errors import InputError\n"
        "def peak():\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "baseline = peak()\n"
        "for name in ('huge.png', 'huge.jpg', 'big.png'):\n"
        "    try: open_image(sys.argv[1] + '/' + name); sys.exit(name + ' was opened')\n"
        "    except InputError: pass\n"
        "print(peak() - baseline)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert int(result.stdout) < 50_000  # growth of the peak in KiB: no decoded image


def animated_gif() -> bytes:
    frames = [draw_shape(c, "circle") for c in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    gray = np.asarray(draw_shape("blue", "rectangle").convert("L"), np.uint16) * 257
    image = Image.fromarray(gray)
    assert image.mode == "I;16"
    return png_bytes(image)


@pytest.mark.parametrize("image", [
    draw_shape("red", "circle").convert("L"),
    draw_shape("red", "circle").convert("1"),
    draw_shape("red", "circle").convert("RGBA"),
    draw_shape("red", "circle").convert("LA"),
    draw_shape("red", "circle").convert("P"),
    draw_shape("red", "circle").convert("CMYK"),
    png_bytes(draw_shape("red", "circle").convert("P")),
    sixteen_bit_png(),
    animated_gif(),
    np.asarray(draw_shape("red", "circle")),  # (H, W, 3) uint8
    np.asarray(draw_shape("red", "circle").convert("L"), np.float32),  # (H, W) float
    draw_shape("red", "circle", size=300).crop((0, 0, 300, 120)),  # not square
    draw_shape("red", "circle", size=8),  # smaller than the model's input
], ids=["L", "1", "RGBA", "LA", "P", "CMYK", "P-png", "I16-png", "animated-gif", "array-rgb", "array-float", "wide",
        "tiny"])
def test_any_image_mode_is_converted_and_answered(predictor, image):
    assert_all_answers(predictor, predictor.answer(image, QUESTION, top_k=NUM_ANSWERS))


@pytest.mark.parametrize("question", [
    "WHAT COLOR IS THE SHAPE???",
    "quelle est la couleur de la forme ?",
    "какого цвета фигура?",
    "形状是什么颜色？",
    "is there a 🔺 or a 🟦 in the image? 🤔",
    "colour of the zorblax flibbertigibbet",
    "a",
    "a?!",
    "what " * 59 + "is it",  # far more pieces than max_question_tokens
])
def test_any_text_is_answered(predictor, question):
    assert_all_answers(predictor, predictor.answer(draw_shape("yellow", "rectangle"), question, top_k=NUM_ANSWERS))


def test_top_k_must_be_a_positive_whole_number(predictor):
    for top_k in (0, -3, 2.5, "3", True):
        with pytest.raises(InputError, match="top_k"):
            predictor.answer(draw_shape("red", "circle"), QUESTION, top_k=top_k)


# Shared batches for concurrent callers.

JOBS = [(draw_shape(c, s, seed=i), QUESTION if i != 4 else "") for i, (c, s) in
        enumerate([(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "rectangle")])]


def test_batching_predictor_shares_a_forward_pass_and_keeps_errors_to_their_caller(predictor, monkeypatch):
    run_prepared = predictor.run_prepared
    first_pass, gate = threading.Event(), threading.Event()

    def gated(requests):  # holds the first pass so that the other callers queue up behind it
        first_pass.set()
        if not gate.wait(timeout=30):
            raise AssertionError("the test never opened the gate")
        return run_prepared(requests)

    waiting = []

    class WatchedFuture(Future):
        """BatchingPredictor.answer queues its request, then waits on its Future: count the waiters."""

        def result(self, timeout=None):
            waiting.append(self)
            return super().result(timeout)

    monkeypatch.setattr(predictor, "run_prepared", gated)
    monkeypatch.setattr(vqa.predict, "Future", WatchedFuture)
    batcher = BatchingPredictor(predictor, max_batch_size=16)
    results: dict[int, object] = {}

    def call(i, image, question):
        try:
            results[i] = batcher.answer(image, question)
        except InputError as error:
            results[i] = error

    threads = [threading.Thread(target=call, args=(i, *job), daemon=True) for i, job in enumerate(JOBS)]
    threads[0].start()
    wait_until(first_pass.is_set, 30, "the first request never reached a forward pass")
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(waiting) == len(JOBS) - 1 and 4 in results, 30,
               "the other good requests did not all queue up (the bad one fails in its own thread)")
    gate.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), f"{thread.name}: a caller never got its answer"

    assert list(batcher.batch_sizes) == [1, len(JOBS) - 2]
    assert isinstance(results[4], InputError) and "question is empty" in str(results[4])
    for i, (image, question) in enumerate(JOBS):
        if i != 4:
            expected = run_prepared([predictor.prepare(image, question)])[0]
            assert isinstance(results[i], Answer)
            assert list(results[i].answers) == list(expected.answers)
            assert list(results[i].answers.values()) == pytest.approx(list(expected.answers.values()), abs=1e-5)


def test_a_failing_forward_pass_fails_its_callers_and_the_batcher_goes_on(predictor, monkeypatch):
    run_prepared = predictor.run_prepared
    failing = threading.Event()
    failing.set()

    def maybe_failing(requests):
        if failing.is_set():
            raise RuntimeError("bug in the forward pass")
        return run_prepared(requests)

    monkeypatch.setattr(predictor, "run_prepared", maybe_failing)
    batcher = BatchingPredictor(predictor)
    with pytest.raises(RuntimeError, match="bug in the forward pass"):
        call_within(30, batcher.answer, JOBS[0][0], QUESTION)
    failing.clear()
    answer = call_within(30, batcher.answer, JOBS[0][0], QUESTION, top_k=2)
    assert answer.answers == predictor.answer(JOBS[0][0], QUESTION, top_k=2)


# The command line.

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqa.predict", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_json(tiny_checkpoint, tmp_path):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    result = run_cli("--checkpoint", tiny_checkpoint, "--image", image, "--question", QUESTION, "--json")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert answers == pytest.approx(Predictor.from_checkpoint(tiny_checkpoint).answer(image, QUESTION), abs=1e-6)
    assert list(answers.values()) == sorted(answers.values(), reverse=True)


def test_cli_prints_the_top_k_answers(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    assert predict_main(["--checkpoint", str(tiny_checkpoint), "--image", str(image), "--question", QUESTION,
                         "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[0].endswith("%") for line in lines)
    expected = Predictor.from_checkpoint(tiny_checkpoint).answer(image, QUESTION, top_k=3)
    assert [line.split()[1] for line in lines] == list(expected)


@pytest.mark.parametrize("change, message", [
    ({"--question": "  "}, "question is empty"),
    ({"--checkpoint": "no-such-checkpoint"}, "checkpoint folder not found"),
    ({"--image": "no-such-image.png"}, "image file not found"),
    ({"--image": "empty.png"}, r"empty (0 bytes)"),
])
def test_cli_exits_2_naming_the_problem(tiny_checkpoint, tmp_path, capsys, change, message):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    (tmp_path / "empty.png").write_bytes(b"")
    options = {"--checkpoint": str(tiny_checkpoint), "--image": str(image), "--question": QUESTION}
    options.update({k: str(tmp_path / v) if k != "--question" else v for k, v in change.items()})
    assert predict_main([part for pair in options.items() for part in pair]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert len(error.strip().splitlines()) == 1  # the message, no traceback


def test_cli_refuses_a_question_that_is_not_utf8_in_one_line(tiny_checkpoint, tmp_path):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    result = subprocess.run([sys.executable, "-m", "vqa.predict", "--checkpoint", str(tiny_checkpoint),
                             "--image", str(image), "--question", b"what \xff color"],
                            cwd=ROOT, capture_output=True, timeout=120, env={**os.environ, "PYTHONUTF8": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    assert len(lines) == 1, lines  # the message, no traceback
    assert lines[0].startswith("error: ") and "not valid UTF-8" in lines[0]
    assert result.stdout == b""
