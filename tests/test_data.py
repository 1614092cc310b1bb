"""vqa.records, vqa.batching and vqa.worlds.registry: the VQA v2 layout and its errors, built-in datasets, the one bad-image policy
(screen_images), unique_rows as the batch builder, the collator and the sampler."""

import json
import re

import pytest
import torch
from fixtures import ForwardCounter, draw_shape, make_vqa_v2_files, png_bytes, tiny_config
from hypothesis import given
from hypothesis import strategies as st

from vqa.batching import ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, screen_images, unique_rows
from vqa.errors import DataError
from vqa.model import VQAModel
from vqa.records import load_vqa_split, split_by_image
from vqa.worlds.easy_vqa import load_easy_vqa
from vqa.worlds.registry import BUILTIN_DATASETS, builtin_examples, builtin_palette, load_builtin


def load(files, images=True, **options):
    return load_vqa_split(files["questions"], files["annotations"], files["images"] if images else None, **options)


def test_reads_vqa_v2_layout(vqa_v2_files):
    split = load(vqa_v2_files)
    assert split.name == "val2014"
    assert len(split.records) == 16 and len(split.image_paths) == 8
    record = split.records[0]
    assert set(record) == {"question_id", "image_id", "question", "answers", "answer_type", "question_type",
                           "multiple_choice_answer"}
    assert len(record["answers"]) == 10
    assert split.image_paths[record["image_id"]].name == f"COCO_val2014_{record['image_id']:012d}.jpg"
    assert split.image_dir == vqa_v2_files["images"] and split.skipped == []


def test_test_splits_have_no_answers(tmp_path):
    files = make_vqa_v2_files(tmp_path, with_annotations=False, subtype="test2015")
    split = load_vqa_split(files["questions"], None, files["images"])
    assert not split.has_answers and "answers" not in split.records[0]


# Built-in datasets.

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


def test_builtin_datasets_by_name():
    assert set(BUILTIN_DATASETS) == {"easy-vqa", "shapes-world"}
    test = load_builtin("easy-vqa", "test")
    assert test.records == load_easy_vqa("test").records
    with pytest.raises(DataError, match="unknown dataset 'coco'.*easy-vqa, shapes-world"):
        load_builtin("coco", "test")
    with pytest.raises(DataError, match="easy-vqa has splits train, test, not 'val'"):
        load_builtin("easy-vqa", "val")


def test_builtin_examples_show_one_image_and_question_type_each():
    examples = builtin_examples("easy-vqa", 6)
    assert len(examples) == 6
    test = load_easy_vqa("test")
    path_of = {str(p): i for i, p in test.image_paths.items()}
    kinds = {(r["image_id"], r["question"]): r["question_type"] for r in test.records}
    images = [path_of[path] for path, _ in examples]
    assert len(set(images)) == 6  # each example on its own image
    types = [kinds[(image, question)] for image, (_, question) in zip(images, examples)]
    assert len(set(types)) == len(types)  # easy-VQA has more question types than 6: no repeat
    assert builtin_examples("no-such-dataset", 3) == []
    palette = builtin_palette("easy-vqa")
    assert palette and all(len(c) == 7 and c.startswith("#") for c in palette)


# Errors in the files, each naming the item.

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
    (lambda d: d["annotations"][2].update(answers=[]), r"annotations\[2\] has an empty 'answers' list"),
])
def test_annotation_file_errors_name_the_item(vqa_v2_files, change, message):
    _rewrite(vqa_v2_files["annotations"], change)
    with pytest.raises(DataError, match=message):
        load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="questions file not found: .*nope.json"):
        load_vqa_split(tmp_path / "nope.json")
    files = make_vqa_v2_files(tmp_path / "data", n_images=1)
    with pytest.raises(DataError, match="image folder not found: .*elsewhere"):
        load_vqa_split(files["questions"], files["annotations"], tmp_path / "elsewhere")


# Annotations with other than 10 human answers.

@pytest.mark.parametrize("count", [1, 15])
def test_nonstandard_answer_counts_are_refused_naming_the_count(vqa_v2_files, count):
    def change(data):
        entry = data["annotations"][3]
        entry["answers"] = [dict(entry["answers"][0], answer_id=i + 1) for i in range(count)]

    _rewrite(vqa_v2_files["annotations"], change)
    with pytest.raises(DataError, match=rf"1 questions do not have 10 human answers \(1 with {count}\)") as error:
        load(vqa_v2_files)
    # The message says what such counts do to the metric, and how to go on anyway.
    assert "min(1, (n - 1) / 3)" in str(error.value) and "--allow-nonstandard-answers" in str(error.value)

    with pytest.warns(UserWarning, match=rf"\(1 with {count}\).*used as they are"):
        split = load(vqa_v2_files, allow_nonstandard_answers=True)
    assert len(split.records) == 16
    counts = sorted(len(r["answers"]) for r in split.records)
    assert counts == sorted([count] + [10] * 15)


