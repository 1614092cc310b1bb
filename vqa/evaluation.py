"""Batch prediction over a split, and the files an evaluation writes.

`predict_split` answers every question of a split with a checkpoint through the model's own
three steps. Questions are sorted by image and taken in blocks of up to `batch_size` images;
each image of a block goes through the CNN once (or its features are read from the cache).
Each distinct question is encoded once, up front (easy-VQA's 9,673 test questions hold 107
distinct texts), and its vector is given to every pair that asks it.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import ImageSource, QuestionDataset, screen_images, unique_rows
from .checkpoint import load_checkpoint
from .errors import DataError
from .feature_cache import FeatureCache, cache_meta, mismatch
from .hf_parquet import load_hf_split
from .metrics import evaluate_results, load_results
from .records import VQASplit, load_vqa_split
from .reliability.abstention import plot_risk_coverage, risk_coverage_curve, summary
from .report import RISK_COVERAGE_FILE, write_report
from .text import pad_questions
from .worlds.registry import load_builtin

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped_images.json"
DEFAULT_BATCH_SIZE = 256  # images per CNN pass (the questions on them go in one pass); questions per encoder pass


@dataclass
class Predictions:
    results: list[dict]  # [{"question_id", "answer"}] in the split's order: the official results format
    confidence: dict[int, float] = field(default_factory=dict)  # question_id -> top answer's probability
    pooled: dict[int, np.ndarray] = field(default_factory=dict)  # image_id -> pooled CNN features (keep_pooled)


def load_split(dataset: str | None = None, split: str = "test", questions=None, annotations=None, images=None,
               allow_nonstandard_answers: bool = False, hf_path: str | None = None) -> VQASplit:
    """A built-in dataset by name, VQA v2 parquet (`hf_path`, its `split`), or VQA v2-layout files.
    `images` may be None to score results only."""
    if hf_path is not None:
        return load_hf_split(hf_path, split, allow_nonstandard_answers=allow_nonstandard_answers)
    if dataset is not None:
        return load_builtin(dataset, split)
    if questions is None:
        raise DataError("no data: give --dataset or --questions (with --images to predict)")
    return load_vqa_split(questions, annotations, images, allow_nonstandard_answers=allow_nonstandard_answers)


def open_feature_cache(model, folder: str | Path) -> tuple[FeatureCache | None, str | None]:
    """(cache, None) when the cache in `folder` can stand in for the CNN, else (None, why not)."""
    if not model.config.freeze_backbone:
        return None, (f"feature cache {folder} not used: this checkpoint fine-tuned its backbone "
                      "(freeze_backbone is false), so cached features are not its features")
    cache = FeatureCache(folder)
    why_not = mismatch(cache, cache_meta(model))
    return (None, f"{why_not}: not used") if why_not else (cache, None)


def encode_questions(model, input_ids: list[list[int]], chunk: int = DEFAULT_BATCH_SIZE,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct question once: (vectors (U, C), row of each question (Q,)).

    Holds U x common_dim floats: 0.4 GB for 100,000 distinct questions at common_dim 1024.
    """
    unique, rows = unique_rows(tuple(ids) for ids in input_ids)
    vectors = []
    for s in tqdm(range(0, len(unique), chunk), desc="encoding questions", unit="batch", disable=not progress,
                  leave=False):
        ids, lengths = pad_questions([list(u) for u in unique[s : s + chunk]])
        vectors.append(model.question_vectors(ids.to(model.device), lengths.to(model.device)))  # (chunk, C)
    return torch.cat(vectors), rows.to(model.device)


def _image_blocks(records: list[dict], size: int):
    """Record positions of consecutive runs of at most `size` images."""
    positions, images = [], 0
    for position, record in enumerate(records):
        if not positions or record["image_id"] != records[positions[-1]]["image_id"]:
            if images == size:
                yield positions
                positions, images = [], 0
            images += 1
        positions.append(position)
    if positions:
        yield positions


