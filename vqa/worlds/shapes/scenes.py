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

Questions and their programs are `templates` and `questions`. The files are the VQA v2 layout
(`vqa.records.load_vqa_split` reads them) plus CLEVR-style scene graphs:

    OUT/shapes_world_{split}_questions.json, ..._annotations.json, ..._scenes.json
    OUT/{split}/shapes_{split}_{image_id:07d}.png

Every pixel and question follows from (seed, split, sizes): each scene has its own RNG, and
the answer balance restarts every `CHUNK_SCENES` scenes, so the number of worker processes
changes nothing, and the first N scenes of a larger split are the N-scene split.
"""

import math
import random
from dataclasses import dataclass

from ...errors import DataError, InputError
from .templates import ALSO_ACCEPTED, ATTRIBUTES, RELATIONS

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


