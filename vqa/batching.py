"""Torch batching over records: the image sources, the question dataset, its collator and sampler,
and the one bad-image policy (screen_images)."""

import random
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from .answers import answer_scores
from .errors import DataError, InputError
from .images import input_position, open_image, probe_image
from .programs import hop_sets, question_targets, referred_sets
from .records import VQASplit, read_scenes_file
from .text import QuestionTokenizer, pad_questions


def unique_rows(keys) -> tuple[list, torch.Tensor]:
    """Each distinct key once, in first-seen order, and the row of each item's key (B,).

    The one batch builder: over the image ids of a batch of questions, each image then goes
    through the CNN once; over question ids (or pixel tensors, ...) it does the same for them.
    """
    rows: dict = {}
    index = [rows.setdefault(key, len(rows)) for key in keys]
    return list(rows), torch.tensor(index, dtype=torch.long)


def screen_images(split: VQASplit, skip_bad_images: bool = False) -> VQASplit:
    """The one bad-image policy, used alike by training, evaluation and feature extraction.

    Every image of the split is checked before any work starts: it must have a file and its
    header must open within the size limits (cheap: no decoding), so that hours of training
    are never lost to a broken file found late. Without `skip_bad_images` the first bad image
    raises DataError naming the file; with it, every image is also decoded in full (a truncated
    file passes the header check), bad ones are dropped with their questions, and listed in
    the returned split's `skipped` as {"image_id", "path", "error", "question_ids"}.
    """
    check = open_image if skip_bad_images else probe_image
    bad: dict[int, str] = {}
    for image_id in split.image_ids:
        path = split.image_paths.get(image_id)
        if path is None:
            where = f" in {split.image_dir}" if split.image_dir is not None else ""
            bad[image_id] = f"no image file for image_id {image_id}{where}"
            if not skip_bad_images:
                break
            continue
        try:
            check(path)
        except InputError as error:
            bad[image_id] = str(error)
            if not skip_bad_images:
                break
    if not bad:
        return split
    if not skip_bad_images:
        raise DataError(f"{split.name}: {next(iter(bad.values()))} (--skip-bad-images skips such images)")
    kept = split.subset([i for i in split.image_ids if i not in bad], split.name)
    if not kept.records:
        raise DataError(f"{split.name}: every image is unreadable (first: {next(iter(bad.values()))})")
    questions: dict[int, list[int]] = {}
    for record in split.records:
        if record["image_id"] in bad:
            questions.setdefault(record["image_id"], []).append(record["question_id"])
    kept.skipped = [{"image_id": i, "path": str(split.image_paths[i]) if i in split.image_paths else None,
                     "error": error, "question_ids": questions[i]} for i, error in bad.items()]
    return kept


def require_scene_graphs(split: VQASplit) -> None:
    if split.scenes_file is None:
        raise DataError(f"{split.name}: attention supervision needs the scene graphs of the images "
                        "(a CLEVR-format scenes file): give it with --train-scene-graphs, or set "
                        "--attention-supervision-weight 0")


def attention_points(split: VQASplit, records: list[dict], hops: int,
                     input_size: tuple[int, ...]) -> list[list[list[tuple[float, float]]] | None]:
    """Per record, for each attention hop, the (x, y) centres (0..1 of the model's input) of the
    objects its program looks at there (`programs.hop_sets`); None for a record without a
    program that runs on its scene. Scenes come from the split's CLEVR-format `scenes_file`,
    matched to images by file name (`image_filename`), objects placed by `pixel_coords`."""
    require_scene_graphs(split)
    by_file = {s.get("image_filename"): s for s in read_scenes_file(split.scenes_file) if isinstance(s, dict)}
    sizes: dict[int, tuple[int, int]] = {}
    points = []
    for record in records:
        path = split.image_paths.get(record["image_id"])
        scene = by_file.get(path.name) if path is not None else None
        program = record.get("program")
        looked = referred_sets(program, scene) if scene is not None and isinstance(program, list) else None
        if looked is None:
            points.append(None)
            continue
        if record["image_id"] not in sizes:
            sizes[record["image_id"]] = probe_image(path)
        size, objects = sizes[record["image_id"]], scene["objects"]
        points.append([[input_position(*objects[i]["pixel_coords"][:2], size, input_size) for i in sorted(s)]
                       for s in hop_sets(looked, hops)])
    return points


