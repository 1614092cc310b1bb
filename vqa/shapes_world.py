"""The shapes world: a procedural 2D CLEVR, drawn with PIL, written in the VQA v2 layout.

CLEVR (Johnson et al. 2017, https://cs.stanford.edu/people/jcjohns/clevr/) renders 3D
scenes of 3-10 objects with a shape, one of 8 colours, a size and a material, stores each
scene as a graph, and asks questions made of functional programs over the graph. This is
its flat twin: shapes circle, square, triangle, diamond; CLEVR's 8 colours and RGB values;
sizes small and large; material "solid" (filled) or "outline" (a thick outline with the
background inside). Objects never overlap, and as CLEVR's renderer does (its `margin`),
every two centres differ by at least `relation_margin` along x and along y, so "left of",
"right of", "above" and "below" always have a clear answer: object j is left of object i
when x_j <= x_i - margin (image y grows downwards: "above" is a smaller y).

Questions and their programs are `vqa.shapes_questions`. The files are the VQA v2 layout
(`vqa.data.load_vqa_split` reads them) plus CLEVR-style scene graphs:

    OUT/shapes_world_{split}_questions.json, ..._annotations.json, ..._scenes.json
    OUT/{split}/shapes_{split}_{image_id:07d}.png

Every pixel and question follows from (seed, split, sizes): each scene has its own RNG, and
the answer balance restarts every `CHUNK_SCENES` scenes, so the number of worker processes
changes nothing, and the first N scenes of a larger split are the N-scene split.
"""

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .answers import HUMAN_ANSWERS
from .errors import DataError, InputError
from .files import temporary_name
from .programs import program_nodes
from .shapes_questions import (ALSO_ACCEPTED, ATTRIBUTES, RELATIONS, QuestionGenerator, suggest_questions,
                               true_answer)

# The whole API here, question functions included, so that callers need one import.
__all__ = ["WorldConfig", "random_scene", "render_scene", "object_mask", "compute_relationships", "scene_to_rows",
           "scene_from_rows", "suggest_questions", "true_answer", "generate_scenes", "write_split",
           "split_files", "builtin_scene_files", "shapes_world_folder", "load_shapes_world", "cache_root", "COLORS", "SPLITS"]

GENERATOR_VERSION = 3  # part of the cache key: bump when a change alters the generated data
# Image ids are unique across the splits (train 0.., val 1,000,000.., test 2,000,000..), so that a
# run may read several splits' images through one index, as training does with train and val.
SPLIT_ID_BASE = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLITS = ("train", "val", "test")
CHUNK_SCENES = 100  # scenes per work unit; the answer balance restarts at each chunk
# CLEVR's own RGB values (clevr-dataset-gen, image_generation/data/properties.json).
COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
          "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
BACKGROUND = (216, 214, 208)  # light warm gray; each scene shifts each channel by up to BACKGROUND_JITTER
BACKGROUND_JITTER = 10
NOISE = 3.0  # std of the per-pixel luminance noise, in 0-255 levels
OBJECT_GAP = 0.015  # empty space between two objects' circles, fraction of the image side (2 px at 128)
OUTLINE = 0.22  # stroke of an "outline" object, fraction of its radius
SUPERSAMPLE = 2  # draw at 2x and average down: smooth edges without per-shape antialiasing
PLACE_ATTEMPTS = 200  # positions tried per object before the scene's layout starts over
LAYOUT_RESTARTS = 2000  # layouts tried before the sizes are declared impossible
ROW_FIELDS = ("shape", "color", "size", "material", "x", "y")
assert set(COLORS) == set(ATTRIBUTES["color"])

if TYPE_CHECKING:
    from .data import VQASplit


