"""Datasets in one record shape, the VQA v2 layout, and the batching that serves them.

A record is a dict: question_id, image_id, question, and, where annotations exist,
answers (the human answers, 10 in VQA v2), answer_type, question_type,
multiple_choice_answer. A `VQASplit` is the records plus where each image lives.
"""

import json
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from .answers import HUMAN_ANSWERS, answer_scores
from .errors import DataError, InputError
from .images import open_image, probe_image
from .programs import question_targets
from .text import QuestionTokenizer, pad_questions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# "COCO_val2014_000000000042.jpg" -> 42, "42.png" -> 42: the last run of digits.
_IMAGE_ID = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass
class VQASplit:
    name: str
    records: list[dict]
    image_paths: dict[int, Path]  # image_id -> file (images missing from the folder have none)
    image_dir: Path | None = None  # where the images were looked for, for messages
    skipped: list[dict] = field(default_factory=list)  # images screen_images skipped, with their questions

    @property
    def has_answers(self) -> bool:
        return bool(self.records) and "answers" in self.records[0]

    @property
    def image_ids(self) -> list[int]:
        """Image ids in first-seen order of the records."""
        return list(dict.fromkeys(r["image_id"] for r in self.records))

    def subset(self, image_ids, name: str) -> "VQASplit":
        keep = set(image_ids)
        return VQASplit(
            name,
            [r for r in self.records if r["image_id"] in keep],
            {i: p for i, p in self.image_paths.items() if i in keep},
            self.image_dir,
        )


