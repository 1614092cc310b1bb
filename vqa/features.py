"""On-disk cache of pooled CNN features for a frozen backbone.

A cache folder holds:
- `features.npy`: float16 (rows, F), memory-mapped; may hold more rows than images
  (space reserved for an extraction still under way),
- `index.json`: image_id -> row, rewritten after each batch of rows it names,
- `meta.json`: what made the features (backbone, preprocessing, a digest of the weights).

Each image is run through the CNN once; later epochs, runs and evaluations read rows.
Extraction is resumable: images already in the index are skipped, and a killed run
loses at most the batch in flight. Under torchrun each process extracts its share into
`shards/rank-K/` (a cache folder of the same layout); rank 0 then merges the shards into
the folder. Multi-node runs need the folder on a filesystem that every node sees.
"""

import copy
import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import DataError, InputError
from .images import open_image

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
# Meta fields that decide the feature values; the others are recorded for people.
MATCHING_FIELDS = ("backbone", "feature_dim", "transform", "weights")
_COPY_ROWS = 8192  # rows copied at a time when a cache grows or shards merge


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_index(folder: Path) -> dict[int, int]:
    path = folder / INDEX_FILE
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


class FeatureCache:
    """Read side of a cache folder: `cache.get(image_ids)` -> (N, F) float32 tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        for name in (FEATURES_FILE, INDEX_FILE, META_FILE):
            if not (self.folder / name).is_file():
                raise DataError(f"feature cache {self.folder} is incomplete: {name} is missing")
        self.meta = json.loads((self.folder / META_FILE).read_text())
        self.index = _read_index(self.folder)
        ids = np.fromiter(self.index.keys(), dtype=np.int64, count=len(self.index))
        rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        order = np.argsort(ids)
        self._sorted_ids, self._sorted_rows = ids[order], rows[order]
        self.features = np.load(self.folder / FEATURES_FILE, mmap_mode="r")  # (rows, F) float16

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.index

    @property
    def feature_dim(self) -> int:
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
        """(len(image_ids), F) float32 features, in the order asked (repeats allowed)."""
        rows = self.rows(image_ids)
        # Each distinct row is read once, in increasing order: the memmap pages are
        # then touched front to back, which the page cache and read-ahead serve best.
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.features[unique]  # (U, F) float16, a copy
        return torch.from_numpy(block[inverse].astype(np.float32))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: features of other weights are other features.

    Floating-point tensors are hashed rounded to float16, the cache's own precision, so
    that a checkpoint stored in half precision still matches the features its float32
    weights made.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_meta(model) -> dict:
    """What made the features. MATCHING_FIELDS must agree for a cache to be reused."""
    config = model.config
    return {"backbone": config.backbone, "image_size": config.image_size, "crop_pct": config.crop_pct,
            "feature_dim": config.image_feature_dim,
            # timm's resolved preprocessing (resize, crop, interpolation, mean, std): an
            # explicit --image-size equal to the backbone's default still matches.
            "transform": " ".join(repr(model.image_transform()).split()),
            "weights": weights_digest(model.image_encoder.backbone)}


def _check_meta(folder: Path, meta: dict) -> None:
    path = folder / META_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    changed = [k for k in MATCHING_FIELDS if old.get(k) != meta.get(k)]
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in changed)
        raise DataError(f"feature cache {folder} was made differently ({details}): use another folder")


class _CacheWriter:
    """Appends rows to a cache folder. The index names a row only after the row is written."""

    def __init__(self, folder: Path, meta: dict, new_rows: int):
        folder.mkdir(parents=True, exist_ok=True)
        _check_meta(folder, meta)
        self.folder = folder
        self.index = _read_index(folder)
        self.next_row = max(self.index.values()) + 1 if self.index else 0
        path = folder / FEATURES_FILE
        needed = self.next_row + new_rows
        if not path.is_file():
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(needed, meta["feature_dim"])).flush()
        elif np.load(path, mmap_mode="r").shape[0] < needed:
            self._grow(path, needed)
        if not (folder / META_FILE).is_file():
            _atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        self.features = np.load(path, mmap_mode="r+")

    def _grow(self, path: Path, rows: int) -> None:
        old = np.load(path, mmap_mode="r")
        tmp = path.with_name(path.name + ".tmp")
        grown = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, old.shape[1]))
        for start in range(0, self.next_row, _COPY_ROWS):
            stop = min(start + _COPY_ROWS, self.next_row)
            grown[start:stop] = old[start:stop]
        grown.flush()
        del grown, old
        os.replace(tmp, path)

    def append(self, image_ids: list[int], features: np.ndarray) -> None:
        stop = self.next_row + len(image_ids)
        self.features[self.next_row : stop] = features
        self.features.flush()
        self.index.update(zip(image_ids, range(self.next_row, stop)))
        self.next_row = stop
        _atomic_write_text(self.folder / INDEX_FILE, json.dumps(self.index))

    def close(self) -> None:
        if not (self.folder / INDEX_FILE).is_file():
            _atomic_write_text(self.folder / INDEX_FILE, json.dumps(self.index))
        self.features.flush()
        del self.features


def _shard_folders(folder: Path) -> list[Path]:
    shards = folder / SHARDS_DIR
    return sorted(p for p in shards.glob("rank-*") if p.is_dir()) if shards.is_dir() else []


def merge_shards(folder: Path, meta: dict | None = None) -> None:
    """Fold every `shards/rank-K` cache into `folder`, then delete the shards.

    The merged array is written beside the old one and renamed over it; the index is
    written after that, and the shards deleted last. A run killed at any point leaves
    either the old cache plus the shards, or the new cache (plus shards it already holds),
    and merging again completes it.
    """
    folder = Path(folder)
    shards = _shard_folders(folder)
    if not shards:
        return
    if meta is None:
        metas = [json.loads((s / META_FILE).read_text()) for s in shards if (s / META_FILE).is_file()]
        if not metas:  # shards made before any row was written
            shutil.rmtree(folder / SHARDS_DIR)
            return
        meta = metas[0]
    _check_meta(folder, meta)
    for shard in shards:
        _check_meta(shard, meta)
    index = _read_index(folder)
    kept = max(index.values()) + 1 if index else 0  # the cache's rows keep their places
    seen, additions = set(index), []  # additions: (shard features, [(image_id, row in shard)])
    for shard in shards:
        items = sorted(_read_index(shard).items(), key=lambda kv: kv[1])
        new = [(i, r) for i, r in items if i not in seen]
        seen.update(i for i, _ in new)
        if new:
            additions.append((np.load(shard / FEATURES_FILE, mmap_mode="r"), new))
    if additions:
        tmp = folder / (FEATURES_FILE + ".tmp")
        total = kept + sum(len(new) for _, new in additions)
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, meta["feature_dim"]))
        if kept:
            old = np.load(folder / FEATURES_FILE, mmap_mode="r")
            for start in range(0, kept, _COPY_ROWS):
                merged[start : min(start + _COPY_ROWS, kept)] = old[start : min(start + _COPY_ROWS, kept)]
            del old
        merged_index, row = dict(index), kept
        for features, new in additions:
            for start in range(0, len(new), _COPY_ROWS):
                part = new[start : start + _COPY_ROWS]
                merged[row : row + len(part)] = features[np.array([r for _, r in part])]
                merged_index.update((image_id, row + k) for k, (image_id, _) in enumerate(part))
                row += len(part)
        merged.flush()
        del merged, additions
        os.replace(tmp, folder / FEATURES_FILE)
        if not (folder / META_FILE).is_file():
            _atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        _atomic_write_text(folder / INDEX_FILE, json.dumps(merged_index))
    shutil.rmtree(folder / SHARDS_DIR)


class _ImageFiles(Dataset):
    """Decoded, preprocessed images: what DataLoader workers make while the CNN runs."""

    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return self.transform(open_image(self.paths[i]))
        except InputError as error:
            raise DataError(f"cannot extract features: {error}") from error


def _one_thread_each(batches):
    """Yield from `batches`, making each on one thread. Preprocessing one image at a time
    (uint8 -> float, normalise) gains nothing from intra-op threads and loses ~3 ms per
    image to starting them; DataLoader workers are single-threaded already."""
    iterator = iter(batches)
    threads = torch.get_num_threads()
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


def _run_backbone(model, image_ids: list[int], image_paths: dict[int, Path], writer: _CacheWriter,
                  batch_size: int, num_workers: int, device: torch.device, progress: bool) -> None:
    backbone = model.image_encoder.backbone
    on_cuda = device.type == "cuda"
    if on_cuda:
        # A copy, so the caller's model keeps its device and memory format.
        backbone = copy.deepcopy(backbone).to(device, memory_format=torch.channels_last)
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(_ImageFiles([image_paths[i] for i in image_ids], model.image_transform()),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=on_cuda)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if on_cuda and torch.cuda.is_bf16_supported() else nullcontext())
    batches = tqdm(loader, desc="extracting features", unit="batch", disable=not progress)
    if num_workers == 0:
        batches = _one_thread_each(batches)
    try:
        with torch.inference_mode(), autocast:
            for start, pixels in zip(range(0, len(image_ids), batch_size), batches):
                if on_cuda:
                    pixels = pixels.to(device, non_blocking=True, memory_format=torch.channels_last)
                features = backbone(pixels).float().cpu().numpy()  # (B, F)
                writer.append(image_ids[start : start + batch_size], features.astype(np.float16))
    finally:
        backbone.train(was_training)


def _process_group() -> tuple[int, int]:
    """(rank, world size). Under torchrun the process group is started here if nobody has:
    nccl on GPUs, gloo on CPUs, as the Trainer would start it (it reuses this one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timedelta(hours=1))
    else:
        dist.init_process_group("gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _default_device(model) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return model.device


def default_num_workers(device: torch.device) -> int:
    """Decoding processes. A GPU waits for JPEG decoding: up to 8 per GPU, one core kept for
    the process itself. On a CPU, none: decoding (~4 CPU ms per COCO image) is a tenth of a
    ResNet forward pass and a worker would take its core from the CNN's threads
    (benchmarks/bench_extract.py)."""
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, per_process - 1)