class ImageSource:
    """Gives each image of a batch once: as pixels (the model's transform) or as cached features."""

    def __init__(self, image_paths: dict[int, Path], transform=None, feature_cache=None):
        self.image_paths = image_paths
        self.transform = transform
        self.feature_cache = feature_cache

    def pixels(self, image_id: int) -> torch.Tensor:
        try:
            return self.transform(open_image(self.image_paths[image_id]))
        except InputError as error:  # screen_images checked headers; a file broken further in ends here
            raise DataError(f"{error} (--skip-bad-images decodes every image first and skips such images)") from error

    def batch(self, image_ids: list[int]) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None:
            return {"image_features": self.feature_cache.get(image_ids)}
        return {"pixel_values": torch.stack([self.pixels(i) for i in image_ids])}


class QuestionDataset(Dataset):
    """One item per question: its piece ids, its image id, its soft answer scores and, for a
    model with side targets (`VQAConfig.side_targets`), the indices of those it names; with
    `attention` = (hops, model input size), the objects each hop should find (`attention_points`)."""

    def __init__(self, split: VQASplit, tokenizer: QuestionTokenizer, answer_index: dict[str, int], max_tokens: int,
                 side_targets: list[str] | None = None, attention: tuple[int, tuple] | None = None):
        self.split = split
        self.records = sorted(split.records, key=lambda r: (r["image_id"], r["question_id"]))
        self.num_answers = len(answer_index)
        self.input_ids = [tokenizer.encode(r["question"], max_tokens) for r in self.records]
        self.scores = [answer_scores(r["answers"], answer_index) if "answers" in r else None for r in self.records]
        self.side = None
        if side_targets:
            index = {t: i for i, t in enumerate(side_targets)}
            self.side = [[index[t] for t in question_targets(r) if t in index] for r in self.records]
        self.points = attention_points(split, self.records, *attention) if attention else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "image_id": self.records[i]["image_id"], "scores": self.scores[i]}
        if self.side is not None:
            item["side"] = self.side[i]
        if self.points is not None:
            item["points"] = self.points[i]
        return item


class VQACollator:
    """Pads the questions and loads each distinct image of the batch once."""

    def __init__(self, images: ImageSource, num_answers: int, num_side_targets: int = 0):
        self.images = images
        self.num_answers = num_answers
        self.num_side_targets = num_side_targets

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, lengths = pad_questions([it["input_ids"] for it in items])
        unique, image_index = unique_rows([it["image_id"] for it in items])
        batch = {"input_ids": input_ids, "lengths": lengths, "image_index": image_index, **self.images.batch(unique)}
        if items[0]["scores"] is not None:
            labels = torch.zeros(len(items), self.num_answers)
            for r, it in enumerate(items):
                for answer, score in it["scores"].items():
                    labels[r, answer] = score
            batch["labels"] = labels
        if self.num_side_targets and "side" in items[0]:
            side = torch.zeros(len(items), self.num_side_targets)
            for r, it in enumerate(items):
                side[r, it["side"]] = 1.0
            batch["side_labels"] = side
        if "points" in items[0]:
            batch.update(_points_batch([it["points"] for it in items]))
        return batch


def _points_batch(points: list) -> dict[str, torch.Tensor]:
    """`attention_points` (B, hops, P, 2), NaN padded, and `attention_known` (B,) of a batch."""
    known = [p is not None for p in points]
    hops = next((len(p) for p in points if p is not None), 1)
    most = max([len(objects) for p in points if p is not None for objects in p] + [1])
    tensor = torch.full((len(points), hops, most, 2), float("nan"))
    for r, p in enumerate(points):
        for k, objects in enumerate(p or ()):
            if objects:
                tensor[r, k, :len(objects)] = torch.tensor(objects)
    return {"attention_points": tensor, "attention_known": torch.tensor(known)}


class ImageGroupedSampler(Sampler[int]):
    """Shuffles images, then yields each image's questions together.

    Consecutive questions share images, so a batch runs the CNN on far fewer images
    than it has questions. The order depends only on (seed, epoch): every torchrun
    process draws the same order and takes its own share of the batches.
    """

    def __init__(self, dataset: QuestionDataset, seed: int = 0, drop_tail: int | None = None):
        self.seed = seed
        self.epoch = 0
        # With drop_tail=B, an epoch yields a multiple of B questions: the partial last batch,
        # which may hold a single image (BatchNorm cannot train on that), is left out.
        self.drop_tail = drop_tail
        groups: dict[int, list[int]] = {}
        for i, record in enumerate(dataset.records):
            groups.setdefault(record["image_id"], []).append(i)
        self.groups = list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        total = sum(len(g) for g in self.groups)
        return total - total % self.drop_tail if self.drop_tail else total

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.groups)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        # Not every wrapper forwards set_epoch (accelerate's shard under DDP does not):
        # counting passes keeps each epoch's order new and the same on every process.
        self.epoch += 1
        indices = [i for g in order for i in self.groups[g]]
        yield from indices[: len(self)]
