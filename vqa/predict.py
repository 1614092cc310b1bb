"""Predictor: answers questions about images with a trained checkpoint. No Gradio here.

    python -m vqa.predict --checkpoint checkpoints/easy-vqa --image shape.png --question "what color is the shape?"
    python -m vqa.predict --checkpoint checkpoints/easy-vqa --image shape.png --question "is there a circle?" \
        --top-k 3 --json

Every user mistake (no image, empty, wordless or over-long question, corrupt or huge image) raises
InputError with a message that names the problem; anything else is a bug.
"""

import argparse
import json
import queue
import sys
import threading
import unicodedata
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .batching import unique_rows
from .checkpoint import load_checkpoint, read_card
from .errors import CheckpointError, InputError
from .explain import attention_overlays, explain_answer
from .images import open_image
from .model import architecture
from .reliability.ood import FeatureDensity
from .reliability.words import WordVocabulary, question_words
from .text import pad_questions

MAX_QUESTION_CHARS = 300
DEFAULT_TOP_K = 5
NO_IMAGE = "no image: upload an image (or pick an example) and ask again"


def check_question(question) -> str:
    """The question, stripped, or InputError naming what is wrong with it."""
    if question is None:
        raise InputError("no question: type a question about the image")
    if not isinstance(question, str):
        raise InputError(f"the question must be text, not {type(question).__name__}")
    if "\x00" in question:
        raise InputError("the question contains a NUL byte (\\x00); remove it and ask again")
    if any("\ud800" <= c <= "\udfff" for c in question):
        # Python hands bytes of a command line that are not UTF-8 over as lone surrogates.
        raise InputError("the question is not valid UTF-8 text; type it again in a UTF-8 terminal")
    question = question.strip()
    # Zero-width and other format characters (category Cf: U+200B, U+FEFF, ...) show as nothing.
    if all(c.isspace() or unicodedata.category(c) == "Cf" for c in question):
        raise InputError("the question is empty: type a question about the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(
            f"the question is {len(question)} characters long, over the limit of {MAX_QUESTION_CHARS}"
        )
    # Without a word the answer is a confident guess: the shipped models said "no" at 100 % to
    # "😀😀😀😀" and "triangle" at 93 % to "!!!". A word is what vqa.reliability.words counts as one.
    if not question_words(question):
        raise InputError("the question has no words (only symbols or emoji): ask in words")
    return question


def percent(probability: float) -> str:
    """'99.99 %': two decimals tell 0.9999 from 0.99 where a raw float shows 0.999853253364563."""
    return f"{100 * probability:.2f} %"


@dataclass
class Prepared:
    """One request, checked and preprocessed: ready for a forward pass."""

    pixels: torch.Tensor  # (3, H, W), the model's own transform applied
    input_ids: list[int]
    top_k: int
    unknown_words: list[str] = field(default_factory=list)


@dataclass
class Answer:
    """The top answers and what a person should know before trusting them."""

    answers: dict[str, float]  # {answer: probability}, most likely first
    confidence: float  # the top answer's probability
    threshold: float | None = None  # below it the model is "not sure" (None: no threshold in the checkpoint)
    image_score: float | None = None  # distance of the image from the training images (None: no detector)
    image_threshold: float | None = None  # above it the image is unlike the training images
    unknown_words: list[str] = field(default_factory=list)  # words of the question never seen in training

    @property
    def not_sure(self) -> bool:
        return self.threshold is not None and self.confidence < self.threshold

    @property
    def unusual_image(self) -> bool:
        return self.image_score is not None and self.image_score > self.image_threshold

    def notes(self) -> list[str]:
        """The reasons not to trust the answer, in a few words each (a table's "notes" column)."""
        notes = []
        if self.unusual_image:
            notes.append("unusual image")
        if self.unknown_words:
            notes.append("never seen in training: " + ", ".join(self.unknown_words))
        if self.not_sure:
            notes.append(f"not sure (below the threshold of {percent(self.threshold)})")
        return notes

    def details(self) -> dict:
        """What the API returns beside the answers."""
        return {"answer": next(iter(self.answers)), "confidence": self.confidence, "not_sure": self.not_sure,
                "confidence_threshold": self.threshold, "unusual_image": self.unusual_image,
                "image_score": self.image_score, "image_threshold": self.image_threshold,
                "unknown_words": self.unknown_words}


