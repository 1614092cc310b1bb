"""Feature extraction: every image through the frozen CNN once, into a feature cache.

`extract_features` fills (or completes) a cache folder (vqa/feature_cache.py) with
`model.image_features` of each image: pooled (F,) rows, or (F, h, w) maps for the attention
model. It is resumable: images already in the index are skipped, and a killed run loses at
most the batch in flight.

accelerate's `PartialState` owns the processes. In one process the cache is written
directly. Under torchrun each process extracts its share of the missing images into
`shards/rank-K/`, and after every process is done the main process merges the shards. The
Trainer takes over the same state and process group afterwards (nothing is started twice).
Multi-node runs need the folder on a filesystem that every node sees.

Unreadable images follow the project's policy: without `skip_bad_images` the first one
raises DataError naming the file; with it, it gets no row and is listed in the returned
cache's `skipped`. Images are checked as they are decoded, not before: a run that fails
late keeps what it extracted, and the images are not decoded twice.
"""

import copy
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .errors import DataError, InputError
from .feature_cache import (CacheWriter, FeatureCache, cache_meta, merge_shards, mismatch, read_index, shard_folder,
                            shard_folders)
from .images import open_image
from .model import evaluating

# Rank 0 merges the shards while the others wait: a map cache of VQA v2 (tens of GB) takes
# minutes to copy, well past torch's default 10-minute barrier timeout on gloo.
MERGE_TIMEOUT = timedelta(hours=1)


class _ImageFiles(Dataset):
    """Decoded, preprocessed images: what DataLoader workers make while the CNN runs. An
    unreadable file gives its error instead of pixels; the driver applies the policy."""

    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(open_image(self.paths[i])), None
        except InputError as error:  # open_image's message names the file
            return i, None, str(error)


def _collate(items: list[tuple]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(positions of the readable images, their pixels (B, 3, H, W) or None, [(position, error)])."""
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    bad = [(i, error) for i, _, error in items if error is not None]
    return [i for i, _ in good], torch.stack([p for _, p in good]) if good else None, bad


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


class _Run:
    """One extraction's settings: the model on its device, and how images are read."""

    def __init__(self, model, device: torch.device, batch_size: int, num_workers: int, progress: bool,
                 skip_bad_images: bool):
        self.on_cuda = device.type == "cuda"
        if self.on_cuda or device != model.device:
            # A copy, so the caller's model keeps its device and memory format.
            model = copy.deepcopy(model).to(device)
            if self.on_cuda:
                model = model.to(memory_format=torch.channels_last)
        self.model, self.device = model, device
        self.transform = model.image_transform()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.progress, self.skip_bad_images = progress, skip_bad_images

    def into(self, folder: Path, meta: dict, image_ids: list[int], image_paths: dict) -> list[dict]:
        """Extract `image_ids` into the cache (or shard) in `folder`; the skipped images."""
        with CacheWriter(folder, meta, len(image_ids)) as writer:
            if not image_ids:
                return []
            with evaluating(self.model):
                return self._batches(writer, image_ids, image_paths)

    def _batches(self, writer: CacheWriter, image_ids: list[int], image_paths: dict) -> list[dict]:
        paths = [image_paths[i] for i in image_ids]
        loader = DataLoader(_ImageFiles(paths, self.transform), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.on_cuda)
        batches = tqdm(loader, desc="extracting features", unit="batch", disable=not self.progress)
        if self.num_workers == 0:
            batches = _one_thread_each(batches)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.on_cuda and torch.cuda.is_bf16_supported() else nullcontext())
        skipped = []
        with torch.inference_mode(), autocast:
            for positions, pixels, bad in batches:
                if bad and not self.skip_bad_images:
                    raise DataError(f"cannot extract features: {bad[0][1]} (--skip-bad-images skips such images)")
                skipped += [{"image_id": image_ids[p], "path": str(paths[p]), "error": error} for p, error in bad]
                if pixels is None:
                    continue
                if self.on_cuda:
                    pixels = pixels.to(self.device, non_blocking=True, memory_format=torch.channels_last)
                # (B, F) or (B, F, h, w), rounded to float16 before the copy: half the bytes to move
                features = self.model.image_features(pixels).to(torch.float16).cpu().numpy()
                writer.append([image_ids[p] for p in positions], features)
        return skipped


