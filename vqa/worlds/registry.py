"""The built-in worlds, by name: their splits, how to load one, the colours to draw with, and
whether the app's scene builder serves them. Nothing is downloaded: easy-VQA ships in its PyPI
package and the shapes world is generated on first use (vqa.worlds.shapes)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError
from ..records import VQASplit, load_vqa_split
from . import easy_vqa


@dataclass(frozen=True)
class World:
    name: str
    splits: tuple[str, ...]
    load: Callable[[str, int | None], VQASplit]  # (split, number of scenes or None for the default)
    palette: Callable[[], tuple[str, ...]]  # brush colours for drawing images like the world's
    scene_builder: bool = False  # whether the app's "Build a scene" tab generates and edits its scenes


def load_shapes_world(split: str, cache_dir: str | Path | None = None, progress: bool = True, **params) -> VQASplit:
    """A split of the built-in shapes world, generated on first use and cached.

    params: any WorldConfig field (sizes of the world and of the splits). The cache folder
    is CACHE/{split}-{hash of the parameters}; it is written under a temporary name and
    renamed into place, so an interrupted run never leaves half a dataset behind. Its manifest
    holds every file's checksum: a folder that no longer matches it (a file deleted, truncated
    or edited) is regenerated, with one line on stderr.
    """
    from .shapes.files import shapes_world_folder, split_files

    files = split_files(shapes_world_folder(split, cache_dir, progress, **params), split)
    return load_vqa_split(files["questions"], files["annotations"], files["images"], name=f"shapes-world-{split}",
                          scenes_file=files["scenes"])


def _easy_vqa(split: str, scenes: int | None) -> VQASplit:
    if scenes is not None:
        raise DataError("easy-vqa has a fixed size: the number of scenes is a shapes-world setting")
    return easy_vqa.load_easy_vqa(split)


def _shapes_world(split: str, scenes: int | None) -> VQASplit:
    return load_shapes_world(split) if scenes is None else load_shapes_world(split, **{f"{split}_scenes": scenes})


def _shapes_palette() -> tuple[str, ...]:
    from .shapes.scenes import COLORS

    return tuple("#%02x%02x%02x" % tuple(rgb) for rgb in COLORS.values())


WORLDS = {
    "easy-vqa": World("easy-vqa", ("train", "test"), _easy_vqa, lambda: easy_vqa.PALETTE),
    "shapes-world": World("shapes-world", ("train", "val", "test"), _shapes_world, _shapes_palette,
                          scene_builder=True),
}
BUILTIN_DATASETS = {name: world.splits for name, world in WORLDS.items()}


def world(name: str) -> World:
    if name not in WORLDS:
        raise DataError(f"unknown dataset {name!r}: the built-in ones are {', '.join(WORLDS)}; "
                        "give VQA v2-layout files otherwise")
    return WORLDS[name]


def load_builtin(name: str, split: str, scenes: int | None = None) -> VQASplit:
    """A built-in dataset (no download): easy-VQA, or the shapes world (generated on first use).
    scenes: the shapes world's number of scenes in this split, when not its default size."""
    chosen = world(name)
    if split not in chosen.splits:
        raise DataError(f"{name} has splits {', '.join(chosen.splits)}, not {split!r}")
    return chosen.load(split, scenes)


def builtin_palette(name: str) -> list[str]:
    """Brush colours for drawing images like those of a built-in dataset (easy-VQA's otherwise)."""
    return list(WORLDS[name].palette() if name in WORLDS else easy_vqa.PALETTE)




def builtin_examples(name: str, count: int) -> list[list[str]]:
    """[image path, question] pairs from a built-in dataset's test split, one per image and
    question type; [] for a dataset that is not built in."""
    if name not in BUILTIN_DATASETS:
        return []
    split = load_builtin(name, "test")
    types = {r.get("question_type") for r in split.records}
    examples, seen_images, seen_types = [], set(), set()
    for record in split.records:
        kind = record.get("question_type")
        if record["image_id"] not in seen_images and kind not in seen_types:
            seen_images.add(record["image_id"])
            seen_types.add(kind)
            examples.append([str(split.image_paths[record["image_id"]]), record["question"]])
            if len(examples) == count:
                break
            if seen_types == types:
                seen_types.clear()  # every type shown once: go round again
    return examples