class Predictor:
    """A checkpoint loaded once, answering (image, question) pairs on CPU or GPU."""

    def __init__(self, model, tokenizer, card: dict | None = None, folder: str | Path | None = None,
                 density: FeatureDensity | None = None, words: WordVocabulary | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = model.config
        self.answers = self.config.answers
        self.card = card or {}
        self.folder = Path(folder) if folder is not None else None
        self.transform = model.image_transform()
        self.device = next(model.parameters()).device
        self.density = density  # out-of-distribution image detector fitted at training time
        self.words = words  # the training questions' words
        self.threshold = self.card.get("answer_threshold")  # confidence for at most 1 % wrong answers

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | None = None) -> "Predictor":
        """Load once; `device` defaults to the GPU when there is one."""
        model, tokenizer = load_checkpoint(folder)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, tokenizer, read_card(folder), folder, FeatureDensity.load(folder), WordVocabulary.load(folder))

    # Checking and preprocessing: runs in the caller's thread, before any batching.

    def check_top_k(self, top_k) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise InputError(f"top_k must be a whole number, not {top_k!r}")
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, not {top_k}")
        return min(top_k, len(self.answers))

    def image_pixels(self, image) -> torch.Tensor:
        """(3, H, W) model input from a path, bytes, PIL image or array; InputError if unusable."""
        if image is None:
            raise InputError(NO_IMAGE)
        return self.transform(open_image(image))

    def encode(self, question) -> list[int]:
        return self.tokenizer.encode(check_question(question), self.config.max_question_tokens)

    def prepare(self, image, question, top_k: int = DEFAULT_TOP_K) -> Prepared:
        # The question first: it is cheap to check and the commonest mistake.
        input_ids = self.encode(question)
        unknown = self.words.unknown(question) if self.words is not None else []
        return Prepared(self.image_pixels(image), input_ids, self.check_top_k(top_k), unknown)

    # Forward passes: the model's own three steps.

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, image_index: torch.Tensor,
                id_lists: list[list[int]]) -> tuple[torch.Tensor, np.ndarray | None]:
        """(B, A) answer probabilities and, with a detector, each image's OOD score (N,);
        pixel_values (N, 3, H, W) holds each image once."""
        input_ids, lengths = pad_questions(id_lists)
        features = self.model.image_features(pixel_values.to(self.device))
        questions = self.model.question_vectors(input_ids.to(self.device), lengths.to(self.device))
        logits = self.model.answer_logits(features, questions, image_index.to(self.device))
        scores = None
        if self.density is not None:
            # Both detectors (CNN features, and the input's image statistics where the checkpoint has them).
            scores = self.density.score_images(self.model.pooled_features(features).cpu().numpy(), pixel_values)
        return logits.float().softmax(dim=-1).cpu(), scores

    def top_answers(self, probabilities: torch.Tensor, top_k: int) -> dict[str, float]:
        """{answer: probability} for the top_k answers, most likely first."""
        values, indices = probabilities.topk(top_k)
        return {self.answers[i]: float(p) for p, i in zip(values.tolist(), indices.tolist())}

    def run_prepared(self, requests: list[Prepared]) -> list[Answer]:
        """One forward pass over prepared requests; requests sharing a pixels tensor share a CNN row."""
        pixels = {id(r.pixels): r.pixels for r in requests}
        unique, image_index = unique_rows(id(r.pixels) for r in requests)
        probabilities, scores = self.forward(torch.stack([pixels[key] for key in unique]), image_index,
                                             [r.input_ids for r in requests])
        answers = []
        for p, row, request in zip(probabilities, image_index.tolist(), requests):
            answers.append(Answer(self.top_answers(p, request.top_k), float(p.max()), self.threshold,
                                  None if scores is None else float(scores[row]),
                                  None if self.density is None else self.density.threshold, request.unknown_words))
        return answers

    # The public answers.

    def answer(self, image, question: str, top_k: int = DEFAULT_TOP_K) -> dict[str, float]:
        """{answer: probability} for the top_k answers (softmax over all answers), most likely first."""
        return self.assess(image, question, top_k).answers

    def assess(self, image, question: str, top_k: int = DEFAULT_TOP_K) -> Answer:
        """The top answers with the OOD image flag, the unknown words and "not sure"."""
        return self.run_prepared([self.prepare(image, question, top_k)])[0]

    def answer_many(self, image, questions: list[str], top_k: int = DEFAULT_TOP_K) -> list[dict[str, float]]:
        """Several questions about one image: the CNN runs on the image once."""
        return [a.answers for a in self.assess_many(image, questions, top_k)]

    def assess_many(self, image, questions: list[str], top_k: int = DEFAULT_TOP_K) -> list[Answer]:
        """`assess` for several questions about one image, the CNN running on the image once."""
        if isinstance(questions, str) or not questions:
            raise InputError("no questions: give one or more questions about the image")
        id_lists = []
        for position, question in enumerate(questions):
            try:
                id_lists.append(self.encode(question))
            except InputError as error:
                raise InputError(f"question {position + 1} of {len(questions)}: {error}") from error
        top_k = self.check_top_k(top_k)
        pixels = self.image_pixels(image)
        unknown = [self.words.unknown(q) if self.words is not None else [] for q in questions]
        return self.run_prepared([Prepared(pixels, ids, top_k, u) for ids, u in zip(id_lists, unknown)])

    def answer_batch(self, images: list, questions: list[str], top_k: int = DEFAULT_TOP_K) -> list[dict[str, float]]:
        """Many (image, question) requests, e.g. from several users, in one forward pass.

        The same image object given twice runs through the CNN once.
        """
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions; give one image per question")
        if not images:
            return []
        pixels_of: dict[int, torch.Tensor] = {}
        requests = []
        for position, (image, question) in enumerate(zip(images, questions)):
            try:
                ids = self.encode(question)
                if id(image) not in pixels_of:
                    pixels_of[id(image)] = self.image_pixels(image)
            except InputError as error:
                raise InputError(f"request {position + 1} of {len(images)}: {error}") from error
            requests.append(Prepared(pixels_of[id(image)], ids, self.check_top_k(top_k)))
        return [a.answers for a in self.run_prepared(requests)]

    def explain(self, image, question: str):
        """Where the model looked for its top answer: an `Explanation` (heatmap + overlay)."""
        input_ids = self.encode(question)
        if image is None:
            raise InputError(NO_IMAGE)
        return explain_answer(self.model, self.transform, open_image(image), input_ids, self.answers)

    @torch.inference_mode()
    def attention(self, image, question: str) -> list | None:
        """One overlay per glimpse (hop after hop) of where an attention model looked; None for a pooled model."""
        if not self.config.attention_glimpses:
            return None
        input_ids = self.encode(question)
        if image is None:
            raise InputError(NO_IMAGE)
        picture = open_image(image)
        pixels = self.transform(picture)[None].to(self.device)
        ids, lengths = pad_questions([input_ids])
        features = self.model.image_features(pixels)
        questions = self.model.question_vectors(ids.to(self.device), lengths.to(self.device))
        maps = self.model.attention_maps(features, questions, torch.zeros(1, dtype=torch.long, device=self.device))
        return attention_overlays(picture, maps[0], pixels.shape[-2:])

    def describe(self) -> dict:
        """Facts about the loaded model for people: dataset, answers, backbone, measured accuracy."""
        card = self.card
        facts = {
            "dataset": card.get("dataset", "unknown"),
            "answers": list(self.answers),
            "num_answers": len(self.answers),
            "backbone": self.config.backbone,
            "architecture": architecture(self.config),
            "attention_glimpses": self.config.attention_glimpses,
            "answer_threshold": self.threshold,
            "ood_threshold": None if self.density is None else self.density.threshold,
            "image_size": self.config.image_size,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
        for key in ("test_accuracy", "val_accuracy", "test_questions", "train_questions", "epochs", "command"):
            if key in card:
                facts[key] = card[key]
        if self.folder is not None:
            facts["checkpoint"] = self.folder.name
        return facts


class BatchingPredictor:
    """Shares forward passes among concurrent callers (e.g. a web server's worker threads).

    Each caller checks and preprocesses its own request in its own thread, so one user's
    bad input raises only in that user's call; a single worker thread then answers all
    requests waiting at that moment (up to max_batch_size) in one forward pass.
    """

    def __init__(self, predictor: Predictor, max_batch_size: int = 16):
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # sizes of the latest forward passes
        self._pending: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="vqa-batcher", daemon=True)
        self._worker.start()

    def answer(self, image, question: str, top_k: int = DEFAULT_TOP_K) -> Answer:
        request = self.predictor.prepare(image, question, top_k)
        future: Future = Future()
        self._pending.put((request, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            batch = [self._pending.get()]
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self.batch_sizes.append(len(batch))
            try:
                results = self.predictor.run_prepared([request for request, _ in batch])
            except Exception as error:  # a bug, not a user mistake: every waiting caller sees it
                for _, future in batch:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqa.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, model.safetensors, ...)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="how many answers to print")
    parser.add_argument("--json", action="store_true", help="print {answer: probability} as JSON")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keep stderr for our own messages
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint)
        answers = predictor.answer(Path(args.image), args.question, args.top_k)
    except (InputError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answers))
    else:
        for answer, probability in answers.items():
            print(f"{probability:7.2%}  {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