def _process_state(device: torch.device | None) -> PartialState:
    """accelerate's state of this process. Under torchrun it starts the process group, nccl
    on GPUs and gloo on CPUs; if the Trainer or an Accelerator made it first, theirs is used."""
    cpu = not torch.cuda.is_available() or (device is not None and device.type == "cpu")
    state = PartialState(cpu=cpu, timeout=MERGE_TIMEOUT)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:  # each process would write the whole cache into the same folder
        raise RuntimeError(f"torchrun started {launched} processes but accelerate's state has {state.num_processes}: "
                           "make the PartialState (or TrainingArguments) after torchrun's variables are set, "
                           "with cpu=True on a machine without GPUs")
    return state


def extract_features(model, image_paths: dict[int, Path], folder: str | Path, batch_size: int = 64,
                     progress: bool = True, num_workers: int | None = None,
                     device: str | torch.device | None = None, skip_bad_images: bool = False) -> FeatureCache:
    """Fill (or complete) the cache in `folder` with features of every image in `image_paths`.

    `model` is a VQAModel: `model.image_features` on `model.image_transform()`'s pixels.
    Under torchrun every process must call this with the same arguments: each extracts a
    share of the missing images and all of them return the merged cache. The returned
    cache's `skipped` lists the unreadable images skipped with `skip_bad_images`.
    """
    folder = Path(folder)
    device = torch.device(device) if device is not None else None
    state = _process_state(device)
    device = device or state.device
    meta = cache_meta(model)  # once, passed down: it hashes the backbone's weights
    run = _Run(model, device, batch_size, default_num_workers(device) if num_workers is None else num_workers,
               progress and state.is_main_process, skip_bad_images)
    wanted = sorted(image_paths)
    if state.num_processes == 1:
        if shard_folders(folder):  # left by an interrupted torchrun extraction
            merge_shards(folder, meta)
        done = read_index(folder)
        skipped = run.into(folder, meta, [i for i in wanted if i not in done], image_paths)
    else:
        skipped = _extract_in_shards(state, run, meta, folder, wanted, image_paths)
    cache = FeatureCache(folder)
    cache.skipped = sorted(skipped, key=lambda s: s["image_id"])
    return cache


def _extract_in_shards(state: PartialState, run: _Run, meta: dict, folder: Path, wanted: list[int],
                       image_paths: dict) -> list[dict]:
    """Each process extracts a share into its shard, then the main process merges the shards.
    A failure in any process is raised in all of them, so none waits on the others forever."""
    done = set(read_index(folder))
    for place in (folder, *shard_folders(folder)):
        why = mismatch(place, meta)
        if why:
            raise DataError(f"{why}: extract into another folder")
        done.update(read_index(place))
    state.wait_for_everyone()  # every process has read what is done before any process writes
    todo = [i for i in wanted if i not in done]
    failure = None
    with state.split_between_processes(todo) as mine:
        try:
            skipped = run.into(shard_folder(folder, state.process_index), meta, mine, image_paths)
        except Exception as error:  # reported to every process below, then raised here
            skipped, failure = [], error
    reports = gather_object([(f"{type(failure).__name__}: {failure}" if failure else None, skipped)])
    if failure is not None:
        raise failure
    failed = [message for message, _ in reports if message]
    if failed:
        raise DataError(f"feature extraction failed in another process: {failed[0]}")
    skipped = [s for _, theirs in reports for s in theirs]

    status = [None]
    if state.is_main_process:
        try:
            merge_shards(folder, meta)
            bad = {s["image_id"] for s in skipped}
            missing = [i for i in wanted if i not in read_index(folder) and i not in bad]
            if missing:
                status[0] = (f"feature cache {folder}: {len(missing)} images (first: {missing[0]}) are in no shard; "
                             "under multi-node torchrun the folder must be on a filesystem every node sees")
        except Exception as error:  # tell the other processes instead of leaving them waiting
            status[0] = f"feature cache {folder}: merging the shards failed ({type(error).__name__}: {error})"
    broadcast_object_list(status)
    if status[0] is not None:
        raise DataError(status[0])
    return skipped