def extract_features(model, image_paths: dict[int, Path], folder: str | Path, batch_size: int = 64,
                     progress: bool = True, num_workers: int | None = None,
                     device: str | torch.device | None = None) -> FeatureCache:
    """Fill (or complete) the cache in `folder` with features of every image in `image_paths`.

    `model` is a VQAModel (its backbone and its timm preprocessing are used). Under torchrun
    every process must call this with the same arguments: each extracts a share of the
    missing images and all of them return the merged cache.
    """
    folder = Path(folder)
    meta = cache_meta(model)
    device = torch.device(device) if device is not None else _default_device(model)
    if num_workers is None:
        num_workers = default_num_workers(device)
    wanted = sorted(image_paths)
    rank, world = _process_group()
    if world == 1:
        if _shard_folders(folder):  # left by an interrupted torchrun extraction
            merge_shards(folder, meta)
        todo = [i for i in wanted if i not in _read_index(folder)]
        writer = _CacheWriter(folder, meta, len(todo))
        try:
            if todo:
                _run_backbone(model, todo, image_paths, writer, batch_size, num_workers, device, progress)
        finally:
            writer.close()
        return FeatureCache(folder)

    import torch.distributed as dist

    _check_meta(folder, meta)
    done = set(_read_index(folder))
    for shard in _shard_folders(folder):
        _check_meta(shard, meta)
        done.update(_read_index(shard))
    _barrier()  # every process has read what is done before any process writes
    todo = [i for i in wanted if i not in done]
    mine = todo[rank::world]
    writer = _CacheWriter(folder / SHARDS_DIR / f"rank-{rank}", meta, len(mine))
    try:
        if mine:
            _run_backbone(model, mine, image_paths, writer, batch_size, num_workers, device,
                          progress and rank == 0)
    finally:
        writer.close()
    _barrier()
    status = [None]
    if rank == 0:
        try:
            merge_shards(folder, meta)
            missing = [i for i in wanted if i not in _read_index(folder)]
            if missing:
                status[0] = (f"feature cache {folder}: {len(missing)} images (first: {missing[0]}) are in no shard; "
                             "under multi-node torchrun the folder must be on a filesystem every node sees")
        except Exception as error:  # tell the other processes instead of leaving them waiting
            status[0] = f"feature cache {folder}: merging the shards failed ({type(error).__name__}: {error})"
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise DataError(status[0])
    return FeatureCache(folder)
