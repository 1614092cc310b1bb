"""On-disk cache of pooled CNN features for a frozen backbone.

A cache folder holds `features.npy` (float16, (N, F), memory-mapped), `index.json`
(image_id -> row) and `meta.json` (which backbone and preprocessing made them). Each
image is run through the CNN once; later epochs, runs and evaluations read the rows.
Extraction is resumable: rows already written are skipped.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import DataError

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"
META_FILE = "meta.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for name in (FEATURES_FILE, INDEX_FILE, META_FILE):
            if not (self.folder / name).is_file():
                raise DataError(f"feature cache {self.folder} is incomplete: {name} is missing")
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.index = {int(k): v for k, v in json.loads((self.folder / INDEX_FILE).read_text()).items()}
        self.features = np.load(self.folder / FEATURES_FILE, mmap_mode="r")  # (N, F) float16

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.index

    def get(self, image_ids: list[int]) -> torch.Tensor:
        missing = [i for i in image_ids if i not in self.index]
        if missing:
            raise DataError(f"feature cache {self.folder} has no features for image {missing[0]}")
        rows = [self.index[i] for i in image_ids]
        return torch.from_numpy(np.asarray(self.features[rows], dtype=np.float32))


def cache_meta(model) -> dict:
    """What must match for cached features to be reused."""
    config = model.config
    return {"backbone": config.backbone, "image_size": config.image_size, "crop_pct": config.crop_pct,
            "feature_dim": config.image_feature_dim}


@torch.no_grad()
def extract_features(model, image_paths: dict[int, Path], folder: str | Path, batch_size: int = 64,
                     progress: bool = True) -> FeatureCache:
    """Fill (or complete) the cache in `folder` with features of every image in `image_paths`."""
    from .images import open_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(model)
    image_ids = sorted(image_paths)
    features_path, index_path, meta_path = folder / FEATURES_FILE, folder / INDEX_FILE, folder / META_FILE
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise DataError(f"feature cache {folder} was made with {old}, not {meta}: use another folder")
        index = {int(k): v for k, v in json.loads(index_path.read_text()).items()} if index_path.is_file() else {}
        features = np.load(features_path, mmap_mode="r+")
        if any(i not in index for i in image_ids) and len(index) + len(image_ids) > features.shape[0]:
            new_ids = [i for i in image_ids if i not in index]
            grown = np.lib.format.open_memmap(str(features_path) + ".tmp", mode="w+", dtype=np.float16,
                                              shape=(len(index) + len(new_ids), meta["feature_dim"]))
            grown[: features.shape[0]] = features
            grown.flush()
            del features, grown
            os.replace(str(features_path) + ".tmp", features_path)
            features = np.load(features_path, mmap_mode="r+")
    else:
        index = {}
        features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float16,
                                             shape=(len(image_ids), meta["feature_dim"]))
        _atomic_write_text(meta_path, json.dumps(meta))
    todo = [i for i in image_ids if i not in index]
    transform = model.image_transform()
    encoder = model.image_encoder
    was_training = encoder.training
    encoder.eval()
    next_row = len(index)
    for start in tqdm(range(0, len(todo), batch_size), desc="extracting features", disable=not progress):
        chunk = todo[start : start + batch_size]
        pixels = torch.stack([transform(open_image(image_paths[i])) for i in chunk])
        out = encoder.features(pixels.to(model.device)).float().cpu().numpy()
        features[next_row : next_row + len(chunk)] = out.astype(np.float16)
        features.flush()
        for offset, image_id in enumerate(chunk):
            index[image_id] = next_row + offset
        next_row += len(chunk)
        # The index is written after the rows it names: a killed run loses at most one batch.
        _atomic_write_text(index_path, json.dumps(index))
    if not index_path.is_file():
        _atomic_write_text(index_path, json.dumps(index))
    encoder.train(was_training)
    del features
    return FeatureCache(folder)
