"""The official VQA accuracy of a results file: per question, per answer type, per question type, overall.

Reproduces GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (latest
version) and the results check of its `VQA.loadRes`. The per-question rule and the
answer normalisation are `vqa.answers.vqa_accuracy`; this module adds what the script
does around it:

- Results must answer exactly the split's questions (loadRes asserts set equality).
  Duplicated ids, which loadRes lets the last one win, are refused here as ambiguous.
- Aggregates are `round(100 * sum(accs) / len(accs), 2)` with a plain left-to-right
  float sum, in the order of the split's records (the script sums in the order of the
  annotations file; the last bit can differ when the two files list questions in
  different orders).
- The script runs on Python 2.7, whose round() rounds the exact binary value of the
  float and sends exact halves away from zero: round(0.125, 2) == 0.13 where Python 3
  gives 0.12, and round(2.675, 2) == 2.67 on both (2.675 is 2.67499999... in binary).
  `official_round` does the same.
"""

from collections import Counter, defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from .answers import vqa_accuracy
from .errors import DataError
from .records import VQASplit, read_json

DIGITS = 2  # VQAEval(n=2): the precision every official figure is rounded to
_SHOWN = 5  # how many offending ids or positions an error message names


def official_round(value: float, digits: int = DIGITS) -> float:
    """Python 2.7's round(value, digits): the rounding of every figure the official script reports."""
    # Decimal(float) is the float's exact binary value, so only true halves round up.
    return float(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _plain_sum(values) -> float:
    # Python 2's sum(): one addition after another. Python >= 3.12's sum() compensates
    # rounding errors and can differ in the last bit, which can move a rounded figure.
    total = 0.0
    for value in values:
        total += value
    return total


def _percent(accuracies: list[float]) -> float:
    return official_round(100 * _plain_sum(accuracies) / len(accuracies))


def _first(ids, n: int = _SHOWN) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:n])
    return shown + (", ..." if len(ids) > n else "")


def check_results(results, expected_question_ids=None, source: str = "results") -> list[dict]:
    """Validate results in the official format; return them as [{"question_id", "answer"}].

    `expected_question_ids`: when given, the results must hold exactly these ids.
    Raises DataError naming the positions or ids at fault.
    """
    if not isinstance(results, list):
        raise DataError(f"{source}: expected a list of {{\"question_id\": int, \"answer\": str}} objects, "
                        f"got a JSON {type(results).__name__}")
    checked, positions = [], {}
    duplicates: dict[int, list[int]] = {}
    for position, entry in enumerate(results):
        where = f"{source}: results[{position}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} is {type(entry).__name__}, expected an object with 'question_id' and 'answer'")
        for key, kind, name in (("question_id", int, "an integer"), ("answer", str, "a string")):
            if key not in entry:
                raise DataError(f"{where} has no field {key!r}")
            value = entry[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(f"{where} field {key!r} is {value!r} ({type(value).__name__}), expected {name}")
        qid = entry["question_id"]
        if qid in positions:
            duplicates.setdefault(qid, [positions[qid]]).append(position)
        else:
            positions[qid] = position
        checked.append({"question_id": qid, "answer": entry["answer"]})
    if duplicates:
        shown = "; ".join(f"{qid} at " + ", ".join(f"results[{p}]" for p in where)
                          for qid, where in list(duplicates.items())[:_SHOWN])
        raise DataError(f"{source}: {len(duplicates)} question ids appear more than once ({shown}"
                        f"{'; ...' if len(duplicates) > _SHOWN else ''})")
    if expected_question_ids is not None:
        expected = set(expected_question_ids)
        missing = sorted(expected - positions.keys())
        extra = sorted(positions.keys() - expected)
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the {len(expected)} questions have no answer "
                            f"(question ids {_first(missing)})")
        if extra:
            problems.append(f"{len(extra)} answers are for question ids not in the questions file ({_first(extra)})")
        if problems:
            raise DataError(f"{source}: results do not match the questions: " + "; ".join(problems))
    return checked


def load_results(path: str | Path, expected_question_ids=None) -> list[dict]:
    """Read and validate an official results file: [{"question_id": int, "answer": str}, ...]."""
    return check_results(read_json(path, "results"), expected_question_ids, source=str(path))


def question_accuracies(results: list[dict], split: VQASplit) -> dict[int, float]:
    """{question_id: official accuracy in [0, 1]} in the order of the split's records."""
    if not split.has_answers:
        raise DataError(f"split {split.name!r} has no annotations (human answers), so it cannot be scored")
    checked = check_results(results, (r["question_id"] for r in split.records))
    answers = {r["question_id"]: r["answer"] for r in checked}
    accuracies, seen = {}, {}
    for record in split.records:
        # Many questions share a prediction and human answers (every easy-VQA question does with others).
        key = (answers[record["question_id"]], tuple(record["answers"]))
        if key not in seen:
            seen[key] = vqa_accuracy(*key)
        accuracies[record["question_id"]] = seen[key]
    return accuracies


def evaluate_results(results: list[dict], split: VQASplit) -> dict:
    """The official metrics of `results` on an annotated split, in percent (2 decimals):
    {"overall", "perAnswerType": {type: %}, "perQuestionType": {type: %}, "perQuestion": {id: %}},
    and "perTemplate" {template: %} where the records have a generator's `template` field."""
    accuracies = question_accuracies(results, split)
    rounded = {acc: official_round(100 * acc) for acc in set(accuracies.values())}  # few distinct values
    per_answer_type: dict[str, list[float]] = {}
    per_question_type: dict[str, list[float]] = {}
    per_template: dict[str, list[float]] = {}
    for record in split.records:
        acc = accuracies[record["question_id"]]
        per_answer_type.setdefault(record["answer_type"], []).append(acc)
        per_question_type.setdefault(record["question_type"], []).append(acc)
        if "template" in record:
            per_template.setdefault(record["template"], []).append(acc)
    metrics = {
        "overall": _percent(list(accuracies.values())),
        "perAnswerType": {t: _percent(a) for t, a in per_answer_type.items()},
        "perQuestionType": {t: _percent(a) for t, a in per_question_type.items()},
        "perQuestion": {qid: rounded[acc] for qid, acc in accuracies.items()},
    }
    if per_template:
        metrics["perTemplate"] = {t: _percent(a) for t, a in sorted(per_template.items())}
    return metrics


def blind_baseline(train_records: list[dict], test_records: list[dict]) -> dict:
    """The question-only ("blind") baseline of any split with question types: accuracy (%) of answering from the question text alone: the most frequent training
    answer for the exact same text, else the most frequent training answer of the family
    (question_type). VQA accuracy of each guess against the record's answers.

    Returns {"overall": %, "per_family": {family: %}, "texts_seen": % of test questions whose text is in train}.
    """
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for record in train_records:
        answer = record["multiple_choice_answer"]
        by_text[record["question"]][answer] += 1
        by_family[record["question_type"]][answer] += 1
    scores: dict[str, list[float]] = defaultdict(list)
    seen = 0
    for record in test_records:
        counts = by_text.get(record["question"]) or by_family.get(record["question_type"]) or Counter({"yes": 1})
        seen += record["question"] in by_text
        scores[record["question_type"]].append(vqa_accuracy(counts.most_common(1)[0][0], record["answers"]))
    every = [s for family in scores.values() for s in family]
    return {"overall": round(100 * sum(every) / len(every), 2),
            "per_family": {f: round(100 * sum(s) / len(s), 2) for f, s in sorted(scores.items())},
            "texts_seen": round(100 * seen / len(test_records), 2)}
