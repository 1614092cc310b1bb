"""vqa/hf_parquet.py: small parquet files in lmms-lab/VQAv2's schema, converted to the VQA v2 files."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from vqa import hf_parquet  # noqa: E402
from vqa.errors import DataError  # noqa: E402
from vqa.hf_parquet import parquet_to_vqa_files  # noqa: E402

# lmms-lab/VQAv2's README (dataset_info), in its column order; `image` is how `datasets` stores an Image.
ANSWER = pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
SCHEMA = pa.schema([("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
                    ("answers", pa.list_(ANSWER)), ("image_id", pa.int64()), ("answer_type", pa.string()),
                    ("question_id", pa.int64()), ("question", pa.string()),
                    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


IMAGES = {9: png("red"), 42: jpeg("blue"), 393225: png("green")}
# (question_id, image_id, question, question_type, answer_type, multiple_choice_answer, the 10 answers)
QUESTIONS = [
    (9000, 9, "What color is it?", "what color is the", "other", "red", ["red"] * 8 + ["pink", "maroon"]),
    (9001, 9, "Is it a square?", "is it", "yes/no", "yes", ["yes"] * 9 + ["no"]),
    (42000, 42, "How many shapes?", "how many", "number", "1", ["1"] * 7 + ["2"] * 3),
    (42001, 42, "What is blue?", "what is", "other", "square", ["square"] * 5 + ["box"] * 5),
    (393225000, 393225, "Is it green?", "is it", "yes/no", "yes", ["yes"] * 10),
]
CONFIDENCE = ["yes", "maybe", "no"]


def hf_rows(questions=QUESTIONS, with_answers=True) -> list[dict]:
    return [{"question_type": qtype if with_answers else None,
             "multiple_choice_answer": mc if with_answers else None,
             "answers": [{"answer": a, "answer_confidence": CONFIDENCE[i % 3], "answer_id": i + 1}
                         for i, a in enumerate(answers)] if with_answers else None,
             "image_id": image_id, "answer_type": atype if with_answers else None, "question_id": qid,
             "question": text, "image": {"bytes": IMAGES[image_id], "path": f"COCO_val2014_{image_id:012d}.jpg"}}
            for qid, image_id, text, qtype, atype, mc, answers in questions]


def write(path: Path, rows: list[dict], schema=SCHEMA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return path


def hub_folder(root: Path) -> Path:
    """lmms-lab/VQAv2's file layout: a validation split in two shards, a testdev split without answers."""
    write(root / "data" / "validation-00000-of-00002.parquet", hf_rows(QUESTIONS[:3]))
    write(root / "data" / "validation-00001-of-00002.parquet", hf_rows(QUESTIONS[3:]))
    write(root / "data" / "testdev-00000-of-00001-6edccf94719c69a2.parquet", hf_rows(QUESTIONS[:2], False))
    return root


