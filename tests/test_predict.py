"""Predictor: answers, top-k, one CNN pass per image, input checking, shared batches, the CLI."""

import io
import json
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, draw_shape
from vqa.errors import InputError
from vqa.predict import MAX_QUESTION_CHARS, BatchingPredictor, Predictor
from vqa.predict import main as predict_main
from vqa.text import pad_questions

QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


class ForwardCounter:
    """Counts forward calls of a module and the batch size of each."""

    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batch_sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim width x height pixels."""
    buffer = io.BytesIO()
    draw_shape("red", "circle", size=16).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


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


def test_a_question_at_the_length_limit_is_answered(predictor):
    assert predictor.answer(draw_shape("red", "circle"), "y" * MAX_QUESTION_CHARS)


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
    """20000 x 20000 RGB would take 1.2 GB decoded: it must be refused from its header."""
    (tmp_path / "huge.png").write_bytes(png_claiming_size(20000, 20000))
    (tmp_path / "huge.jpg").write_bytes(jpeg_claiming_size(20000, 20000))
    script = (
        "import sys; from vqa.images import open_image; from vqa.errors import InputError\n"
        "for name in ('huge.png', 'huge.jpg'):\n"
        "    try: open_image(sys.argv[1] + '/' + name); sys.exit(name + ' was opened')\n"
        "    except InputError: pass\n"
        # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, from before exec).
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    assert int(result.stdout) < 200_000  # peak resident memory in KiB: no decoded 1.2 GB image


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
    answers = predictor.answer(image, QUESTION)
    assert len(answers) == 5 and all(0 < p <= 1 for p in answers.values())


@pytest.mark.parametrize("question", [
    "WHAT COLOR IS THE SHAPE???",
    "quelle est la couleur de la forme ?",
    "какого цвета фигура?",
    "形状是什么颜色？",
    "is there a 🔺 or a 🟦 in the image? 🤔",
    "colour of the zorblax flibbertigibbet",
    "a",
    "?!",
    "what " * 59 + "is it",  # far more pieces than max_question_tokens
])
def test_any_text_is_answered(predictor, question):
    answers = predictor.answer(draw_shape("yellow", "rectangle"), question)
    assert len(answers) == 5 and sum(answers.values()) <= 1 + 1e-6


def test_top_k_must_be_a_positive_whole_number(predictor):
    for top_k in (0, -3, 2.5, "3", True):
        with pytest.raises(InputError, match="top_k"):
            predictor.answer(draw_shape("red", "circle"), QUESTION, top_k=top_k)


# Shared batches for concurrent callers.

def test_batching_predictor_shares_a_forward_pass_and_keeps_errors_to_their_caller(predictor, monkeypatch):
    run_prepared = predictor.run_prepared
    gate = threading.Event()

    def gated(requests):  # holds the first pass so that the other callers queue up behind it
        gate.wait(timeout=10)
        return run_prepared(requests)

    monkeypatch.setattr(predictor, "run_prepared", gated)
    batcher = BatchingPredictor(predictor, max_batch_size=16)
    jobs = [(draw_shape(c, s, seed=i), QUESTION if i != 4 else "") for i, (c, s) in
            enumerate([(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "rectangle")])]
    results: dict[int, object] = {}

    def call(i, image, question):
        try:
            results[i] = batcher.answer(image, question)
        except InputError as error:
            results[i] = error

    threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
    threads[0].start()
    while not batcher.batch_sizes:  # the first request is in the (held) first pass
        threading.Event().wait(0.01)
    for thread in threads[1:]:
        thread.start()
    while batcher._pending.qsize() < len(jobs) - 2:  # all others but the bad one are waiting
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join(timeout=30)

    assert list(batcher.batch_sizes) == [1, len(jobs) - 2]
    assert isinstance(results[4], InputError) and "question is empty" in str(results[4])
    monkeypatch.setattr(predictor, "run_prepared", run_prepared)
    for i, (image, question) in enumerate(jobs):
        if i != 4:
            expected = predictor.answer(image, question)
            assert list(results[i]) == list(expected)
            assert list(results[i].values()) == pytest.approx(list(expected.values()), abs=1e-5)


# The command line.

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqa.predict", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_json_and_exits_2_with_the_error_for_bad_input(tiny_checkpoint, tmp_path):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    result = run_cli("--checkpoint", tiny_checkpoint, "--image", image, "--question", QUESTION, "--json")
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert len(answers) == 5 and list(answers.values()) == sorted(answers.values(), reverse=True)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = run_cli("--checkpoint", tiny_checkpoint, "--image", bad, "--question", QUESTION)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "0 bytes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # the message, no traceback


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
])
def test_cli_exits_2_naming_the_problem(tiny_checkpoint, tmp_path, capsys, change, message):
    image = tmp_path / "shape.png"
    draw_shape("red", "circle").save(image)
    options = {"--checkpoint": str(tiny_checkpoint), "--image": str(image), "--question": QUESTION}
    options.update({k: str(tmp_path / v) if k != "--question" else v for k, v in change.items()})
    assert predict_main([part for pair in options.items() for part in pair]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
