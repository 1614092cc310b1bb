"""training/evaluate.py and vqa.evaluation: the three ways in, the files they write, the errors."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures import ROOT, make_vqa_v2_files, tiny_config
from PIL import Image

from vqa.batching import ImageSource, QuestionDataset, VQACollator, screen_images
from vqa.checkpoint import load_checkpoint, save_checkpoint
from vqa.errors import DataError
from vqa.evaluation import Predictions, encode_questions, open_feature_cache, predict_split, run_evaluation
from vqa.extraction import extract_features
from vqa.metrics import evaluate_results
from vqa.model import VQAModel
from vqa.records import load_vqa_split
from vqa.reliability.abstention import aurc, coverage_at_risk

SCRIPT = ROOT / "training" / "evaluate.py"
_spec = importlib.util.spec_from_file_location("evaluate_cli", SCRIPT)
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def run_cli(*args):
    """The script in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def files_args(files, annotations=True):
    args = ["--questions", files["questions"], "--images", files["images"]]
    if annotations and files["annotations"] is not None:
        args += ["--annotations", files["annotations"]]
    return args


def error_line(stderr: str) -> str:
    """The last line of stderr (progress bars before it redraw with carriage returns)."""
    return re.split(r"[\r\n]+", stderr.strip())[-1]


def roundtrip(metrics):
    return json.loads(json.dumps(metrics))


def check_results_file(path, split, vocabulary):
    results = json.loads(path.read_text())
    assert isinstance(results, list)
    assert [r["question_id"] for r in results] == [r["question_id"] for r in split.records]
    for r in results:
        assert set(r) == {"question_id", "answer"}
        assert type(r["question_id"]) is int and r["answer"] in vocabulary
    return results


@pytest.fixture(scope="module")
def files_run(tmp_path_factory, tiny_checkpoint):
    """Way 2 (checkpoint + VQA v2 files with annotations) run once through the real command line."""
    folder = tmp_path_factory.mktemp("files_run")
    files = make_vqa_v2_files(folder / "data")
    out = folder / "out"
    done = run_cli("--checkpoint", tiny_checkpoint, *files_args(files), "--out", out, "--batch-size", "3")
    return files, out, done


def test_way2_writes_official_results_metrics_and_report(files_run, tiny_checkpoint):
    files, out, done = files_run
    assert done.returncode == 0, done.stderr
    split = load_vqa_split(files["questions"], files["annotations"], files["images"])
    model, _ = load_checkpoint(tiny_checkpoint)
    results = check_results_file(out / "results.json", split, set(model.config.answers))
    assert len(results) == 16
    metrics = json.loads((out / "metrics.json").read_text())
    abstention = metrics.pop("abstention")
    assert metrics == roundtrip(evaluate_results(results, split))
    assert set(metrics) == {"overall", "perAnswerType", "perQuestionType", "perQuestion"}
    # Selective answering, from the model's confidences: re-measured here from the predictions.
    model_predictions = predict_split(model, load_checkpoint(tiny_checkpoint)[1], split, progress=False)
    confidence = np.array([model_predictions.confidence[r["question_id"]] for r in split.records])
    accuracy = np.array([metrics["perQuestion"][str(r["question_id"])] / 100 for r in split.records])
    assert abstention["coverage_at_risk"]["1%"]["coverage"] == pytest.approx(
        100 * coverage_at_risk(confidence, accuracy, 0.01), abs=0.01)
    assert set(abstention["effective_reliability"]) == {"c=1", "c=10"}
    assert abstention["aurc"] == pytest.approx(100 * aurc(confidence, accuracy), abs=0.01)
    assert set(metrics["perAnswerType"]) == {"other", "yes/no"}
    assert len(metrics["perQuestion"]) == 16
    # The terminal summary ends with the overall and per-answer-type figures.
    assert f"overall accuracy: {metrics['overall']:.2f} % (16 questions)" in done.stdout
    assert f"yes/no: {metrics['perAnswerType']['yes/no']:.2f} %" in done.stdout
    assert "predicting" in done.stderr  # the tqdm bar
    report = (out / "report.md").read_text()
    for heading in ("## Accuracy per answer type", "## Question types", "## Most frequent wrong answers"):
        assert heading in report
    assert "(accuracy_per_answer_type.png)" in report and "(risk_coverage.png)" in report
    assert (out / "risk_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "accuracy_per_answer_type.png") as chart:
        chart.verify()
        assert chart.format == "PNG" and chart.size[0] > 100
    assert not (out / "skipped_images.json").exists()


def test_way3_scores_the_results_of_way2_identically(files_run, tmp_path, capsys):
    files, out, done = files_run
    assert done.returncode == 0, done.stderr
    rescored = tmp_path / "rescored"
    code = evaluate_cli.main(["--results", str(out / "results.json"), "--questions", str(files["questions"]),
                              "--annotations", str(files["annotations"]), "--out", str(rescored)])
    assert code == 0
    predicted = json.loads((out / "metrics.json").read_text())
    del predicted["abstention"]  # needs the model's confidences: only a run that predicts has them
    assert json.loads((rescored / "metrics.json").read_text()) == predicted
    assert (rescored / "results.json").read_text() == (out / "results.json").read_text()
    assert "Results file" in (rescored / "report.md").read_text()
    assert "overall accuracy" in capsys.readouterr().out


def test_way1_easy_vqa_test_split(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate_cli.main(["--checkpoint", str(tiny_checkpoint), "--dataset", "easy-vqa", "--split", "test",
                              "--out", str(out)]) == 0
    from vqa.worlds.easy_vqa import load_easy_vqa

    split = load_easy_vqa("test")
    model, _ = load_checkpoint(tiny_checkpoint)
    results = check_results_file(out / "results.json", split, set(model.config.answers))
    assert len(results) == 9673
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics.pop("abstention")["questions"] == 9673
    assert metrics == roundtrip(evaluate_results(results, split))
    assert set(metrics["perAnswerType"]) == {"yes/no", "other"}
    assert "overall accuracy" in capsys.readouterr().out


def test_predicting_without_annotations_writes_no_metrics(tiny_checkpoint, tmp_path):
    files = make_vqa_v2_files(tmp_path / "data", n_images=3, subtype="test2015", with_annotations=False)
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), *map(str, files_args(files)), "--out", str(out)]
    assert evaluate_cli.main(args) == 0
    split = load_vqa_split(files["questions"], None, files["images"])
    model, _ = load_checkpoint(tiny_checkpoint)
    assert len(check_results_file(out / "results.json", split, set(model.config.answers))) == 6
    assert not (out / "metrics.json").exists()
    assert not (out / "accuracy_per_answer_type.png").exists()
    assert "predictions only" in (out / "report.md").read_text()


