"""The feature cache: a frozen backbone's features on disk, computed once, read memory-mapped.

A cache folder holds:
- `features.npy`: float16 (rows, *feature_shape), memory-mapped. feature_shape is (F,) for
  the pooled model and (F, h, w), the CNN's spatial map, for the attention model. It may
  hold more rows than images (space reserved by an extraction still under way).
- `index.json`: image_id -> row, rewritten after each batch of rows it names.
- `meta.json`: what made the features (`cache_meta`); `check_compatible` compares it.
- `shards/rank-K/`: while several processes extract, each one's own folder of this layout,
  merged into the folder by `merge_shards`.

Sizes: a pooled ResNet-152 row is 2048 x 2 bytes = 4 KiB, 339 MB for VQA v2's 82,783
train2014 images. A 448 px ResNet-152 map row is 2048 x 14 x 14 x 2 bytes = 784 KiB: 66.5 GB
for train2014, 99 GB with val2014. `FeatureCache` never loads the array: `get` copies the
rows asked for out of the memmap, so the page cache streams the file and a cache larger
than memory is read at disk speed.

`vqa/extraction.py` fills a cache; training and evaluation read one once
`check_compatible` has accepted it.
"""

import hashlib
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .files import atomic_path, atomic_write_text
from .model import evaluating

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
# Meta fields that decide the feature values; the others are recorded for people. The number
# of glimpses is not one: every attention model reads the same map, and pooled features
# (shape [F]) are told from maps ([F, h, w]) by feature_shape.
MATCHING_FIELDS = ("backbone", "transform", "weights", "output_stride", "feature_shape")
_COPY_BYTES = 256 * 2**20  # copied at a time when a cache grows or shards merge: 8192 pooled rows, 326 map rows


