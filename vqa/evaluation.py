"""Batch prediction over a split, and the files an evaluation writes.

`predict_split` answers every question of a split with a checkpoint. QuestionDataset
tokenizes the questions and sorts them by image; they are taken in blocks of up to
`batch_size` images, and ImageSource loads each image of a block once, so the CNN runs
once per image, in batches as large as a feature extraction uses (or the feature cache
is read instead). Each distinct question is encoded once, up front (easy-VQA's 9,673
test questions hold 107 distinct texts), which is why VQACollator, which pads every
question of a batch for the model's forward, is not used here.
"""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint
from .data import (ImageSource, QuestionDataset, VQASplit, index_image_folder, load_easy_vqa, load_vqa_split,
                   unreadable_images)
from .errors import DataError, InputError
from .features import MATCHING_FIELDS, FeatureCache, cache_meta
from .metrics import evaluate_results, load_results
from .report import write_report
from .text import pad_questions

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.json"
SKIPPED_FILE = "skipped_images.json"
DEFAULT_BATCH_SIZE = 256  # images per CNN pass (the questions on them go in one pass); questions per encoder pass


def load_split(dataset: str | None = None, split: str = "test", questions=None, annotations=None, images=None,
               skip_bad_images: bool = False) -> VQASplit:
    """easy-VQA by name, or VQA v2-layout files. `images` may be None to score results only.

    With `skip_bad_images`, images missing from the folder are not an error here:
    `predict_split` skips and lists them with the unreadable ones.
    """
    if dataset is not None:
        if dataset != "easy-vqa":
            raise DataError(f"unknown dataset {dataset!r}: the built-in one is 'easy-vqa'; "
                            "give VQA v2-layout files with --questions")
        return load_easy_vqa(split)
    if questions is None:
        raise DataError("no data: give --dataset easy-vqa or --questions (with --images to predict)")
    if skip_bad_images and images is not None:
        loaded = load_vqa_split(questions, annotations)
        index = index_image_folder(images)
        loaded.image_paths = {i: index[i] for i in loaded.image_ids if i in index}
        return loaded
    return load_vqa_split(questions, annotations, images)


def _cache_mismatch(model, cache: FeatureCache) -> str | None:
    """Why `cache` does not hold this model's features, or None when it does."""
    now = cache_meta(model)
    changed = [k for k in MATCHING_FIELDS if cache.meta.get(k) != now.get(k)]
    if changed:
        return f"feature cache {cache.folder} was made with another {', '.join(changed)} than this checkpoint's"
    return None


def open_feature_cache(model, folder: str | Path) -> tuple[FeatureCache | None, str | None]:
    """(cache, None) when the cache in `folder` can stand in for the CNN, else (None, why not)."""
    if not model.config.freeze_backbone:
        return None, (f"feature cache {folder} not used: this checkpoint fine-tuned its backbone "
                      "(freeze_backbone is false), so cached features are not its features")
    cache = FeatureCache(folder)
    mismatch = _cache_mismatch(model, cache)
    if mismatch:
        return None, f"{mismatch}: not used"
    return cache, None