def read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{what} file {path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except UnicodeDecodeError as error:
        raise DataError(f"{what} file {path} is not UTF-8 text ({error})") from error


def _require(item, key: str, kind, path: Path, where: str):
    if not isinstance(item, dict):
        raise DataError(f"{path}: {where} is {type(item).__name__}, expected an object")
    if key not in item:
        raise DataError(f"{path}: {where} has no field {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}: {where} field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def index_image_folder(image_dir: str | Path) -> dict[int, Path]:
    """image_id -> path for every image file in a folder, by the digits ending its name."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    index = {}
    for path in image_dir.iterdir():
        match = _IMAGE_ID.search(path.name)
        if match:
            index[int(match.group(1))] = path
    return index


def load_vqa_split(
    questions_file: str | Path,
    annotations_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    name: str | None = None,
    allow_nonstandard_answers: bool = False,
) -> VQASplit:
    """Read VQA v2-layout files. Without annotations (test-dev, test-std) records have no answers.

    Every question must have HUMAN_ANSWERS (10) answers, which the official metric assumes,
    unless `allow_nonstandard_answers`: then other counts are read with a warning.
    """
    questions_file = Path(questions_file)
    data = read_json(questions_file, "questions")
    records = _read_questions(data, questions_file)
    if annotations_file is not None:
        _read_annotations(Path(annotations_file), {r["question_id"]: r for r in records}, questions_file,
                          allow_nonstandard_answers)
    image_paths = {}
    if image_dir is not None:
        # Images missing from the folder get no path: screen_images applies the bad-image policy.
        index = index_image_folder(image_dir)
        image_paths = {i: index[i] for i in dict.fromkeys(r["image_id"] for r in records) if i in index}
    return VQASplit(name or data.get("data_subtype") or questions_file.stem, records, image_paths,
                    Path(image_dir) if image_dir is not None else None)


def _read_questions(data, path: Path) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DataError(f"{path}: expected an object with a list field 'questions'")
    records, seen = [], {}
    for position, q in enumerate(data["questions"]):
        where = f"questions[{position}]"
        qid = _require(q, "question_id", int, path, where)
        image_id = _require(q, "image_id", int, path, where)
        text = _require(q, "question", str, path, where)
        if qid in seen:
            raise DataError(f"{path}: question_id {qid} appears twice ({where} and questions[{seen[qid]}])")
        seen[qid] = position
        records.append({"question_id": qid, "image_id": image_id, "question": text})
    if not records:
        raise DataError(f"{path}: the split is empty (no questions)")
    return records


def _read_annotations(path: Path, by_id: dict[int, dict], questions_file: Path, allow_nonstandard: bool) -> None:
    """Add each annotation's answers and types to its question's record, in place."""
    ann = read_json(path, "annotations")
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise DataError(f"{path}: expected an object with a list field 'annotations'")
    annotated = set()
    for position, a in enumerate(ann["annotations"]):
        where = f"annotations[{position}]"
        qid = _require(a, "question_id", int, path, where)
        if qid not in by_id:
            raise DataError(f"{path}: {where} is for question_id {qid}, which is not in {questions_file}")
        if qid in annotated:
            raise DataError(f"{path}: question_id {qid} is annotated twice ({where})")
        annotated.add(qid)
        answers = _require(a, "answers", list, path, where)
        if not answers:
            raise DataError(f"{path}: {where} has an empty 'answers' list")
        texts = [_require(x, "answer", str, path, f"{where}.answers[{i}]") for i, x in enumerate(answers)]
        record = by_id[qid]
        record["answers"] = texts
        record["answer_type"] = _require(a, "answer_type", str, path, where)
        record["question_type"] = _require(a, "question_type", str, path, where)
        record["multiple_choice_answer"] = a.get("multiple_choice_answer", Counter(texts).most_common(1)[0][0])
        # Other plain fields a generator adds (the shapes world's "relation", "template") are kept,
        # and a CLEVR-format "program" (a list of nodes: vqa/programs.py reads it).
        record.update({k: v for k, v in a.items() if k not in record and k not in _ANNOTATION_FIELDS
                       and (isinstance(v, (str, bool, int)) or k == "program" and isinstance(v, list))})
    _check_answer_counts(by_id.values(), path, allow_nonstandard)
    missing = [qid for qid in by_id if qid not in annotated]
    if missing:
        raise DataError(f"{path}: {len(missing)} questions of {questions_file} have no annotation "
                        f"(first: question_id {missing[0]})")


_ANNOTATION_FIELDS = {"question_id", "image_id", "answers", "answer_type", "question_type", "multiple_choice_answer"}


def _check_answer_counts(records, path: Path, allow: bool) -> None:
    counts = Counter(len(r["answers"]) for r in records if "answers" in r)
    odd = {n: c for n, c in sorted(counts.items()) if n != HUMAN_ANSWERS}
    if not odd:
        return
    described = ", ".join(f"{c} with {n}" for n, c in odd.items())
    message = (f"{path}: {sum(odd.values())} questions do not have {HUMAN_ANSWERS} human answers ({described}). "
               f"The official metric averages min(1, matches / 3) over leave-one-out subsets of {HUMAN_ANSWERS}: "
               "with n answers a perfect prediction scores min(1, (n - 1) / 3), 0 with one answer, and "
               "training targets shrink alike. Repeat a single answer 10 times")
    if not allow:
        raise DataError(message + ", or pass --allow-nonstandard-answers to use them as they are")
    warnings.warn(message + "; used as they are (--allow-nonstandard-answers)", stacklevel=3)


def load_easy_vqa(split: str) -> VQASplit:
    """easy-VQA (PyPI `easy-vqa`) as VQA v2-layout records.

    Its single answer counts as all 10 human answers; yes/no answers get answer_type
    "yes/no", the others "other"; question_type is the question's first two words.
    """
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise DataError(f"easy-vqa has splits 'train' and 'test', not {split!r}")
    records = []
    for position, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        records.append({
            "question_id": position,
            "image_id": int(image_id),
            "question": question,
            "answers": [answer] * 10,
            "answer_type": "yes/no" if answer in ("yes", "no") else "other",
            "question_type": " ".join(question.split()[:2]),
            "multiple_choice_answer": answer,
        })
    return VQASplit(f"easy-vqa-{split}", records, {int(k): Path(v) for k, v in paths.items()})


BUILTIN_DATASETS = {"easy-vqa": ("train", "test"), "shapes-world": ("train", "val", "test")}


def load_builtin(name: str, split: str, scenes: int | None = None) -> VQASplit:
    """A built-in dataset (no download): easy-VQA, or the shapes world (generated on first use).
    scenes: the shapes world's number of scenes in this split, when not its default size."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown dataset {name!r}: the built-in ones are {', '.join(BUILTIN_DATASETS)}; "
                        "give VQA v2-layout files otherwise")
    if split not in BUILTIN_DATASETS[name]:
        raise DataError(f"{name} has splits {', '.join(BUILTIN_DATASETS[name])}, not {split!r}")
    if name == "easy-vqa":
        if scenes is not None:
            raise DataError("easy-vqa has a fixed size: the number of scenes is a shapes-world setting")
        return load_easy_vqa(split)
    from .shapes_world import load_shapes_world

    return load_shapes_world(split) if scenes is None else load_shapes_world(split, **{f"{split}_scenes": scenes})


EASY_VQA_PALETTE = ["#ff0000", "#00ff00", "#0000ff", "#ffff00", "#000000", "#a52a2a", "#808080", "#008080"]


def builtin_palette(name: str) -> list[str]:
    """Brush colours for drawing images like those of a built-in dataset (easy-VQA's otherwise)."""
    if name == "shapes-world":
        from .shapes_world import COLORS

        return ["#%02x%02x%02x" % tuple(rgb) for rgb in COLORS.values()]
    return EASY_VQA_PALETTE


def builtin_examples(name: str, count: int) -> list[list[str]]:
    """[image path, question] pairs from a built-in dataset's test split, one per image and
    question type; [] for a dataset that is not built in."""
    if name not in BUILTIN_DATASETS:
        return []
    split = load_builtin(name, "test")
    types = {r.get("question_type") for r in split.records}
    examples, seen_images, seen_types = [], set(), set()
    for record in split.records:
        kind = record.get("question_type")
        if record["image_id"] not in seen_images and kind not in seen_types:
            seen_images.add(record["image_id"])
            seen_types.add(kind)
            examples.append([str(split.image_paths[record["image_id"]]), record["question"]])
            if len(examples) == count:
                break
            if seen_types == types:
                seen_types.clear()  # every type shown once: go round again
    return examples


def split_by_image(split: VQASplit, fraction: float, seed: int) -> tuple[VQASplit, VQASplit]:
    """(train, held-out) parts with no image in both."""
    image_ids = sorted(split.image_ids)
    random.Random(seed).shuffle(image_ids)
    n_held = max(1, round(len(image_ids) * fraction))
    return split.subset(image_ids[n_held:], f"{split.name}-train"), split.subset(image_ids[:n_held], f"{split.name}-val")


def unique_rows(keys) -> tuple[list, torch.Tensor]:
    """Each distinct key once, in first-seen order, and the row of each item's key (B,).

    The one batch builder: over the image ids of a batch of questions, each image then goes
    through the CNN once; over question ids (or pixel tensors, ...) it does the same for them.
    """
    rows: dict = {}
    index = [rows.setdefault(key, len(rows)) for key in keys]
    return list(rows), torch.tensor(index, dtype=torch.long)


def screen_images(split: VQASplit, skip_bad_images: bool = False) -> VQASplit:
    """The one bad-image policy, used alike by training, evaluation and feature extraction.

    Every image of the split is checked before any work starts: it must have a file and its
    header must open within the size limits (cheap: no decoding), so that hours of training
    are never lost to a broken file found late. Without `skip_bad_images` the first bad image
    raises DataError naming the file; with it, every image is also decoded in full (a truncated
    file passes the header check), bad ones are dropped with their questions, and listed in
    the returned split's `skipped` as {"image_id", "path", "error", "question_ids"}.
    """
    check = open_image if skip_bad_images else probe_image
    bad: dict[int, str] = {}
    for image_id in split.image_ids:
        path = split.image_paths.get(image_id)
        if path is None:
            where = f" in {split.image_dir}" if split.image_dir is not None else ""
            bad[image_id] = f"no image file for image_id {image_id}{where}"
            if not skip_bad_images:
                break
            continue
        try:
            check(path)
        except InputError as error:
            bad[image_id] = str(error)
            if not skip_bad_images:
                break
    if not bad:
        return split
    if not skip_bad_images:
        raise DataError(f"{split.name}: {next(iter(bad.values()))} (--skip-bad-images skips such images)")
    kept = split.subset([i for i in split.image_ids if i not in bad], split.name)
    if not kept.records:
        raise DataError(f"{split.name}: every image is unreadable (first: {next(iter(bad.values()))})")
    questions: dict[int, list[int]] = {}
    for record in split.records:
        if record["image_id"] in bad:
            questions.setdefault(record["image_id"], []).append(record["question_id"])
    kept.skipped = [{"image_id": i, "path": str(split.image_paths[i]) if i in split.image_paths else None,
                     "error": error, "question_ids": questions[i]} for i, error in bad.items()]
    return kept


class ImageSource:
    """Gives each image of a batch once: as pixels (the model's transform) or as cached features."""

    def __init__(self, image_paths: dict[int, Path], transform=None, feature_cache=None):
        self.image_paths = image_paths
        self.transform = transform
        self.feature_cache = feature_cache

    def pixels(self, image_id: int) -> torch.Tensor:
        try:
            return self.transform(open_image(self.image_paths[image_id]))
        except InputError as error:  # screen_images checked headers; a file broken further in ends here
            raise DataError(f"{error} (--skip-bad-images decodes every image first and skips such images)") from error

    def batch(self, image_ids: list[int]) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None:
            return {"image_features": self.feature_cache.get(image_ids)}
        return {"pixel_values": torch.stack([self.pixels(i) for i in image_ids])}


class QuestionDataset(Dataset):
    """One item per question: its piece ids, its image id, its soft answer scores and, for a
    model with side targets (`VQAConfig.side_targets`), the indices of those it names."""

    def __init__(self, split: VQASplit, tokenizer: QuestionTokenizer, answer_index: dict[str, int], max_tokens: int,
                 side_targets: list[str] | None = None):
        self.split = split
        self.records = sorted(split.records, key=lambda r: (r["image_id"], r["question_id"]))
        self.num_answers = len(answer_index)
        self.input_ids = [tokenizer.encode(r["question"], max_tokens) for r in self.records]
        self.scores = [answer_scores(r["answers"], answer_index) if "answers" in r else None for r in self.records]
        self.side = None
        if side_targets:
            index = {t: i for i, t in enumerate(side_targets)}
            self.side = [[index[t] for t in question_targets(r) if t in index] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "image_id": self.records[i]["image_id"], "scores": self.scores[i]}
        if self.side is not None:
            item["side"] = self.side[i]
        return item


class VQACollator:
    """Pads the questions and loads each distinct image of the batch once."""

    def __init__(self, images: ImageSource, num_answers: int, num_side_targets: int = 0):
        self.images = images
        self.num_answers = num_answers
        self.num_side_targets = num_side_targets

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, lengths = pad_questions([it["input_ids"] for it in items])
        unique, image_index = unique_rows([it["image_id"] for it in items])
        batch = {"input_ids": input_ids, "lengths": lengths, "image_index": image_index, **self.images.batch(unique)}
        if items[0]["scores"] is not None:
            labels = torch.zeros(len(items), self.num_answers)
            for r, it in enumerate(items):
                for answer, score in it["scores"].items():
                    labels[r, answer] = score
            batch["labels"] = labels
        if self.num_side_targets and "side" in items[0]:
            side = torch.zeros(len(items), self.num_side_targets)
            for r, it in enumerate(items):
                side[r, it["side"]] = 1.0
            batch["side_labels"] = side
        return batch


class ImageGroupedSampler(Sampler[int]):
    """Shuffles images, then yields each image's questions together.

    Consecutive questions share images, so a batch runs the CNN on far fewer images
    than it has questions. The order depends only on (seed, epoch): every torchrun
    process draws the same order and takes its own share of the batches.
    """

    def __init__(self, dataset: QuestionDataset, seed: int = 0, drop_tail: int | None = None):
        self.seed = seed
        self.epoch = 0
        # With drop_tail=B, an epoch yields a multiple of B questions: the partial last batch,
        # which may hold a single image (BatchNorm cannot train on that), is left out.
        self.drop_tail = drop_tail
        groups: dict[int, list[int]] = {}
        for i, record in enumerate(dataset.records):
            groups.setdefault(record["image_id"], []).append(i)
        self.groups = list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        total = sum(len(g) for g in self.groups)
        return total - total % self.drop_tail if self.drop_tail else total

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.groups)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        # Not every wrapper forwards set_epoch (accelerate's shard under DDP does not):
        # counting passes keeps each epoch's order new and the same on every process.
        self.epoch += 1
        indices = [i for g in order for i in self.groups[g]]
        yield from indices[: len(self)]