def test_missing_image_names_the_file(tiny_checkpoint, tmp_path, capsys):
    files = make_vqa_v2_files(tmp_path / "data", n_images=3)
    (files["images"] / "COCO_val2014_000000001007.jpg").unlink()
    code = evaluate_cli.main(["--checkpoint", str(tiny_checkpoint), *map(str, files_args(files)),
                              "--out", str(tmp_path / "out")])
    assert code == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: ") and f"no image file for image_id 1007 in {files['images']}" in err
    assert "--skip-bad-images" in err
    assert not (tmp_path / "out" / "results.json").exists()  # refused before any prediction


def test_skip_bad_images_counts_and_lists_them(tiny_checkpoint, tmp_path, capsys):
    files = make_vqa_v2_files(tmp_path / "data", n_images=4)
    corrupt = files["images"] / "COCO_val2014_000000001007.jpg"
    corrupt.write_bytes(b"this is not a JPEG")
    (files["images"] / "COCO_val2014_000000001014.jpg").unlink()
    args = ["--checkpoint", str(tiny_checkpoint), *map(str, files_args(files)), "--batch-size", "2"]

    assert evaluate_cli.main([*args, "--out", str(tmp_path / "strict")]) == 2  # opt-in only
    err = error_line(capsys.readouterr().err)  # the first bad image stops the run, named
    assert err.startswith("error: ") and str(corrupt) in err and "--skip-bad-images" in err

    out = tmp_path / "out"
    assert evaluate_cli.main([*args, "--skip-bad-images", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable images (4 questions" in err
    skipped = {s["image_id"]: s for s in json.loads((out / "skipped_images.json").read_text())}
    assert set(skipped) == {1007, 1014}
    assert skipped[1007]["path"] == str(corrupt) and "not a readable image" in skipped[1007]["error"]
    assert skipped[1007]["question_ids"] == [10070, 10071]
    assert skipped[1014]["path"] is None and "no image file" in skipped[1014]["error"]
    results = json.loads((out / "results.json").read_text())
    answered = {r["question_id"] for r in results}
    assert len(results) == 4 and not answered & {10070, 10071, 10140, 10141}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {int(q) for q in metrics["perQuestion"]} == answered
    report = (out / "report.md").read_text()
    assert "2 images could not be read and were skipped" in report and "## Skipped images" in report


def test_corrupt_image_without_skipping_names_the_file(tiny_checkpoint, tmp_path):
    files = make_vqa_v2_files(tmp_path / "data", n_images=2)
    corrupt = files["images"] / "COCO_val2014_000000001007.jpg"
    corrupt.write_bytes(b"")
    # run_evaluation screens every image before predicting ...
    with pytest.raises(DataError, match=rf"{re.escape(str(corrupt))} is empty \(0 bytes\).*--skip-bad-images"):
        run_evaluation(tmp_path / "out", tiny_checkpoint, questions=files["questions"],
                       annotations=files["annotations"], images=files["images"], progress=False)
    assert not (tmp_path / "out" / "results.json").exists()
    # ... predict_split itself skips nothing: an unscreened bad image stops it, named.
    split = load_vqa_split(files["questions"], files["annotations"], files["images"])
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    with pytest.raises(DataError, match=rf"{re.escape(str(corrupt))}.*--skip-bad-images"):
        predict_split(model, tokenizer, split, progress=False)


def test_bad_checkpoint_folder_exits_2_with_the_reason(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["id2label"]
    (broken / "config.json").write_text(json.dumps(config))
    files = make_vqa_v2_files(tmp_path / "data", n_images=1)
    done = run_cli("--checkpoint", broken, *files_args(files), "--out", tmp_path / "out")
    assert done.returncode == 2
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {broken / 'config.json'} has no answer vocabulary (field 'id2label')"
    assert "Traceback" not in done.stderr


def test_missing_checkpoint_and_bad_results_exit_2(tmp_path, capsys, vqa_v2_files):
    assert evaluate_cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--dataset", "easy-vqa",
                              "--out", str(tmp_path / "out")]) == 2
    assert "error: checkpoint folder not found" in capsys.readouterr().err
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": 10000, "answer": "red"}]))
    assert evaluate_cli.main(["--results", str(results), "--questions", str(vqa_v2_files["questions"]),
                              "--annotations", str(vqa_v2_files["annotations"]), "--out", str(tmp_path / "o")]) == 2
    assert "15 of the 16 questions have no answer" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--dataset", "easy-vqa"],  # neither --checkpoint nor --results
    ["--checkpoint", "c", "--results", "r.json", "--dataset", "easy-vqa"],
    ["--checkpoint", "c"],  # no data
    ["--results", "r.json", "--questions", "q.json"],  # scoring needs annotations
])
def test_argument_errors_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.parse_args([*args, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- the library -----------------------------------------------------------------------

@pytest.fixture
def model_and_split(tiny_checkpoint, vqa_v2_files):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    return model, tokenizer, split


def collated(model, tokenizer, split):
    """The whole split as one training-style batch (the model's own forward input)."""
    dataset = QuestionDataset(split, tokenizer, model.config.label2id, model.config.max_question_tokens)
    batch = VQACollator(ImageSource(split.image_paths, model.image_transform()), len(model.config.answers))(
        [dataset[i] for i in range(len(dataset))])
    batch.pop("labels", None)
    return dataset, batch


def test_encoded_questions_give_the_model_forward_logits(model_and_split):
    model, tokenizer, split = model_and_split
    dataset, batch = collated(model, tokenizer, split)
    with torch.inference_mode():
        expected = model(**batch).logits
        features = model.image_features(batch["pixel_values"])
        questions, rows = encode_questions(model, dataset.input_ids, chunk=3)
        logits = model.answer_logits(features, questions[rows], batch["image_index"])
    # Each distinct question once ("What color is the shape?", "Is there a circle?", ...), in first-seen order.
    distinct = list(dict.fromkeys(tuple(ids) for ids in dataset.input_ids))
    assert questions.shape[0] == len(distinct) == len({r["question"] for r in split.records}) < len(split.records)
    assert rows.tolist() == [distinct.index(tuple(ids)) for ids in dataset.input_ids]
    assert logits.shape == expected.shape == (16, len(model.config.answers))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_confidence_is_the_softmax_maximum_of_the_model_logits(model_and_split):
    model, tokenizer, split = model_and_split
    dataset, batch = collated(model, tokenizer, split)
    with torch.inference_mode():
        probabilities = model(**batch).logits.softmax(-1)
    predictions = predict_split(model, tokenizer, split, batch_size=3, progress=False)
    assert isinstance(predictions, Predictions)
    answer_of = {r["question_id"]: r["answer"] for r in predictions.results}
    assert set(predictions.confidence) == set(answer_of) == {r["question_id"] for r in split.records}
    for row, record in enumerate(dataset.records):
        qid = record["question_id"]
        assert predictions.confidence[qid] == pytest.approx(float(probabilities[row].max()), abs=1e-6)
        assert answer_of[qid] == model.config.answers[int(probabilities[row].argmax())]
    assert len(set(predictions.confidence.values())) > 1  # a real figure per question, not a constant


def test_predictions_do_not_depend_on_batch_size(model_and_split):
    model, tokenizer, split = model_and_split
    runs = [predict_split(model, tokenizer, split, batch_size=b, progress=False) for b in (1, 3, 256)]
    for run in runs:
        assert run.results == runs[0].results
        assert run.confidence == pytest.approx(runs[0].confidence, abs=1e-6)
    assert [r["question_id"] for r in runs[0].results] == [r["question_id"] for r in split.records]
    with pytest.raises(DataError, match="batch size must be at least 1, got 0"):
        predict_split(model, tokenizer, split, batch_size=0, progress=False)


def test_screened_split_predicts_the_kept_questions_only(model_and_split):
    model, tokenizer, split = model_and_split
    split.image_paths[1007].write_bytes(b"broken")
    kept = screen_images(split, skip_bad_images=True)
    results = predict_split(model, tokenizer, kept, progress=False).results
    assert [r["question_id"] for r in results] == [r["question_id"] for r in split.records
                                                   if r["image_id"] != 1007]


def test_an_unwritable_output_folder_is_named_before_any_work(tmp_path, tiny_checkpoint, vqa_v2_files):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(DataError, match=rf"output folder {re.escape(str(a_file))} is a file"):
        run_evaluation(a_file, tiny_checkpoint, questions=vqa_v2_files["questions"], images=vqa_v2_files["images"],
                       progress=False)
    inside = a_file / "out"  # a folder cannot be made inside a file, whoever runs the test (root too)
    with pytest.raises(DataError, match=rf"cannot write into the output folder {re.escape(str(inside))}"):
        run_evaluation(inside, tiny_checkpoint, questions=vqa_v2_files["questions"], images=vqa_v2_files["images"],
                       progress=False)


def test_feature_cache_replaces_the_cnn_for_a_frozen_backbone(tmp_path, easy_vqa_answers, easy_vqa_tokenizer,
                                                              vqa_v2_files, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(easy_vqa_answers, len(easy_vqa_tokenizer), freeze_backbone=True)
    frozen = save_checkpoint(VQAModel(config).eval(), easy_vqa_tokenizer, tmp_path / "frozen")
    model, tokenizer = load_checkpoint(frozen)
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    extract_features(model, split.image_paths, tmp_path / "cache", progress=False, num_workers=0)
    without_cache = predict_split(model, tokenizer, split, progress=False)

    cache, why_not = open_feature_cache(model, tmp_path / "cache")
    assert why_not is None

    def no_cnn(*args, **kwargs):
        raise AssertionError("the CNN ran although the features are cached")

    monkeypatch.setattr(model, "image_features", no_cnn)
    with_cache = predict_split(model, tokenizer, split, feature_cache=cache, progress=False)
    assert [r["question_id"] for r in with_cache.results] == [r["question_id"] for r in without_cache.results]
    # float16 features: near-ties may flip, the rest agree
    agree = sum(a["answer"] == b["answer"] for a, b in zip(with_cache.results, without_cache.results))
    assert agree >= len(with_cache.results) - 2
    for qid, confidence in without_cache.confidence.items():
        assert with_cache.confidence[qid] == pytest.approx(confidence, abs=1e-3)


def test_feature_cache_is_not_used_when_it_does_not_fit(tmp_path, tiny_checkpoint, vqa_v2_files):
    model, tokenizer = load_checkpoint(tiny_checkpoint)  # backbone not frozen
    split = load_vqa_split(vqa_v2_files["questions"], vqa_v2_files["annotations"], vqa_v2_files["images"])
    extract_features(model, dict(list(split.image_paths.items())[:3]), tmp_path / "cache", progress=False,
                     num_workers=0)
    cache, why_not = open_feature_cache(model, tmp_path / "cache")
    assert cache is None and "freeze_backbone is false" in why_not
    model.config.freeze_backbone = True
    cache, why_not = open_feature_cache(model, tmp_path / "cache")
    assert why_not is None
    with pytest.raises(DataError, match="has no features for 5 of the 8 images"):
        predict_split(model, tokenizer, split, feature_cache=cache, progress=False)
    model.config.image_size = 32
    cache, why_not = open_feature_cache(model, tmp_path / "cache")
    assert cache is None and "was made with another transform" in why_not