def encode_questions(model, input_ids: list[list[int]], chunk: int = DEFAULT_BATCH_SIZE,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct question once: (vectors (U, C), row of each question (Q,)).

    Holds U x common_dim floats: 0.4 GB for 100,000 distinct questions at common_dim 1024.
    """
    rows, distinct = [], {}
    for ids in input_ids:
        rows.append(distinct.setdefault(tuple(ids), len(distinct)))
    unique = list(distinct)
    device = model.device
    vectors = []
    for s in tqdm(range(0, len(unique), chunk), desc="encoding questions", unit="batch", disable=not progress,
                  leave=False):
        ids, lengths = pad_questions([list(u) for u in unique[s : s + chunk]])
        vectors.append(model.question_encoder(ids.to(device), lengths.to(device)))  # (chunk, C)
    return torch.cat(vectors), torch.tensor(rows, dtype=torch.long, device=device)


def answer_logits(model, image_features: torch.Tensor, image_index: torch.Tensor, questions: torch.Tensor,
                  question_index: torch.Tensor) -> torch.Tensor:
    """VQAModel.forward's logits (B, A) from encoded questions.

    image_features: (N, F) pooled CNN features; image_index: (B,) row of each pair's image;
    questions: (U, C) from `encode_questions`; question_index: (B,) row of each pair's question.
    """
    images = model.image_encoder(image_features)  # (N, C)
    return model.answer_logits(images[image_index], questions[question_index])  # (B, A)


def _image_blocks(records: list[dict], size: int):
    """(image ids, record positions) of consecutive runs of at most `size` images."""
    image_ids, positions = [], []
    for position, record in enumerate(records):
        if not image_ids or record["image_id"] != image_ids[-1]:
            if len(image_ids) == size:
                yield image_ids, positions
                image_ids, positions = [], []
            image_ids.append(record["image_id"])
        positions.append(position)
    if positions:
        yield image_ids, positions


@torch.inference_mode()
def predict_split(model, tokenizer, split: VQASplit, batch_size: int = DEFAULT_BATCH_SIZE,
                  feature_cache: FeatureCache | None = None, skip_bad_images: bool = False,
                  progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Answer every question of `split`: (results, skipped).

    results: [{"question_id": int, "answer": str}] in the split's question order, the
    official results format; answers are the model's top answer (config.id2label).
    skipped: [{"image_id", "path", "error", "question_ids"}] for images that could not be
    read, only with `skip_bad_images` (otherwise the first such image raises).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    model.eval()
    config = model.config
    answers = config.answers
    device = model.device
    if feature_cache is not None:
        mismatch = _cache_mismatch(model, feature_cache)
        if mismatch:
            raise DataError(mismatch)
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
    dataset = QuestionDataset(questions_only, tokenizer, config.label2id, config.max_question_tokens)
    questions, question_row = encode_questions(model, dataset.input_ids, batch_size, progress)

    predicted: dict[int, str] = {}
    skipped: list[dict] = []
    bar = tqdm(total=len(dataset), desc=f"predicting {split.name}", unit="q", disable=not progress)
    for image_ids, positions in _image_blocks(dataset.records, batch_size):
        bad = {}
        if feature_cache is None:
            bad = {i: f"no image file for image {i}" for i in image_ids if i not in split.image_paths}
        kept = [i for i in image_ids if i not in bad]
        block = None
        try:
            block = images.batch(kept) if kept else None  # each image of the block once
        except (InputError, DataError):
            # Which images failed is worked out only now: the common path reads each image once.
            more = unreadable_images(split.image_paths, kept) if skip_bad_images and feature_cache is None else {}
            if not more:
                raise
            bad.update(more)
            kept = [i for i in kept if i not in more]
            block = images.batch(kept) if kept else None
        if bad:
            if not skip_bad_images:
                raise DataError(f"{next(iter(bad.values()))} (--skip-bad-images skips such images)")
            for image_id, error in bad.items():
                path = split.image_paths.get(image_id)
                skipped.append({"image_id": image_id, "path": str(path) if path else None, "error": error,
                                "question_ids": [dataset.records[p]["question_id"] for p in positions
                                                 if dataset.records[p]["image_id"] == image_id]})
            bar.update(sum(dataset.records[p]["image_id"] in bad for p in positions))
            positions = [p for p in positions if dataset.records[p]["image_id"] not in bad]
        if not positions:
            continue
        if "image_features" in block:
            features = block["image_features"].to(device)
        else:
            features = model.image_encoder.features(block["pixel_values"].to(device))  # one CNN pass per image
        row = {image_id: r for r, image_id in enumerate(kept)}
        image_index = torch.tensor([row[dataset.records[p]["image_id"]] for p in positions], device=device)
        logits = answer_logits(model, features, image_index, questions, question_row[positions])
        for position, top in zip(positions, logits.argmax(-1).tolist()):
            predicted[dataset.records[position]["question_id"]] = answers[top]
        bar.update(len(positions))
    bar.close()
    results = [{"question_id": r["question_id"], "answer": predicted[r["question_id"]]}
               for r in split.records if r["question_id"] in predicted]
    return results, skipped


def _output_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_evaluation(out: str | Path, split: VQASplit, results: list[dict], skipped: list[dict] | None = None,
                     source: dict | None = None) -> dict | None:
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
            (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    write_report(out, split, results, metrics, skipped, source or {})
    return metrics


def run_evaluation(out: str | Path, checkpoint=None, results_file=None, dataset: str | None = None,
                   split: str = "test", questions=None, annotations=None, images=None, feature_cache=None,
                   batch_size: int = DEFAULT_BATCH_SIZE, skip_bad_images: bool = False, progress: bool = True,
                   log=print) -> tuple[dict | None, list[dict]]:
    """What `training/evaluate.py` does: predict with `checkpoint` (or read `results_file`),
    score when annotations exist, and write everything into `out`. Returns (metrics, skipped)."""
    _output_folder(out)  # before the work, not after it
    data = load_split(dataset, split, questions, annotations, images if checkpoint is not None else None,
                      skip_bad_images)
    source = {"Data": f"{dataset} {split}" if dataset else str(questions)}
    if annotations is not None:
        source["Annotations"] = str(annotations)
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
        if images is None and dataset is None and cache is None:
            raise DataError("predicting needs the images: give --images (or a matching --feature-cache)")
        results, skipped = predict_split(model, tokenizer, data, batch_size, cache, skip_bad_images, progress)
    else:
        results, skipped = load_results(results_file, (r["question_id"] for r in data.records)), []
        source["Results file"] = str(results_file)
    if skipped:
        lost = sum(len(s["question_ids"]) for s in skipped)
        log(f"warning: skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} "
            f"({lost} questions unanswered, not scored); "
            f"listed in {Path(out) / SKIPPED_FILE}")
    metrics = write_evaluation(out, data, results, skipped, source)
    return metrics, skipped