def test_the_conversion_is_the_official_vqa_v2_layout(tmp_path):
    files = parquet_to_vqa_files(hub_folder(tmp_path / "hub"), tmp_path / "out", split="val", progress=False)
    out = tmp_path / "out"
    assert files == {"questions": out / "validation_questions.json",
                     "annotations": out / "validation_annotations.json", "images": out / "images"}

    # The same data written by hand in the layout of v2_OpenEnded_mscoco_val2014_questions.json and
    # v2_mscoco_val2014_annotations.json.
    expected_questions = [
        {"image_id": 9, "question": "What color is it?", "question_id": 9000},
        {"image_id": 9, "question": "Is it a square?", "question_id": 9001},
        {"image_id": 42, "question": "How many shapes?", "question_id": 42000},
        {"image_id": 42, "question": "What is blue?", "question_id": 42001},
        {"image_id": 393225, "question": "Is it green?", "question_id": 393225000},
    ]
    def answers(*values):
        return [{"answer": a, "answer_confidence": ["yes", "maybe", "no"][i % 3], "answer_id": i + 1}
                for i, a in enumerate(values)]
    expected_annotations = [
        {"question_type": "what color is the", "multiple_choice_answer": "red",
         "answers": answers(*["red"] * 8, "pink", "maroon"), "image_id": 9, "answer_type": "other",
         "question_id": 9000},
        {"question_type": "is it", "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 9, "no"),
         "image_id": 9, "answer_type": "yes/no", "question_id": 9001},
        {"question_type": "how many", "multiple_choice_answer": "1", "answers": answers(*["1"] * 7, *["2"] * 3),
         "image_id": 42, "answer_type": "number", "question_id": 42000},
        {"question_type": "what is", "multiple_choice_answer": "square",
         "answers": answers(*["square"] * 5, *["box"] * 5), "image_id": 42, "answer_type": "other",
         "question_id": 42001},
        {"question_type": "is it", "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 10),
         "image_id": 393225, "answer_type": "yes/no", "question_id": 393225000},
    ]
    questions = json.loads(files["questions"].read_text())
    annotations = json.loads(files["annotations"].read_text())
    assert questions["data_subtype"] == annotations["data_subtype"] == "validation"
    assert len(questions["questions"]) == len(expected_questions)
    for got, want in zip(questions["questions"], expected_questions):
        assert list(got.items()) == list(want.items())  # same fields, values and order
    assert len(annotations["annotations"]) == len(expected_annotations)
    for got, want in zip(annotations["annotations"], expected_annotations):
        assert list(got.items()) == list(want.items())

    # Each image once, its stored bytes, named by its id (.png for PNG bytes, .jpg for JPEG).
    assert sorted(p.name for p in files["images"].iterdir()) == ["393225.png", "42.jpg", "9.png"]
    assert (files["images"] / "42.jpg").read_bytes() == IMAGES[42]
    assert (files["images"] / "9.png").read_bytes() == IMAGES[9]
    record = json.loads((out / "conversion.json").read_text())
    assert record["questions"] == 5 and record["images"] == 3 and record["split"] == "validation"
    assert [f["file"] for f in record["files"]] == ["data/validation-00000-of-00002.parquet",
                                                   "data/validation-00001-of-00002.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_second_conversion_is_skipped(tmp_path, monkeypatch):
    source = hub_folder(tmp_path / "hub")
    first = parquet_to_vqa_files(source, tmp_path / "out", split="validation", progress=False)
    written = first["questions"].stat().st_mtime_ns

    def no_second_pass(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(hf_parquet, "_convert", no_second_pass)
    assert parquet_to_vqa_files(source, tmp_path / "out", split="val", progress=False) == first
    assert first["questions"].stat().st_mtime_ns == written
    with pytest.raises(DataError, match=r"out holds the conversion of other files .* split validation"):
        parquet_to_vqa_files(source, tmp_path / "out", split="testdev", progress=False)


def test_a_split_is_chosen_by_the_file_names(tmp_path):
    source = hub_folder(tmp_path / "hub")
    with pytest.raises(DataError, match=r"holds several splits \(testdev, validation\): choose one"):
        parquet_to_vqa_files(source, tmp_path / "all", progress=False)
    with pytest.raises(DataError, match=r"no .parquet files of split 'train' \(its splits: testdev, validation\)"):
        parquet_to_vqa_files(source, tmp_path / "train", split="train", progress=False)

    test_dev = parquet_to_vqa_files(source, tmp_path / "testdev", split="test-dev", progress=False)
    assert test_dev["annotations"] is None and not (tmp_path / "testdev" / "testdev_annotations.json").exists()
    assert [q["question_id"] for q in json.loads(test_dev["questions"].read_text())["questions"]] == [9000, 9001]
    assert [p.name for p in test_dev["images"].iterdir()] == ["9.png"]

    # The converted-parquet branch's layout: the split is the folder's name.
    write(tmp_path / "convert" / "default" / "validation" / "0000.parquet", hf_rows())
    single = parquet_to_vqa_files(tmp_path / "convert", tmp_path / "single", progress=False)
    assert single["questions"].name == "validation_questions.json"


def test_a_question_only_schema_is_read(tmp_path):
    """lmms-lab/VQAv2_TOY: image_id, question, question_id, image; no annotation columns at all."""
    schema = pa.schema([SCHEMA.field(n) for n in ("image_id", "question", "question_id", "image")])
    rows = [{k: r[k] for k in schema.names} for r in hf_rows()]
    files = parquet_to_vqa_files(write(tmp_path / "val-00000-of-00001.parquet", rows, schema), tmp_path / "out",
                                 progress=False)
    assert files["annotations"] is None and files["questions"].name == "val_questions.json"


@pytest.mark.parametrize("drop, message", [
    ("question_id", "has no column 'question_id'"),
    ("image", "has no column 'image'"),
    ("multiple_choice_answer", "has no column 'multiple_choice_answer'"),
])
def test_a_missing_column_is_named_with_the_file(tmp_path, drop, message):
    schema = pa.schema([f for f in SCHEMA if f.name != drop])
    path = write(tmp_path / "validation-00000-of-00001.parquet",
                 [{k: r[k] for k in schema.names} for r in hf_rows()], schema)
    with pytest.raises(DataError) as error:
        parquet_to_vqa_files(path, tmp_path / "out", progress=False)
    assert str(path) in str(error.value) and message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_answers_as_bare_strings_are_refused(tmp_path):
    """ReplugLens/VQAv2's `answers: sequence<string>` does not hold the official answers."""
    schema = SCHEMA.set(SCHEMA.get_field_index("answers"), pa.field("answers", pa.list_(pa.string())))
    rows = [{**r, "answers": [a["answer"] for a in r["answers"]]} for r in hf_rows()]
    path = write(tmp_path / "validation-00000-of-00001.parquet", rows, schema)
    with pytest.raises(DataError, match=r"column 'answers' is list<\w+: string>, expected a list of "
                                        r"\{answer, answer_confidence, answer_id\}"):
        parquet_to_vqa_files(path, tmp_path / "out", progress=False)


def test_images_stored_as_paths_and_images_with_nothing(tmp_path):
    rows = hf_rows()
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "COCO_val2014_000000000009.jpg").write_bytes(IMAGES[9])
    rows[0]["image"] = {"bytes": None, "path": "pictures/COCO_val2014_000000000009.jpg"}  # next to the parquet
    path = write(tmp_path / "validation.parquet", rows)
    files = parquet_to_vqa_files(path, tmp_path / "out", progress=False)
    assert (files["images"] / "9.png").read_bytes() == IMAGES[9]

    rows = hf_rows()
    rows[4]["image"] = {"bytes": None, "path": "gone.jpg"}
    path = write(tmp_path / "broken" / "validation.parquet", rows)
    with pytest.raises(DataError, match=r"validation.parquet: row 4 \(question_id 393225000\) has an image with "
                                        r"neither bytes nor a readable file \(path 'gone.jpg'\)"):
        parquet_to_vqa_files(path, tmp_path / "broken-out", progress=False)
    assert not (tmp_path / "broken-out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the staging folder is gone


def test_a_hub_name_offline_reads_the_cache_or_says_why_not(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"dataset lmms-lab/VQAv2 is not in the Hugging Face cache and "
                                        r"HF_HUB_OFFLINE is set"):
        parquet_to_vqa_files("lmms-lab/VQAv2", tmp_path / "out", split="validation", progress=False,
                             cache_dir=cache)

    # The cache's own layout: refs/main names the snapshot that holds the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--lmms-lab--VQAv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    hub_folder(repo / "snapshots" / commit)
    files = parquet_to_vqa_files("lmms-lab/VQAv2", tmp_path / "out", split="validation", progress=False,
                                 cache_dir=cache)
    assert len(json.loads(files["questions"].read_text())["questions"]) == 5


def test_a_source_that_is_nowhere(tmp_path):
    with pytest.raises(DataError, match="parquet source not found: .*nothing.parquet"):
        parquet_to_vqa_files(tmp_path / "nothing.parquet", tmp_path / "out", progress=False)


def test_evaluate_scores_parquet_as_it_scores_the_same_data_as_vqa_v2_files(tmp_path, monkeypatch, tiny_checkpoint):
    """evaluate.py --hf-path gives the official scores that the hand-written VQA v2 files give."""
    import importlib.util

    from fixtures import ROOT

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "training" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    monkeypatch.setenv("VQA_CACHE_DIR", str(tmp_path / "cache"))
    hub = hub_folder(tmp_path / "hub")
    # The same questions as files of the official layout, the images under COCO names.
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id, data in IMAGES.items():
        suffix = "png" if data.startswith(b"\x89PNG") else "jpg"
        (images / f"COCO_val2014_{image_id:012d}.{suffix}").write_bytes(data)
    rows = hf_rows()
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in rows]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {k: r[k] for k in ("question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                           "question_id")} for r in rows]}))
    common = ["--checkpoint", str(tiny_checkpoint)]
    assert evaluate.main([*common, "--hf-path", str(hub), "--split", "validation", "--out", str(tmp_path / "hf")]) == 0
    assert evaluate.main([*common, "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                          "--images", str(images), "--out", str(tmp_path / "json")]) == 0
    from_parquet = json.loads((tmp_path / "hf" / "metrics.json").read_text())
    from_json = json.loads((tmp_path / "json" / "metrics.json").read_text())
    assert from_parquet["overall"] == from_json["overall"]
    assert from_parquet["perQuestion"] == from_json["perQuestion"] and len(from_json["perQuestion"]) == 5
    assert from_parquet["perAnswerType"] == from_json["perAnswerType"]
    assert list((tmp_path / "cache" / "hf").iterdir())  # converted once into the cache


def test_training_reads_parquet_with_dataset_hf(tmp_path, monkeypatch):
    from vqa.config import TrainOptions
    from vqa.trainer import load_training_data

    monkeypatch.setenv("VQA_CACHE_DIR", str(tmp_path / "cache"))
    hub = hub_folder(tmp_path / "hub")
    train, val, test = load_training_data(TrainOptions(dataset="hf", hf_path=str(hub), hf_split="validation",
                                                       hf_test_split="testdev"))
    assert [r["question_id"] for r in train.records] == [q[0] for q in QUESTIONS] and val is None
    assert train.has_answers and not test.has_answers and len(test.records) == 2
    assert sorted(train.image_paths) == [9, 42, 393225]
    with pytest.raises(DataError, match="--dataset hf needs --hf-path"):
        load_training_data(TrainOptions(dataset="hf"))
