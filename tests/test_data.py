import json

import pytest
import torch

from conftest import make_vqa_v2_files
from vqa.data import (ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, drop_bad_images,
                      load_easy_vqa, load_vqa_split, split_by_image)
from vqa.errors import DataError


def test_reads_vqa_v2_layout(vqa_v2_files):
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    assert split.name == "val2014"
    assert len(split.records) == 16 and len(split.image_paths) == 8
    record = split.records[0]
    assert set(record) == {"question_id", "image_id", "question", "answers", "answer_type", "question_type",
                           "multiple_choice_answer"}
    assert len(record["answers"]) == 10
    assert split.image_paths[record["image_id"]].name == f"COCO_val2014_{record['image_id']:012d}.jpg"


def test_test_splits_have_no_answers(tmp_path):
    files = make_vqa_v2_files(tmp_path, with_annotations=False, subtype="test2015")
    split = load_vqa_split(files["questions"], None, files["images"])
    assert not split.has_answers and "answers" not in split.records[0]


def test_reads_easy_vqa_into_the_same_records():
    train, test = load_easy_vqa("train"), load_easy_vqa("test")
    assert len(test.records) == 9673 and len(test.image_paths) == 1000
    assert len(train.image_paths) == 4000
    yes_no = next(r for r in train.records if r["answers"][0] in ("yes", "no"))
    other = next(r for r in train.records if r["answers"][0] not in ("yes", "no"))
    assert yes_no["answer_type"] == "yes/no" and other["answer_type"] == "other"
    assert yes_no["answers"] == [yes_no["answers"][0]] * 10
    assert all(path.is_file() for path in list(test.image_paths.values())[:20])
    with pytest.raises(DataError, match="'train' and 'test'"):
        load_easy_vqa("val")


def _rewrite(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_malformed_json_names_file_and_position(vqa_v2_files):
    path = vqa_v2_files["questions"]
    path.write_text('{"questions": [\n  {"image_id": 1,, }]}')
    with pytest.raises(DataError, match=rf"{path.name} is not valid JSON: .* line 2 column 18"):
        load_vqa_split(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["questions"][3].pop("question"), r"questions\[3\] has no field 'question'"),
    (lambda d: d["questions"][2].update(question_id="12"), r"questions\[2\] field 'question_id' is '12', expected int"),
    (lambda d: d["questions"].append(dict(d["questions"][0])), r"question_id 10000 appears twice"),
    (lambda d: d.update(questions=[]), "the split is empty"),
    (lambda d: d.pop("questions"), "list field 'questions'"),
])
def test_question_file_errors_name_the_item(vqa_v2_files, change, message):
    _rewrite(vqa_v2_files["questions"], change)
    with pytest.raises(DataError, match=message):
        load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"])


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][1].update(question_id=999), r"annotations\[1\] is for question_id 999, which is not in"),
    (lambda d: d["annotations"][0]["answers"][4].pop("answer"), r"annotations\[0\].answers\[4\] has no field 'answer'"),
    (lambda d: d["annotations"].pop(), r"1 questions of .* have no annotation"),
    (lambda d: d["annotations"].append(d["annotations"][0]), "annotated twice"),
])
def test_annotation_file_errors_name_the_item(vqa_v2_files, change, message):
    _rewrite(vqa_v2_files["annotations"], change)
    with pytest.raises(DataError, match=message):
        load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"])


def test_missing_files_are_named(vqa_v2_files, tmp_path):
    with pytest.raises(DataError, match="questions file not found: .*nope.json"):
        load_vqa_split(tmp_path / "nope.json")
    next(vqa_v2_files["images"].iterdir()).unlink()
    with pytest.raises(DataError, match=r"image \d+ not found in .* COCO_val2014_0000000\d+\.jpg"):
        load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])


def test_bad_images_fail_loudly_or_are_skipped_and_listed(vqa_v2_files):
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    bad_id = split.records[0]["image_id"]
    split.image_paths[bad_id].write_bytes(b"not an image")
    source = ImageSource(split.image_paths, transform=lambda image: torch.zeros(3, 8, 8))
    with pytest.raises(DataError, match=f"unreadable image for image_id {bad_id}.*--skip-bad-images"):
        source.batch([bad_id])
    kept = drop_bad_images(split)
    assert len(kept.skipped_images) == 1 and str(split.image_paths[bad_id]) in kept.skipped_images[0]
    assert len(kept.records) == 14 and bad_id not in kept.image_paths


def test_split_by_image_keeps_images_apart():
    full = load_easy_vqa("train")
    train, val = split_by_image(full, 0.1, seed=0)
    assert len(val.image_ids) == 400 and len(train.image_ids) == 3600
    assert not set(train.image_ids) & set(val.image_ids)
    assert len(train.records) + len(val.records) == len(full.records)
    assert split_by_image(full, 0.1, seed=0)[1].image_ids == val.image_ids


def test_sampler_groups_questions_of_an_image_and_reshuffles(vqa_v2_files, easy_vqa_tokenizer):
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"])
    dataset = QuestionDataset(split, easy_vqa_tokenizer, {"yes": 0, "red": 1}, 32)
    sampler = ImageGroupedSampler(dataset, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(len(dataset)))
    images = [dataset.records[i]["image_id"] for i in first]
    runs = [image for k, image in enumerate(images) if k == 0 or images[k - 1] != image]
    assert len(runs) == len(set(images))  # each image's questions are contiguous
    assert first != second  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # reproducible from (seed, epoch)
    trimmed = ImageGroupedSampler(dataset, seed=3, drop_tail=5)
    assert len(trimmed) == 15 and list(trimmed) == first[:15]


def test_collator_pads_scores_and_loads_each_image_once(vqa_v2_files, easy_vqa_tokenizer):
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    vocabulary = {"yes": 0, "red": 1, "green": 2, "blue": 3, "yellow": 4}
    dataset = QuestionDataset(split, easy_vqa_tokenizer, vocabulary, 32)
    loaded = []
    source = ImageSource(split.image_paths, transform=lambda image: loaded.append(image) or torch.zeros(3, 8, 8))
    batch = VQACollator(source, len(vocabulary))([dataset[i] for i in range(6)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and len(loaded) == 3
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["input_ids"].shape[0] == 6 and batch["lengths"].min() >= 1
    yes_rows = [k for k in range(6) if dataset.records[k]["answers"][0] == "yes"]
    # 8 of 10 humans said "yes": every leave-one-out subset keeps >= 3 matches.
    assert all(batch["labels"][k, 0] == 1.0 for k in yes_rows)
    assert torch.all(batch["labels"].sum(-1) > 0)
