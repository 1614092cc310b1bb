"""What a checkpoint knows about its own limits, fitted once its weights are final.

- `FeatureDensity` (vqa/reliability/ood.py): how far an image's pooled CNN features, and cheap
  statistics of its pixels (vqa/reliability/image_stats.py), are from the training images';
  an image is flagged when either is past its threshold, the two chosen together so that at
  most 1 % of held-out in-distribution images are flagged; fitted on training images,
  thresholded on validation images and training images scored out of fold.
- `WordVocabulary` (vqa/reliability/words.py): the training questions' words, to name unknown ones.
- `answer_threshold`: the lowest top-answer confidence at which the validation questions
  answered have at most 1 % risk (1 - VQA accuracy); below it the app says "not sure".

Training fits them at its end; `training/fit_reliability.py` fits them for an existing
checkpoint. They are files of the checkpoint folder: ood.safetensors + ood.json,
words.json, and `answer_threshold` in the model card.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..batching import ImageSource
from ..evaluation import Predictions, predict_split
from ..files import temporary_name
from ..images import open_image
from ..metrics import question_accuracies
from ..model import evaluating
from ..records import VQASplit
from .abstention import choose_threshold, coverage_at_risk
from .image_stats import image_statistics
from .ood import META_FILE, TENSORS_FILE, FeatureDensity
from .words import WORDS_FILE, WordVocabulary

RELIABILITY_FILES = (TENSORS_FILE, META_FILE, WORDS_FILE)

TARGET_RISK = 0.01
MAX_FIT_IMAGES = 5000  # training images the density is fitted on: enough for F = 2048 (Ledoit-Wolf shrinks)
BATCH = 64


@torch.inference_mode()
def pooled_features(model, source: ImageSource, image_ids: list[int]) -> np.ndarray:
    """(N, F) pooled CNN features of the images, from the cache or through the CNN in batches."""
    rows = []
    with evaluating(model):
        for start in range(0, len(image_ids), BATCH):
            block = source.batch(image_ids[start:start + BATCH])
            features = block.get("image_features")
            if features is None:
                features = model.image_features(block["pixel_values"].to(model.device))
            rows.append(model.pooled_features(features.to(model.device)).float().cpu().numpy())
    return np.concatenate(rows)


def pixel_statistics(transform, paths: list) -> np.ndarray:
    """(N, D) image statistics of the model inputs (`transform`: the model's own) of image files.
    Decoded here even where the CNN features come from a cache: the statistics need pixels."""
    rows = []
    for start in range(0, len(paths), BATCH):
        pixels = torch.stack([transform(open_image(p)) for p in paths[start:start + BATCH]])
        rows.append(image_statistics(pixels, transform.mean, transform.std))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def fit_density(model, train: VQASplit, train_source: ImageSource, heldout: np.ndarray,
                seed: int = 0, heldout_paths: list | None = None) -> FeatureDensity:
    """Fitted on (up to MAX_FIT_IMAGES) training images, thresholded on `heldout` (N, F) features.
    With `heldout_paths` (the held-out images' files, in the rows' order) the image-statistics
    density is fitted too and the two thresholds are chosen together."""
    ids = train.image_ids
    if len(ids) > MAX_FIT_IMAGES:
        ids = random.Random(seed).sample(ids, MAX_FIT_IMAGES)
    features = pooled_features(model, train_source, ids)
    if heldout_paths is None:
        return FeatureDensity().fit(features, heldout, TARGET_RISK)
    transform = model.image_transform()
    return FeatureDensity().fit(features, heldout, TARGET_RISK,
                                train_statistics=pixel_statistics(transform, [train.image_paths[i] for i in ids]),
                                heldout_statistics=pixel_statistics(transform, heldout_paths),
                                pixel_mean=transform.mean, pixel_std=transform.std, seed=seed)


def threshold_facts(val: VQASplit, predictions: Predictions) -> dict:
    """{answer_threshold, val coverage at 1 % risk} from the validation split's answers."""
    accuracy = question_accuracies(predictions.results, val)
    ids = [r["question_id"] for r in val.records]
    confidence = np.array([predictions.confidence[i] for i in ids])
    correct = np.array([accuracy[i] for i in ids])
    return {"answer_threshold": float(choose_threshold(confidence, correct, TARGET_RISK)),
            "val_coverage_at_1pct_risk": round(100 * coverage_at_risk(confidence, correct, TARGET_RISK), 2)}


def fit_reliability(model, tokenizer, train: VQASplit, train_source: ImageSource, val: VQASplit,
                    val_source: ImageSource, folder: str | Path, seed: int = 0) -> dict:
    """Fit all three, write the files into `folder` (a checkpoint, or where one is being built)
    and return the card facts: the answer threshold and the OOD threshold. The validation
    images go through the CNN once, for both the answers and the density's threshold."""
    predictions = predict_split(model, tokenizer, val, feature_cache=val_source.feature_cache, progress=False,
                                keep_pooled=True)
    heldout = np.stack([predictions.pooled[i] for i in val.image_ids])
    density = fit_density(model, train, train_source, heldout, seed, [val.image_paths[i] for i in val.image_ids])
    save_reliability(folder, density, WordVocabulary.from_questions(r["question"] for r in train.records))
    facts = threshold_facts(val, predictions)
    facts["ood_threshold"] = float(density.threshold)
    return facts


def save_reliability(folder: str | Path, density: FeatureDensity, words: WordVocabulary) -> None:
    """Write RELIABILITY_FILES into a temporary folder inside `folder`, then rename each over its
    old one: a run that fails before the renames leaves the old set whole, never a detector of
    one fit beside the words of another."""
    folder = Path(folder)
    staging = temporary_name(folder / "reliability")
    try:
        density.save(staging)
        words.save(staging)
        for name in RELIABILITY_FILES:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
