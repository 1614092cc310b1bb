"""Records in one shape, the VQA v2 layout reader, and splitting by image (no torch).

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

from .answers import HUMAN_ANSWERS
from .errors import DataError

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
    scenes_file: Path | None = None  # CLEVR-format scene graphs of the images, where the data has them

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
            scenes_file=self.scenes_file,
        )


def read_scenes_file(path: str | Path) -> list[dict]:
    """The `scenes` list of a CLEVR-format scenes file (stage 1's targets, the attention's objects)."""
    data = read_json(path, "scenes")
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        raise DataError(f"{path}: expected an object with a list field 'scenes'")
    return data["scenes"]


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
    scenes_file: str | Path | None = None,
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
                    Path(image_dir) if image_dir is not None else None,
                    scenes_file=Path(scenes_file) if scenes_file is not None else None)


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



def split_by_image(split: VQASplit, fraction: float, seed: int) -> tuple[VQASplit, VQASplit]:
    """(train, held-out) parts with no image in both."""
    image_ids = sorted(split.image_ids)
    random.Random(seed).shuffle(image_ids)
    n_held = max(1, round(len(image_ids) * fraction))
    return split.subset(image_ids[n_held:], f"{split.name}-train"), split.subset(image_ids[:n_held], f"{split.name}-val")