def _copy_rows(array: np.ndarray) -> int:
    return max(1, _COPY_BYTES // (int(np.prod(array.shape[1:])) * array.itemsize or 1))


def read_index(folder: str | Path) -> dict[int, int]:
    """image_id -> row of the cache (or shard) in `folder`; {} when it has none yet."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def read_meta(folder: str | Path) -> dict | None:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class FeatureCache:
    """Read side of a cache folder: `cache.get(image_ids)` -> (N, *feature_shape) float32 tensor.

    `skipped` lists the images an extraction skipped as unreadable ({"image_id", "path",
    "error"}); it is filled only on the cache `extract_features` returns.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for name in (FEATURES_FILE, INDEX_FILE, META_FILE):
            if not (self.folder / name).is_file():
                raise DataError(f"feature cache {self.folder} is incomplete: {name} is missing")
        self.meta = read_meta(self.folder)
        self.index = read_index(self.folder)
        ids = np.fromiter(self.index.keys(), dtype=np.int64, count=len(self.index))
        rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        order = np.argsort(ids)
        self._sorted_ids, self._sorted_rows = ids[order], rows[order]
        self.features = np.load(self.folder / FEATURES_FILE, mmap_mode="r")  # (rows, *feature_shape) float16
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.index

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.features.shape[1:]

    @property
    def feature_dim(self) -> int:
        """F, the channels: the pooled size, or the depth of each map location."""
        return self.features.shape[1]

    def rows(self, image_ids) -> np.ndarray:
        """Row of each image id, found by binary search over the sorted ids (no Python loop)."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._sorted_ids, ids).clip(max=max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(len(ids), dtype=bool)
        if not found.all():
            raise DataError(f"feature cache {self.folder} has no features for image {int(ids[~found][0])}")
        return self._sorted_rows[pos]

    def get(self, image_ids) -> torch.Tensor:
        """(len(image_ids), *feature_shape) float32 features, in the order asked (repeats allowed)."""
        rows = self.rows(image_ids)
        # Each distinct row is read once, in increasing order: the memmap pages are
        # then touched front to back, which the page cache and read-ahead serve best.
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.features[unique]  # (U, *feature_shape) float16, a copy
        return torch.from_numpy(block[inverse.reshape(-1)].astype(np.float32))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: features of other weights are other features.

    Floating-point tensors are hashed rounded to float16, the cache's own precision, so
    that a checkpoint stored in half precision still matches the features its float32
    weights made. Reads every weight (0.2 GB, 2.3 s for ResNet-152): `cache_meta` calls it
    once per model and weights.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _weights_version(module: torch.nn.Module) -> tuple | None:
    """A cheap stand-in for the weights' values: every in-place change (an optimizer step,
    load_state_dict, `+=`) bumps a tensor's version counter, and a replaced tensor has
    another address. None for inference-mode tensors, which keep no version counter."""
    try:
        return tuple((name, t.data_ptr(), t._version, t.dtype, t.device)
                     for name, t in module.state_dict(keep_vars=True).items())
    except RuntimeError:
        return None


def _memoised(memo: "weakref.WeakKeyDictionary", owner, key, compute):
    """compute(), or its value from the last call for `owner` if `key` is the same (a key of None
    never matches: it means the weights cannot be told unchanged)."""
    known = memo.get(owner)
    if key is None or known is None or known[0] != key:
        known = memo[owner] = (key, compute())
    return known[1]


# Weak: an entry goes with its model. backbone -> (weights version, digest); model -> (key, shape).
_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SHAPES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _feature_shape(model, transform) -> list[int]:
    """What model.image_features gives per image at this preprocessing: one blank image through it."""
    blank = transform(Image.new("RGB", (64, 64)))[None]  # (1, 3, H, W)
    with evaluating(model), torch.inference_mode():
        return list(model.image_features(blank.to(model.device, model.dtype)).shape[1:])


def cache_meta(model) -> dict:
    """What makes `model`'s features; MATCHING_FIELDS must agree for a cache to be reused.

    The weights are hashed once per model and weights (2.3 s for ResNet-152 on one 2-core CPU;
    checking that they are unchanged takes 3 ms), and the feature shape is found once per
    preprocessing: training, evaluation and extraction each ask.
    """
    config = model.config
    backbone = model.image_encoder.backbone
    transform = model.image_transform()
    # The preprocessing as the model resolves it (resize, letterbox, interpolation, mean,
    # std): an explicit --image-size equal to the backbone's default still matches.
    described = " ".join(repr(transform).split())
    version = _weights_version(backbone)
    digest = _memoised(_DIGESTS, backbone, version, lambda: weights_digest(backbone))
    shape_key = None if version is None else (version, described, config.output_stride, config.attention_glimpses)
    shape = _memoised(_SHAPES, model, shape_key, lambda: _feature_shape(model, transform))
    return {"backbone": config.backbone, "image_size": config.image_size, "transform": described,
            "weights": digest, "output_stride": config.output_stride,
            "attention_glimpses": config.attention_glimpses, "feature_shape": list(shape)}


def mismatch(cache: "FeatureCache | str | Path", meta: dict) -> str | None:
    """Why the cache (or the cache folder) was not made as `meta` says, or None when it was.
    A folder with no meta.json yet fits any meta."""
    if isinstance(cache, FeatureCache):
        folder, there = cache.folder, cache.meta
    else:
        folder, there = Path(cache), read_meta(cache)
    if there is None:
        return None
    changed = [k for k in MATCHING_FIELDS if there.get(k) != meta.get(k)]
    if not changed:
        return None
    details = "; ".join(f"{k}: {there.get(k)!r} there, {meta.get(k)!r} now" for k in changed)
    why = f"feature cache {folder} was made with another {', '.join(changed)} than this model's ({details})"
    if len(there.get("feature_shape") or ()) != len(meta.get("feature_shape") or ()):
        kinds = ["pooled features" if len(m.get("feature_shape") or ()) == 1 else "spatial maps" for m in (there, meta)]
        why += f": it holds {kinds[0]}, this model reads {kinds[1]} (attention_glimpses > 0 reads maps)"
    return why


def check_compatible(cache: "FeatureCache | str | Path", model) -> None:
    """Raise DataError naming the fields that differ unless the cache holds `model`'s features."""
    why = mismatch(cache, cache_meta(model))
    if why:
        raise DataError(why)


