"""easy-VQA (PyPI `easy-vqa`): one shape per 64 x 64 image, as VQA v2-layout records."""

from pathlib import Path

from ..errors import DataError
from ..records import VQASplit

PALETTE = ("#ff0000", "#00ff00", "#0000ff", "#ffff00", "#000000", "#a52a2a", "#808080", "#008080")


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

