"""Helpers the tests share: paths, tiny configs, drawn images, crafted files, waiting with a deadline.

Plain functions and constants only; the pytest fixtures built from them live in conftest.py.
Test files import these with `from fixtures import ...` (pytest puts tests/ on sys.path), never
from conftest.py or from one another.
"""

import io
import json
import queue
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw

from vqa.checkpoint import save_checkpoint
from vqa.config import VQAConfig
from vqa.model import VQAModel

__all__ = ["ROOT", "SHIPPED_CHECKPOINT", "COLORS", "SHAPES", "QUESTION", "TINY_CARD", "tiny_config",
           "save_tiny_checkpoint", "draw_shape", "make_vqa_v2_files", "png_bytes", "jpeg_bytes",
           "png_claiming_size", "jpeg_claiming_size", "exif_jpeg", "free_port", "http_get", "wait_until",
           "call_within", "ForwardCounter"]

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CHECKPOINT = ROOT / "checkpoints" / "easy-vqa"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "rectangle")
QUESTION = "what color is the shape?"


def tiny_config(answers, vocab_size, **overrides) -> VQAConfig:
    """A VQAConfig small enough for CPU tests: timm's test_resnet at 64 px, 16 to 32 units per layer."""
    sizes = dict(backbone="test_resnet", image_size=64, embed_dim=16, lstm_hidden=24, lstm_layers=2,
                 common_dim=32, classifier_hidden=32, dropout=0.1)
    sizes.update(overrides)
    return VQAConfig(vocab_size=vocab_size, id2label=dict(enumerate(answers)),
                     label2id={a: i for i, a in enumerate(answers)}, **sizes)


TINY_CARD = "---\ndataset: \"easy-vqa\"\ntest_accuracy: 12.5\n---\n\n# tiny test model\n"


def save_tiny_checkpoint(folder: Path, answers, tokenizer, seed: int = 0, card: str = TINY_CARD, **overrides) -> Path:
    """An untrained tiny_config model (weights drawn from `seed`) saved as a real checkpoint folder."""
    torch.manual_seed(seed)
    model = VQAModel(tiny_config(answers, len(tokenizer), **overrides))
    return save_checkpoint(model.eval(), tokenizer, folder, card)


def draw_shape(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """One filled circle or rectangle on white, placed and sized by `seed` (easy-VQA-like)."""
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
    10 human answers per question with some disagreement (as real annotators give).

    Image ids are 1000, 1007, 1014, ...; question ids are image_id * 10 + (0, 1).
    """
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


# Image files, well-formed and crafted.

def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
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
    data = bytearray(jpeg_bytes(draw_shape("red", "circle", size=16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_jpeg(upright: "Image.Image | np.ndarray", orientation: int) -> bytes:
    """A JPEG storing `upright` as a phone camera would under EXIF `orientation` (1..8), tag set.

    Stored layouts follow the EXIF 2.3 wording ("the 0th row is the visual ..., the 0th column
    is the visual ..."), written with numpy, independently of PIL's own table.
    """
    a = np.asarray(upright.convert("RGB") if isinstance(upright, Image.Image) else upright)
    stored = {
        1: a,  # row 0 = top, column 0 = left
        2: a[:, ::-1],  # row 0 = top, column 0 = right
        3: a[::-1, ::-1],  # row 0 = bottom, column 0 = right
        4: a[::-1, :],  # row 0 = bottom, column 0 = left
        5: a.transpose(1, 0, 2),  # row 0 = left, column 0 = top
        6: np.rot90(a, 1),  # row 0 = right, column 0 = top
        7: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 = right, column 0 = bottom
        8: np.rot90(a, -1),  # row 0 = left, column 0 = bottom
    }[orientation]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return jpeg_bytes(Image.fromarray(np.ascontiguousarray(stored)), quality=95, subsampling=0, exif=exif)


# Servers and waiting.

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


def wait_until(condition, timeout: float, message: str, interval: float = 0.01):
    """Poll `condition()` until it is true (returned), or raise AssertionError(message) after
    `timeout` seconds: a test waits with a deadline and says what never happened, never hangs."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout} s)")
        time.sleep(interval)


def call_within(seconds: float, function, *args, **kwargs):
    """function(*args, **kwargs) in a daemon thread: its result (or its exception, raised here),
    or AssertionError naming the function when it has not returned after `seconds`."""
    box: queue.Queue = queue.Queue()

    def run():
        try:
            box.put((True, function(*args, **kwargs)))
        except BaseException as error:  # handed to the caller, whatever it is
            box.put((False, error))

    threading.Thread(target=run, daemon=True).start()
    try:
        returned, value = box.get(timeout=seconds)
    except queue.Empty:
        name = getattr(function, "__qualname__", function)
        raise AssertionError(f"{name} did not return within {seconds} s") from None
    if not returned:
        raise value
    return value


class ForwardCounter:
    """Records the batch size (first dimension of the first input) of every forward call of a
    module while in the `with` block."""

    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.batch_sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