@dataclass(frozen=True)
class WorldConfig:
    """The world's sizes and the built-in splits. Lengths are fractions of image_size."""

    image_size: int = 128  # side of the square images, in pixels
    min_objects: int = 3  # objects per scene: uniform in [min_objects, max_objects], as CLEVR
    max_objects: int = 10  # at most 10: count answers are "0".."10"
    small_radius: float = 0.07  # radius of a small object (9 px at 128)
    large_radius: float = 0.11  # a large one (14 px); at 15 px crowded 10-object layouts took up to 3 s to place
    relation_margin: float = 0.045  # least x and y distance of any two centres (6 px; CLEVR: 0.4 on a 6-unit floor)
    questions_per_scene: int = 10  # the five families in turn: 2 of each
    seed: int = 0  # base seed; each split derives its own from it and the split name
    train_scenes: int = 6000  # scenes (images) of load_shapes_world("train")
    val_scenes: int = 600  # ... of "val"
    test_scenes: int = 1000  # ... of "test"

    def __post_init__(self):
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be 32..4096 pixels, not {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 10, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.small_radius < self.large_radius < 0.25:
            raise ValueError(f"need 0 < small_radius < large_radius < 0.25, "
                             f"got {self.small_radius}, {self.large_radius}")
        if self.radius("small") < 3:
            raise ValueError(f"small objects would be {self.radius('small')} px: raise image_size or small_radius")
        if not 1 <= self.questions_per_scene < 1000:
            raise ValueError(f"questions_per_scene must be 1..999, not {self.questions_per_scene}")

    def radius(self, size: str) -> int:
        return round((self.small_radius if size == "small" else self.large_radius) * self.image_size)

    @property
    def margin_px(self) -> int:
        return max(1, round(self.relation_margin * self.image_size))

    @property
    def scene_params(self) -> dict:
        """The fields that shape scenes (not the split sizes)."""
        return {k: getattr(self, k) for k in ("image_size", "min_objects", "max_objects", "small_radius",
                                               "large_radius", "relation_margin")}


# ------------------------------------------------------------------------------ scenes
def compute_relationships(objects: list[dict], margin: int) -> dict:
    """CLEVR's relationships: rel[i] = the objects that are `rel` of object i.

    A pair whose centres are closer than `margin` along an axis is in neither list of it.
    """
    def where(i, relation):
        xi, yi = objects[i]["pixel_coords"]
        test = {"left": lambda x, y: x <= xi - margin, "right": lambda x, y: x >= xi + margin,
                "above": lambda x, y: y <= yi - margin, "below": lambda x, y: y >= yi + margin}[relation]
        return [j for j, o in enumerate(objects) if test(*o["pixel_coords"])]

    return {relation: [where(i, relation) for i in range(len(objects))] for relation in RELATIONS}


def _layout(rng: random.Random, radii: list[int], config: WorldConfig) -> list[tuple[int, int]] | None:
    """Centres for circles of these radii: inside the image, apart, and margin-separated in x and y."""
    side, margin, gap = config.image_size, config.margin_px, round(OBJECT_GAP * config.image_size)
    placed = []
    for r in radii:
        for _ in range(PLACE_ATTEMPTS):
            x, y = rng.randint(r + 1, side - 2 - r), rng.randint(r + 1, side - 2 - r)
            if all(abs(x - px) >= margin and abs(y - py) >= margin
                   and (x - px) ** 2 + (y - py) ** 2 >= (r + pr + gap) ** 2 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def random_scene(seed, config: WorldConfig | None = None) -> dict:
    """A random scene graph; `seed` (int or str) fixes it entirely."""
    config = config or WorldConfig()
    rng = random.Random(f"shapes-world/{seed}")
    n = rng.randint(config.min_objects, config.max_objects)
    objects = [{kind: rng.choice(values) for kind, values in ATTRIBUTES.items()} for _ in range(n)]
    # Large objects first: the layout then rarely has to start over.
    order = sorted(range(n), key=lambda i: objects[i]["size"] != "large")
    for _ in range(LAYOUT_RESTARTS):
        centres = _layout(rng, [config.radius(objects[i]["size"]) for i in order], config)
        if centres is not None:
            break
    else:
        raise DataError(f"cannot place {n} objects in a {config.image_size}-pixel image with these radii and "
                        "margins: use a larger image_size, smaller radii or fewer max_objects")
    for i, (x, y) in zip(order, centres):
        objects[i] = {**objects[i], "pixel_coords": [x, y], "radius": config.radius(objects[i]["size"])}
    background = [c + rng.randint(-BACKGROUND_JITTER, BACKGROUND_JITTER) for c in BACKGROUND]
    return {"image_index": 0, "image_filename": "", "objects": objects,
            "relationships": compute_relationships(objects, config.margin_px),
            "background": background, "noise_seed": rng.getrandbits(32)}


# ----------------------------------------------------------------------------- drawing
_DIAMOND_WIDTH = 0.62  # half-width of a diamond over its half-height: no mistaking it for a square
_INRADIUS = {"circle": 1.0, "square": math.sqrt(0.5), "triangle": 0.5,
             "diamond": _DIAMOND_WIDTH / math.hypot(1, _DIAMOND_WIDTH)}  # centre-to-side, per unit radius


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """A shape whose farthest point is r from (cx, cy): it never leaves its circle."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    h, w = math.sqrt(0.5) * r, _DIAMOND_WIDTH * r
    points = {"square": [(-h, -h), (h, -h), (h, h), (-h, h)],
              "triangle": [(0, -r), (r * math.sqrt(0.75), r / 2), (-r * math.sqrt(0.75), r / 2)],
              "diamond": [(0, -r), (w, 0), (0, r), (-w, 0)]}[shape]
    draw.polygon([(cx + px, cy + py) for px, py in points], fill=fill)


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: int, color, background) -> None:
    x, y = obj["pixel_coords"]
    cx, cy, r = (x + 0.5) * scale, (y + 0.5) * scale, obj["radius"] * scale
    _draw_shape(draw, obj["shape"], cx, cy, r, color)
    if obj["material"] == "outline":
        # The same shape shrunk about its centre: a band of even width OUTLINE * r on every side.
        inradius = _INRADIUS[obj["shape"]] * r
        stroke = max(OUTLINE * r, scale)
        _draw_shape(draw, obj["shape"], cx, cy, r * (inradius - stroke) / inradius, background)


def render_scene(scene: dict, config: WorldConfig | None = None) -> Image.Image:
    """The scene as an RGB image of config.image_size pixels; the same scene gives the same pixels."""
    side = (config or WorldConfig()).image_size
    background = tuple(scene.get("background", BACKGROUND))
    image = Image.new("RGB", (side * SUPERSAMPLE, side * SUPERSAMPLE), background)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _draw_object(draw, obj, SUPERSAMPLE, COLORS[obj["color"]], background)
    image = np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.int16)
    rng = np.random.default_rng(scene.get("noise_seed", 0))
    noise = np.rint(rng.standard_normal((side, side, 1), dtype=np.float32) * NOISE).astype(np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def object_mask(obj: dict, image_size: int) -> np.ndarray:
    """(image_size, image_size) bool: the pixels the object touches when rendered."""
    mask = Image.new("L", (image_size * SUPERSAMPLE,) * 2, 0)
    _draw_shape(ImageDraw.Draw(mask), obj["shape"], (obj["pixel_coords"][0] + 0.5) * SUPERSAMPLE,
                (obj["pixel_coords"][1] + 0.5) * SUPERSAMPLE, obj["radius"] * SUPERSAMPLE, 255)
    return np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX)) > 0


# -------------------------------------------------------------------------------- rows
def scene_to_rows(scene: dict) -> list[list]:
    """The scene as a table, one row per object: shape, color, size, material, x, y."""
    return [[o["shape"], o["color"], o["size"], o["material"], *o["pixel_coords"]] for o in scene["objects"]]


def _blank(cell) -> bool:
    if isinstance(cell, float):
        return math.isnan(cell)  # pandas' empty cell
    return cell is None or (isinstance(cell, str) and not cell.strip())


def _whole_number(value, where: str) -> int:
    shown = value.strip() if isinstance(value, str) else value  # the cell as typed, in messages
    if _blank(value):
        raise InputError(f"{where} is empty: give a whole number of pixels")
    if isinstance(value, str):
        try:
            value = float(shown)
        except ValueError:
            raise InputError(f"{where} is {shown!r}, not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} is {shown!r}, expected a whole number of pixels")
    if not math.isfinite(value):  # int() of them raises OverflowError ("inf") or ValueError ("nan")
        raise InputError(f"{where} is {shown!r}, not a finite number")
    if value != int(value):
        raise InputError(f"{where} is {shown!r}, expected a whole number of pixels")
    return int(value)


def _object_from_row(row, number: int, config: WorldConfig) -> dict:
    if not isinstance(row, (list, tuple)) or len(row) != len(ROW_FIELDS):
        raise InputError(f"row {number}: expected {len(ROW_FIELDS)} fields ({', '.join(ROW_FIELDS)}), got {row!r}")
    obj = {}
    for kind, value in zip(ROW_FIELDS[:4], row):
        text = str(value).strip().lower() if value is not None else ""
        text = ALSO_ACCEPTED.get(text, text)  # the spellings questions accept: "grey", "cube", ...
        if text not in ATTRIBUTES[kind]:
            raise InputError(f"row {number}: {kind} {value!r} is not one of {', '.join(ATTRIBUTES[kind])}")
        obj[kind] = text
    radius = config.radius(obj["size"])
    coords = []
    for axis, value in zip("xy", row[4:]):
        c = _whole_number(value, f"row {number}: {axis}")
        if not radius <= c <= config.image_size - 1 - radius:
            raise InputError(f"row {number}: {axis} = {c} puts the {obj['size']} object (radius {radius} px) outside "
                             f"the {config.image_size}-pixel image: use {radius}..{config.image_size - 1 - radius}")
        coords.append(c)
    return {**obj, "pixel_coords": coords, "radius": radius}


def scene_from_rows(rows, config: WorldConfig | None = None) -> dict:
    """A scene from a table of rows (shape, color, size, material, x, y), as `scene_to_rows` gives.

    rows: lists, or a pandas DataFrame or numpy array of them. Text is case-insensitive and
    takes the spellings questions take ("grey", "cube"); x, y are pixel centres (finite
    numbers or numeric text). Rows left wholly empty are skipped.
    Raises InputError naming the row (1-based) and field at fault, or the two rows whose
    objects overlap. Pairs closer than the relation margin are allowed: relation questions
    about them have no answer (`true_answer` gives None).
    """
    config = config or WorldConfig()
    if hasattr(rows, "to_numpy"):  # a pandas DataFrame (what gr.Dataframe gives by default)
        rows = rows.to_numpy()
    if hasattr(rows, "tolist"):  # numpy: plain Python numbers
        rows = rows.tolist()
    rows = [row for row in rows if not (isinstance(row, (list, tuple)) and all(map(_blank, row)))]
    if not 1 <= len(rows) <= config.max_objects:
        raise InputError(f"a scene holds 1 to {config.max_objects} objects; these rows give {len(rows)}")
    objects = [_object_from_row(row, n, config) for n, row in enumerate(rows, start=1)]
    for i, a in enumerate(objects):
        for j in range(i + 1, len(objects)):
            b = objects[j]
            distance = math.dist(a["pixel_coords"], b["pixel_coords"])
            if distance < a["radius"] + b["radius"] + 1:
                raise InputError(f"rows {i + 1} and {j + 1} overlap: their centres are {distance:.1f} px apart, "
                                 f"they need {a['radius'] + b['radius'] + 1}")
    return {"image_index": 0, "image_filename": "", "objects": objects,
            "relationships": compute_relationships(objects, config.margin_px),
            "background": list(BACKGROUND), "noise_seed": 0}


# ------------------------------------------------------------------------------- files
def split_files(out_dir: str | Path, split: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"questions": out_dir / f"shapes_world_{split}_questions.json",
            "annotations": out_dir / f"shapes_world_{split}_annotations.json",
            "scenes": out_dir / f"shapes_world_{split}_scenes.json",
            "images": out_dir / split}


def generate_scenes(split: str, seed: int, start: int, stop: int,
                    config: WorldConfig) -> list[tuple[dict, list[dict]]]:
    """Scenes start..stop-1 of a split, each with its questions (see `QuestionGenerator.questions`).

    Call it on whole chunks (start a multiple of CHUNK_SCENES) to get what `write_split` writes.
    """
    questions = QuestionGenerator(f"shapes-world/{seed}/{split}/questions/{start}")
    out = []
    for index in range(start, stop):
        scene = random_scene(f"{seed}/{split}/{index}", config)
        image_id = SPLIT_ID_BASE.get(split, 0) + index
        scene.update(image_index=image_id, image_filename=f"shapes_{split}_{image_id:07d}.png", split=split)
        out.append((scene, questions.questions(scene, config.questions_per_scene)))
    return out


def _make_chunk(job: tuple) -> list[tuple[dict, list[dict]]]:
    """One work unit of `write_split`: a chunk of scenes, their questions, their PNG files."""
    image_dir, split, seed, config, start, stop = job
    chunk = generate_scenes(split, seed, start, stop, config)
    for scene, questions in chunk:
        # compress_level 1: a third of the time of the default 6, files 5% larger (the noise does not compress).
        render_scene(scene, config).save(Path(image_dir) / scene["image_filename"], compress_level=1)
        for q in questions:
            q["program"] = program_nodes(q["program"])  # CLEVR's node list, as the annotations store it
    return chunk


@functools.lru_cache(maxsize=None)
def _human_answers(answer: str) -> list[dict]:
    # One list per answer, shared by its annotations: 1M small dicts for 10k scenes otherwise.
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(HUMAN_ANSWERS)]


def _annotation(question_id: int, image_id: int, q: dict) -> dict:
    return {"question_id": question_id, "image_id": image_id, "question_type": q["family"],
            "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
            "answers": _human_answers(q["answer"]), "relation": q["relation"], "template": q["template"],
            "program": q["program"]}


# Bytes a scene takes on disk, measured on 100-scene splits (write_split, seed 0): the PNGs take
# 1.18 bytes per pixel at 64 px, 1.06 at 128, 1.01 at 224 (the noise barely compresses), each
# rounded up to 4 KiB blocks; the JSON files 1.1 KB per scene plus 1.42 KB per question.
PNG_BYTES_PER_PIXEL = 1.2
DISK_BLOCK = 4096
SCENE_JSON_BYTES = 1200
QUESTION_JSON_BYTES = 1500


def estimated_bytes(num_scenes: int, config: WorldConfig) -> int:
    """What `write_split` will write for num_scenes scenes, rounded up (see PNG_BYTES_PER_PIXEL)."""
    png = math.ceil(PNG_BYTES_PER_PIXEL * config.image_size ** 2 / DISK_BLOCK) * DISK_BLOCK
    return num_scenes * (png + SCENE_JSON_BYTES + QUESTION_JSON_BYTES * config.questions_per_scene)


def _size_text(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


def _check_output(out_dir: Path, num_scenes: int, config: WorldConfig) -> None:
    """DataError, before anything is written, when out_dir cannot be a folder or the disk is too small."""
    if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 1:
        raise DataError(f"num_scenes must be a whole number of at least 1, not {num_scenes!r}")
    existing = out_dir
    while not existing.exists():  # the nearest folder there is: disk_usage needs one
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"cannot write to {out_dir}: {existing} is a file, not a folder")
    needed, free = estimated_bytes(num_scenes, config), shutil.disk_usage(existing).free
    if needed > free:
        raise DataError(f"{num_scenes} scenes of {config.image_size} px with {config.questions_per_scene} "
                        f"questions each need about {_size_text(needed)}, but {existing} has "
                        f"{_size_text(free)} free: write fewer scenes or elsewhere")


def _move_into(source: Path, target: Path) -> None:
    """source's entries into the folder target, each replacing its namesake: sub-folders first, files
    last, so that the JSON files, which say a split is there, come after the images they list. A
    missing target is one rename."""
    if not target.exists():
        source.rename(target)
        return
    for entry in sorted(source.iterdir(), key=lambda p: not p.is_dir()):
        if entry.is_dir():
            _move_into(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)


@contextlib.contextmanager
def _staged(final: Path):
    """A new temporary folder to write into, moved into `final` (see `_move_into`) when the block
    ends without error and removed whatever happens: an error or Ctrl-C never leaves half a split.

    It is made inside `final` when that exists (a mount point's parent is another disk, where
    renames fail), else beside it."""
    final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = (final if final.is_dir() else final.parent) / temporary_name(final).name
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        _move_into(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_split(out_dir: str | Path, split: str, num_scenes: int, seed: int = 0, questions_per_scene: int = 10,
                progress: bool = True, workers: int | None = None, **params) -> dict[str, Path]:
    """Generate a split into out_dir in the VQA v2 layout (see the module docstring); return its paths.

    params: WorldConfig's scene fields (image_size, min_objects, max_objects, small_radius,
    large_radius, relation_margin). workers: processes (default: the CPUs this process may
    use); the output does not depend on it. Question ids are image_id * 1000 + k.
    The files are written in a temporary folder, then moved into out_dir (other splits there
    stay); DataError first when out_dir cannot be a folder or the disk is too small.
    """
    config = WorldConfig(questions_per_scene=questions_per_scene, seed=seed, **params)
    out_dir = Path(out_dir)
    _check_output(out_dir, num_scenes, config)
    with _staged(out_dir) as temporary:
        _write_split(temporary, split, num_scenes, config, progress, workers)
    return split_files(out_dir, split)


def _write_split(out_dir: Path, split: str, num_scenes: int, config: WorldConfig, progress: bool,
                 workers: int | None) -> None:
    seed, questions_per_scene = config.seed, config.questions_per_scene
    paths = split_files(out_dir, split)
    paths["images"].mkdir(parents=True, exist_ok=True)
    jobs = [(paths["images"], split, seed, config, start, min(start + CHUNK_SCENES, num_scenes))
            for start in range(0, num_scenes, CHUNK_SCENES)]
    workers = min(workers or len(os.sched_getaffinity(0)), len(jobs))
    scenes, questions, annotations = [], [], []
    # A Pool's exit terminates its workers: an error or Ctrl-C anywhere stops them all.
    with (tqdm(total=num_scenes, unit="scene", desc=f"shapes world {split}", disable=not progress) as bar,
          multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool):
        for chunk in (pool.imap(_make_chunk, jobs) if pool else map(_make_chunk, jobs)):
            for scene, asked in chunk:
                image_id = scene["image_index"]
                scenes.append(scene)
                for k, q in enumerate(asked):
                    question_id = image_id * 1000 + k  # as VQA v2's ids
                    questions.append({"image_id": image_id, "question": q["question"], "question_id": question_id})
                    annotations.append(_annotation(question_id, image_id, q))
            bar.update(len(chunk))
    info = {"dataset": "shapes-world", "split": split, "version": GENERATOR_VERSION, "seed": seed,
            "num_scenes": num_scenes, "questions_per_scene": questions_per_scene, **config.scene_params}
    common = {"info": info, "data_type": "shapes-world", "data_subtype": split}
    _write_json(paths["questions"], {**common, "task_type": "Open-Ended", "questions": questions})
    _write_json(paths["annotations"], {**common, "annotations": annotations})
    _write_json(paths["scenes"], {"info": info, "scenes": scenes})


def _write_json(path: Path, data) -> None:
    # json.dumps runs all in C; json.dump to a file goes through Python chunks, 3x slower.
    path.write_text(json.dumps(data, separators=(",", ":")))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """cache_dir, else $VQA_CACHE_DIR/shapes-world, else ~/.cache/vqa-demo/shapes-world."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("VQA_CACHE_DIR", "~/.cache/vqa-demo")).expanduser() / "shapes-world"


def builtin_scene_files(split: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(scenes JSON, image folder) of a built-in split, generated first if needed."""
    files = split_files(shapes_world_folder(split, cache_dir, progress=False), split)
    return files["scenes"], files["images"]


MANIFEST = "manifest.json"  # every file of a cached split with its sha256, written last


def _checksums(folder: Path) -> dict[str, str]:
    """{path relative to folder: sha256} of every file but the manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    out = {}
    for path in files:
        with path.open("rb") as f:
            out[path.relative_to(folder).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _cache_problem(folder: Path) -> str | None:
    """What is wrong with a cached split (a file missing, added or changed), or None. Hashing the
    6,000 training images takes about 0.3 s."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    actual = _checksums(folder)
    for name, digest in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} has changed"
    extra = sorted(set(actual) - set(expected))
    return f"{extra[0]} does not belong to it" if extra else None


def shapes_world_folder(split: str, cache_dir: str | Path | None = None, progress: bool = True, **params) -> Path:
    """The cache folder of a built-in split, generated on first use (see `load_shapes_world`)."""
    if split not in SPLITS:
        raise DataError(f"the shapes world has splits {', '.join(SPLITS)}, not {split!r}")
    unknown = set(params) - {f.name for f in fields(WorldConfig)}
    if unknown:
        raise DataError(f"unknown shapes-world parameter(s) {', '.join(sorted(unknown))}: "
                        f"use {', '.join(f.name for f in fields(WorldConfig))}")
    config = WorldConfig(**params)
    num_scenes = getattr(config, f"{split}_scenes")
    key_fields = {"version": GENERATOR_VERSION, "split": split, "num_scenes": num_scenes, "seed": config.seed,
                  "questions_per_scene": config.questions_per_scene, **config.scene_params}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_root(cache_dir)
    folder = root / f"{split}-{key}"
    if folder.is_dir():
        problem = _cache_problem(folder)
        if problem is not None:  # a cache: regenerated, never a reason to stop
            print(f"shapes world: the cached {split} split in {folder} is damaged ({problem}): regenerating it",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    if not folder.is_dir():
        # Another process finishing the same folder first is fine: its files are these, byte for byte.
        with _staged(folder) as temporary:
            write_split(temporary, split, num_scenes, config.seed, config.questions_per_scene, progress=progress,
                        **config.scene_params)
            (temporary / "config.json").write_text(json.dumps({**asdict(config), **key_fields}, indent=1))
            (temporary / MANIFEST).write_text(json.dumps(_checksums(temporary), indent=0))
    return folder


def load_shapes_world(split: str, cache_dir: str | Path | None = None, progress: bool = True, **params) -> "VQASplit":
    """A split of the built-in shapes world, generated on first use and cached.

    params: any WorldConfig field (sizes of the world and of the splits). The cache folder
    is CACHE/{split}-{hash of the parameters}; it is written under a temporary name and
    renamed into place, so an interrupted run never leaves half a dataset behind. Its manifest
    holds every file's checksum: a folder that no longer matches it (a file deleted, truncated
    or edited) is regenerated, with one line on stderr.
    """
    folder = shapes_world_folder(split, cache_dir, progress, **params)
    # Here, not at the top: vqa.data imports torch and torchvision (4 s, 800 MB), which
    # generating a world, in this process or in its workers, does not need.
    from .data import load_vqa_split

    files = split_files(folder, split)
    return load_vqa_split(files["questions"], files["annotations"], files["images"], name=f"shapes-world-{split}")