def test_ten_answers_give_no_warning(vqa_v2_files, recwarn):
    load(vqa_v2_files, allow_nonstandard_answers=True)
    assert not [w for w in recwarn if "human answers" in str(w.message)]


# The bad-image policy: screen_images.

def test_a_missing_image_is_not_an_error_until_screened(vqa_v2_files):
    (vqa_v2_files["images"] / "COCO_val2014_000000001007.jpg").unlink()
    split = load(vqa_v2_files)  # loading does not stop at a missing image ...
    assert 1007 not in split.image_paths and 1007 in split.image_ids and len(split.records) == 16
    with pytest.raises(DataError) as error:  # ... screening does, naming it
        screen_images(split)
    message = str(error.value)
    assert "no image file for image_id 1007" in message and str(vqa_v2_files["images"]) in message
    assert "--skip-bad-images" in message

    kept = screen_images(split, skip_bad_images=True)
    assert kept.skipped == [{"image_id": 1007, "path": None, "error": kept.skipped[0]["error"],
                             "question_ids": [10070, 10071]}]
    assert "no image file for image_id 1007" in kept.skipped[0]["error"]
    assert 1007 not in kept.image_ids and len(kept.records) == 14


def test_a_corrupt_image_is_named_or_skipped_with_its_questions(vqa_v2_files):
    split = load(vqa_v2_files)
    corrupt = split.image_paths[1014]
    corrupt.write_bytes(b"not an image")
    with pytest.raises(DataError, match=rf"{re.escape(str(corrupt))}.*not a readable image.*--skip-bad-images"):
        screen_images(split)

    kept = screen_images(split, skip_bad_images=True)
    skipped = [(s["image_id"], s["path"], s["question_ids"]) for s in kept.skipped]
    assert skipped == [(1014, str(corrupt), [10140, 10141])]
    assert "not a readable image" in kept.skipped[0]["error"]
    assert kept.image_ids == [i for i in split.image_ids if i != 1014]
    assert [r["question_id"] for r in kept.records] == [r["question_id"] for r in split.records
                                                        if r["image_id"] != 1014]
    assert 1014 not in kept.image_paths and len(split.records) == 16  # the input split is left as it was


