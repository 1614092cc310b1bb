"""Shared test data: a tiny checkpoint and small VQA v2-layout files, made offline."""

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vqa.checkpoint import save_checkpoint  # noqa: E402
from vqa.config import VQAConfig  # noqa: E402
from vqa.model import VQAModel  # noqa: E402
from vqa.text import QuestionTokenizer  # noqa: E402

SHIPPED_CHECKPOINT = ROOT / "checkpoints" / "easy-vqa"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "rectangle")


def tiny_config(answers, vocab_size, **overrides) -> VQAConfig:
    sizes = dict(backbone="test_resnet", image_size=64, crop_pct=1.0, embed_dim=16, lstm_hidden=24, lstm_layers=2,
                 common_dim=32, classifier_hidden=32, dropout=0.1)
    sizes.update(overrides)
    return VQAConfig(vocab_size=vocab_size, id2label=dict(enumerate(answers)),
                     label2id={a: i for i, a in enumerate(answers)}, **sizes)


def draw_shape(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.randint(2, size // 3), rng.randint(2, size // 3)
    x1, y1 = x0 + rng.randint(size // 3, size // 2), y0 + rng.randint(size // 3, size // 2)
    (draw.ellipse if shape == "circle" else draw.rectangle)((x0, y0, x1, y1), fill=COLORS[color])
    return image


def make_vqa_v2_files(folder: Path, n_images: int = 8, subtype: str = "val2014", seed: int = 0,
                      with_annotations: bool = True) -> dict:
    """Small VQA v2-layout data: COCO-named JPEGs of coloured shapes, 2 questions each,
    10 human answers per question with some disagreement (as real annotators give)."""
    folder = Path(folder)
    image_dir = folder / subtype
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions, annotations = [], []
    for n in range(n_images):
        image_id = 1000 + 7 * n
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        draw_shape(color, shape, seed=seed * 100 + n).save(image_dir / f"COCO_{subtype}_{image_id:012d}.jpg", quality=95)
        for k, (text, answer, answer_type, question_type) in enumerate([
            ("What color is the shape?", color, "other", "what color is the"),
            (f"Is there a {shape}?", "yes", "yes/no", "is there a"),
        ]):
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": text, "question_id": qid})
            human = [answer] * 8 + [rng.choice(["Yes.", "two", "the dog", answer.capitalize()])] * 2
            annotations.append({
                "question_id": qid, "image_id": image_id, "question_type": question_type,
                "answer_type": answer_type, "multiple_choice_answer": answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(human)],
            })
    q_file = folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    q_file.write_text(json.dumps({"data_subtype": subtype, "questions": questions}))
    files = {"questions": q_file, "images": image_dir, "annotations": None}
    if with_annotations:
        a_file = folder / f"v2_mscoco_{subtype}_annotations.json"
        a_file.write_text(json.dumps({"data_subtype": subtype, "annotations": annotations}))
        files["annotations"] = a_file
    return files


@pytest.fixture(scope="session")
def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return sorted(easy_vqa.get_answers())


@pytest.fixture(scope="session")
def easy_vqa_tokenizer() -> QuestionTokenizer:
    import easy_vqa

    return QuestionTokenizer.train(easy_vqa.get_train_questions()[0], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, easy_vqa_answers, easy_vqa_tokenizer) -> Path:
    """An untrained tiny model over the easy-VQA answers, saved as a real checkpoint."""
    import torch

    torch.manual_seed(0)
    model = VQAModel(tiny_config(easy_vqa_answers, len(easy_vqa_tokenizer)))
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    card = "---\ndataset: \"easy-vqa\"\ntest_accuracy: 12.5\n---\n\n# tiny test model\n"
    return save_checkpoint(model.eval(), easy_vqa_tokenizer, folder, card)


@pytest.fixture
def vqa_v2_files(tmp_path) -> dict:
    return make_vqa_v2_files(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """app.py on the shipped checkpoint, in a subprocess on a free port (shared by the app and browser tests)."""
    if not (SHIPPED_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"the shipped checkpoint {SHIPPED_CHECKPOINT} is not there (train it with training/train.py)")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio-cache"))}
    log = tmp_path_factory.mktemp("app") / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--checkpoint", str(SHIPPED_CHECKPOINT)],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            if http_get(url)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"app.py did not serve within 180 s:\n{log.read_text()}")
    yield {"url": url, "process": process, "log": log}
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