class CacheWriter:
    """Appends rows to a cache folder; the index names a row only after the row is written.

    `new_rows` rows are reserved up front (the array grows by a copy, so once, not per batch).
    """

    def __init__(self, folder: str | Path, meta: dict, new_rows: int):
        self.folder = folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        why = mismatch(folder, meta)
        if why:
            raise DataError(f"{why}: extract into another folder")
        self.feature_shape = tuple(meta["feature_shape"])
        self.index = read_index(folder)
        self.next_row = max(self.index.values()) + 1 if self.index else 0
        path = folder / FEATURES_FILE
        needed = self.next_row + new_rows
        if not path.is_file():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(needed, *self.feature_shape)).flush()
        elif np.load(path, mmap_mode="r").shape[0] < needed:
            self._grow(path, needed)
        if read_meta(folder) is None:
            atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        self.features = np.load(path, mmap_mode="r+")

    def _grow(self, path: Path, rows: int) -> None:
        old = np.load(path, mmap_mode="r")
        with atomic_path(path) as tmp:
            grown = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, *old.shape[1:]))
            step = _copy_rows(old)
            for start in range(0, self.next_row, step):
                stop = min(start + step, self.next_row)
                grown[start:stop] = old[start:stop]
            grown.flush()
            del grown, old

    def append(self, image_ids: list[int], features: np.ndarray) -> None:
        """Write rows for `image_ids`: features (len(image_ids), *feature_shape), stored as float16."""
        if tuple(features.shape[1:]) != self.feature_shape:
            raise DataError(f"feature cache {self.folder}: rows of shape {list(features.shape[1:])} given, "
                            f"the cache holds {list(self.feature_shape)}")
        stop = self.next_row + len(image_ids)
        self.features[self.next_row : stop] = features
        self.features.flush()
        self.index.update(zip(image_ids, range(self.next_row, stop)))
        self.next_row = stop
        atomic_write_text(self.folder / INDEX_FILE, json.dumps(self.index))

    def close(self) -> None:
        if not (self.folder / INDEX_FILE).is_file():
            atomic_write_text(self.folder / INDEX_FILE, json.dumps(self.index))
        self.features.flush()
        del self.features

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_folder(folder: str | Path, rank: int) -> Path:
    """Where process `rank` of a multi-process extraction writes."""
    return Path(folder) / SHARDS_DIR / f"rank-{rank}"


def shard_folders(folder: str | Path) -> list[Path]:
    shards = Path(folder) / SHARDS_DIR
    return sorted(p for p in shards.glob("rank-*") if p.is_dir()) if shards.is_dir() else []


def merge_shards(folder: str | Path, meta: dict | None = None) -> None:
    """Fold every `shards/rank-K` cache into `folder`, then delete the shards.

    The merged array is written beside the old one and renamed over it; the index is
    written after that, and the shards deleted last. A run killed at any point leaves
    either the old cache plus the shards, or the new cache (plus shards it already holds),
    and merging again completes it.
    """
    folder = Path(folder)
    shards = shard_folders(folder)
    if not shards:
        return
    if meta is None:
        metas = [m for m in map(read_meta, shards) if m is not None]
        if not metas:  # shards made before any row was written
            shutil.rmtree(folder / SHARDS_DIR)
            return
        meta = metas[0]
    for place in (folder, *shards):
        why = mismatch(place, meta)
        if why:
            raise DataError(f"{why}: extract into another folder")
    index = read_index(folder)
    kept = max(index.values()) + 1 if index else 0  # the cache's rows keep their places
    seen, additions = set(index), []  # additions: (shard features, [(image_id, row in shard)])
    for shard in shards:
        items = sorted(read_index(shard).items(), key=lambda kv: kv[1])
        new = [(i, r) for i, r in items if i not in seen]
        seen.update(i for i, _ in new)
        if new:
            additions.append((np.load(shard / FEATURES_FILE, mmap_mode="r"), new))
    if additions:
        _write_merged(folder, meta, index, kept, additions)
    shutil.rmtree(folder / SHARDS_DIR)


def _write_merged(folder: Path, meta: dict, index: dict[int, int], kept: int, additions: list) -> None:
    total = kept + sum(len(new) for _, new in additions)
    with atomic_path(folder / FEATURES_FILE) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, *meta["feature_shape"]))
        step = _copy_rows(merged)
        if kept:
            old = np.load(folder / FEATURES_FILE, mmap_mode="r")
            for start in range(0, kept, step):
                merged[start : min(start + step, kept)] = old[start : min(start + step, kept)]
            del old
        merged_index, row = dict(index), kept
        for features, new in additions:
            for start in range(0, len(new), step):
                part = new[start : start + step]
                merged[row : row + len(part)] = features[np.array([r for _, r in part])]
                merged_index.update((image_id, row + k) for k, (image_id, _) in enumerate(part))
                row += len(part)
        merged.flush()
        del merged
    if read_meta(folder) is None:
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
    atomic_write_text(folder / INDEX_FILE, json.dumps(merged_index))