def test_a_truncated_image_passes_the_header_check_and_is_caught_only_by_decoding(vqa_v2_files):
    split = load(vqa_v2_files)
    truncated = split.image_paths[1021].with_suffix(".png")
    data = png_bytes(draw_shape("red", "circle"))
    split.image_paths[1021].unlink()
    truncated.write_bytes(data[: len(data) * 2 // 3])  # the header is whole, the pixel data is cut
    split = load(vqa_v2_files)
    assert split.image_paths[1021] == truncated

    assert screen_images(split) is split  # the cheap header check passes it: nothing decoded
    source = ImageSource(split.image_paths, transform=lambda image: torch.zeros(3, 8, 8))
    with pytest.raises(DataError, match=rf"{re.escape(str(truncated))}.*truncated.*--skip-bad-images"):
        source.batch([1000, 1021])  # so it fails when read, naming the file

    kept = screen_images(split, skip_bad_images=True)  # the flag decodes every image in full
    skipped = [(s["image_id"], s["path"], s["question_ids"]) for s in kept.skipped]
    assert skipped == [(1021, str(truncated), [10210, 10211])]
    assert "truncated" in kept.skipped[0]["error"]


def test_several_bad_images_are_all_listed_and_a_split_of_only_bad_ones_is_refused(tmp_path):
    files = make_vqa_v2_files(tmp_path, n_images=3)
    split = load(files)
    split.image_paths[1000].write_bytes(b"")
    (files["images"] / "COCO_val2014_000000001014.jpg").unlink()
    split = load(files)
    kept = screen_images(split, skip_bad_images=True)
    assert [s["image_id"] for s in kept.skipped] == [1000, 1014] and kept.image_ids == [1007]
    assert "empty (0 bytes)" in kept.skipped[0]["error"]
    split.image_paths[1007].write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match="every image is unreadable"):
        screen_images(split, skip_bad_images=True)


# Batches: unique_rows, the collator, the sampler.

def test_unique_rows_gives_each_key_once_in_first_seen_order():
    unique, rows = unique_rows([5, 3, 5, 7, 3, 3])
    assert unique == [5, 3, 7]
    assert rows.dtype == torch.long and rows.tolist() == [0, 1, 0, 2, 1, 1]
    unique, rows = unique_rows(iter([(1, 2), (3,), (1, 2)]))  # any hashable keys, any iterable
    assert unique == [(1, 2), (3,)] and rows.tolist() == [0, 1, 0]
    unique, rows = unique_rows([])
    assert unique == [] and rows.shape == (0,) and rows.dtype == torch.long


@given(st.lists(st.integers(0, 6), max_size=30))
def test_unique_rows_rebuilds_the_keys(keys):
    unique, rows = unique_rows(keys)
    assert [unique[r] for r in rows.tolist()] == keys
    assert unique == list(dict.fromkeys(keys))


def test_split_by_image_keeps_images_apart():
    full = load_easy_vqa("train")
    train, val = split_by_image(full, 0.1, seed=0)
    assert len(val.image_ids) == 400 and len(train.image_ids) == 3600
    assert not set(train.image_ids) & set(val.image_ids)
    assert len(train.records) + len(val.records) == len(full.records)
    assert split_by_image(full, 0.1, seed=0)[1].image_ids == val.image_ids


def test_sampler_groups_questions_of_an_image_and_reshuffles(vqa_v2_files, easy_vqa_tokenizer):
    split = load(vqa_v2_files, images=False)
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


VOCABULARY = {"yes": 0, "red": 1, "green": 2, "blue": 3, "yellow": 4}


def test_collator_pads_scores_and_loads_each_image_once(vqa_v2_files, easy_vqa_tokenizer):
    split = load(vqa_v2_files)
    dataset = QuestionDataset(split, easy_vqa_tokenizer, VOCABULARY, 32)
    assert set(dataset[0]) == {"input_ids", "image_id", "scores"}
    loaded = []
    source = ImageSource(split.image_paths, transform=lambda image: loaded.append(image) or torch.zeros(3, 8, 8))
    batch = VQACollator(source, len(VOCABULARY))([dataset[i] for i in range(6)])
    assert set(batch) == {"input_ids", "lengths", "image_index", "pixel_values", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and len(loaded) == 3
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["input_ids"].shape[0] == 6 and batch["lengths"].min() >= 1
    yes_rows = [k for k in range(6) if dataset.records[k]["answers"][0] == "yes"]
    # 8 of 10 humans said "yes": every leave-one-out subset keeps >= 3 matches.
    assert all(batch["labels"][k, 0] == 1.0 for k in yes_rows)
    assert torch.all(batch["labels"].sum(-1) > 0)


def test_a_collated_batch_runs_the_cnn_once_per_distinct_image(vqa_v2_files, easy_vqa_tokenizer):
    torch.manual_seed(0)
    model = VQAModel(tiny_config(list(VOCABULARY), len(easy_vqa_tokenizer), image_size=32)).eval()
    split = load(vqa_v2_files)
    dataset = QuestionDataset(split, easy_vqa_tokenizer, VOCABULARY, 32)
    collate = VQACollator(ImageSource(split.image_paths, model.image_transform()), len(VOCABULARY))
    items = [dataset[i] for i in (0, 1, 2, 3, 4, 5, 6)]  # 7 questions on 4 images
    batch = collate(items)
    with ForwardCounter(model.image_encoder.backbone) as cnn, torch.no_grad():
        out = model(**batch)  # every key is one of forward's inputs
    assert cnn.batch_sizes == [4]
    assert out.logits.shape == (7, len(VOCABULARY)) and out.loss is not None


def test_collator_without_answers_and_with_cached_features(tmp_path, easy_vqa_tokenizer):
    files = make_vqa_v2_files(tmp_path, n_images=2, with_annotations=False)
    split = load(files)
    dataset = QuestionDataset(split, easy_vqa_tokenizer, VOCABULARY, 32)

    class Cache:
        def get(self, image_ids):
            return torch.tensor([[float(i)] * 4 for i in image_ids])

    batch = VQACollator(ImageSource(split.image_paths, feature_cache=Cache()), 5)([dataset[i] for i in range(4)])
    assert set(batch) == {"input_ids", "lengths", "image_index", "image_features"}
    assert batch["image_features"][:, 0].tolist() == [1000.0, 1007.0]