@torch.inference_mode()
def predict_split(model, tokenizer, split: VQASplit, batch_size: int = DEFAULT_BATCH_SIZE,
                  feature_cache: FeatureCache | None = None, progress: bool = True,
                  keep_pooled: bool = False) -> Predictions:
    """Answer every question of `split` with the model's top answer (config.id2label).

    keep_pooled: also keep each image's pooled CNN features (what the OOD detector measures),
    from the same CNN pass, instead of running the CNN over the images a second time.

    Images are read as they are: run `screen_images` first to apply the bad-image policy.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    model.eval()
    answers, device = model.config.answers, model.device
    if feature_cache is not None:
        why_not = mismatch(feature_cache, cache_meta(model))
        if why_not:
            raise DataError(why_not)
        uncached = [i for i in split.image_ids if i not in feature_cache]
        if uncached:
            raise DataError(f"feature cache {feature_cache.folder} has no features for {len(uncached)} of the "
                            f"{len(split.image_ids)} images of {split.name} (first: image {uncached[0]})")
        images = ImageSource(split.image_paths, feature_cache=feature_cache)
    else:
        images = ImageSource(split.image_paths, model.image_transform())
    # Prediction needs no training targets: give the dataset questions only.
    questions_only = VQASplit(split.name, [{k: r[k] for k in ("question_id", "image_id", "question")}
                                           for r in split.records], split.image_paths)
    dataset = QuestionDataset(questions_only, tokenizer, model.config.label2id, model.config.max_question_tokens)
    questions, question_row = encode_questions(model, dataset.input_ids, batch_size, progress)

    predictions = Predictions([])
    by_id: dict[int, str] = {}
    bar = tqdm(total=len(dataset), desc=f"predicting {split.name}", unit="q", disable=not progress)
    for positions in _image_blocks(dataset.records, batch_size):
        unique, image_index = unique_rows(dataset.records[p]["image_id"] for p in positions)
        block = images.batch(unique)
        if "image_features" in block:
            features = block["image_features"].to(device)
        else:
            features = model.image_features(block["pixel_values"].to(device))  # one CNN pass per image
        if keep_pooled:
            predictions.pooled.update(zip(unique, model.pooled_features(features).float().cpu().numpy()))
        logits = model.answer_logits(features, questions[question_row[positions]], image_index.to(device))
        confidence, top = logits.float().softmax(-1).max(-1)
        for position, answer, p in zip(positions, top.tolist(), confidence.tolist()):
            qid = dataset.records[position]["question_id"]
            by_id[qid] = answers[answer]
            predictions.confidence[qid] = p
        bar.update(len(positions))
    bar.close()
    predictions.results = [{"question_id": r["question_id"], "answer": by_id[r["question_id"]]} for r in split.records]
    return predictions


def _output_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"cannot write into the output folder {out}: {error.strerror or error}") from error
    return out


def write_evaluation(out: str | Path, split: VQASplit, results: list[dict], skipped: list[dict] | None = None,
                     source: dict | None = None, confidence: dict[int, float] | None = None) -> dict | None:
    """Write results.json, metrics.json (annotated splits), skipped_images.json (if any),
    report.md and its chart into `out`. Returns the metrics, or None without annotations.

    Questions on skipped images have no answer: the metrics cover the other questions.
    """
    out = _output_folder(out)
    skipped = skipped or []
    (out / RESULTS_FILE).write_text(json.dumps(results))
    for name in (METRICS_FILE, SKIPPED_FILE):
        (out / name).unlink(missing_ok=True)  # never leave a previous run's file beside new results
    if skipped:
        (out / SKIPPED_FILE).write_text(json.dumps(skipped, indent=2))
    metrics = None
    if split.has_answers:
        scored = split
        if skipped:
            bad = {s["image_id"] for s in skipped}
            scored = split.subset([i for i in split.image_ids if i not in bad], split.name)
        if scored.records:
            metrics = evaluate_results(results, scored)
            if confidence:
                metrics["abstention"] = abstention_figures(metrics, confidence, out / RISK_COVERAGE_FILE)
            (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    write_report(out, split, results, metrics, skipped, source or {})
    return metrics


def abstention_figures(metrics: dict, confidence: dict[int, float], plot: Path) -> dict:
    """Coverage at 1 % and 5 % risk, AURC and effective reliability (vqa/reliability/abstention.py), and the
    risk-coverage curve drawn to `plot`."""
    ids = list(metrics["perQuestion"])
    scores = np.array([confidence[i] for i in ids])
    accuracy = np.array([metrics["perQuestion"][i] / 100 for i in ids])
    coverage, risk, _ = risk_coverage_curve(scores, accuracy)
    plot_risk_coverage({"top answer's probability": (coverage, risk)}, plot)
    return summary(scores, accuracy)


def run_evaluation(out: str | Path, checkpoint=None, results_file=None, dataset: str | None = None,
                   split: str = "test", questions=None, annotations=None, images=None, feature_cache=None,
                   batch_size: int = DEFAULT_BATCH_SIZE, skip_bad_images: bool = False,
                   allow_nonstandard_answers: bool = False, progress: bool = True,
                   log=print, hf_path: str | None = None) -> tuple[dict | None, list[dict]]:
    """What `training/evaluate.py` does: predict with `checkpoint` (or read `results_file`),
    score when annotations exist, and write everything into `out`. Returns (metrics, skipped)."""
    _output_folder(out)  # before the work, not after it
    data = load_split(dataset, split, questions, annotations, images if checkpoint is not None else None,
                      allow_nonstandard_answers, hf_path)
    source = {"Data": f"{hf_path or dataset} {split}" if hf_path or dataset else str(questions)}
    if annotations is not None:
        source["Annotations"] = str(annotations)
    skipped: list[dict] = []
    confidence = None
    if checkpoint is not None:
        model, tokenizer = load_checkpoint(checkpoint)
        source["Checkpoint"] = str(checkpoint)
        cache = None
        if feature_cache is not None:
            cache, why_not = open_feature_cache(model, feature_cache)
            if why_not:
                log(f"warning: {why_not}; running the CNN instead")
            else:
                source["Feature cache"] = str(feature_cache)
        if cache is None:
            if images is None and dataset is None and hf_path is None:
                raise DataError("predicting needs the images: give --images (or a matching --feature-cache)")
            scored = screen_images(data, skip_bad_images)
            skipped = scored.skipped
        else:
            scored = data
        predictions = predict_split(model, tokenizer, scored, batch_size, cache, progress)
        results, confidence = predictions.results, predictions.confidence
    else:
        results = load_results(results_file, (r["question_id"] for r in data.records))
        source["Results file"] = str(results_file)
    if skipped:
        lost = sum(len(s["question_ids"]) for s in skipped)
        log(f"warning: skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} "
            f"({lost} questions unanswered, not scored); listed in {Path(out) / SKIPPED_FILE}")
    metrics = write_evaluation(out, data, results, skipped, source, confidence)
    return metrics, skipped
