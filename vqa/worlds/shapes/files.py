"""The shapes world on disk: a split written in the VQA v2 layout plus scene graphs, and the cache
of the built-in splits (a manifest of checksums; a damaged folder is regenerated)."""

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

from tqdm.auto import tqdm

from ...answers import HUMAN_ANSWERS
from ...errors import DataError
from ...files import cache_home, temporary_name
from ...programs import program_nodes
from .questions import QuestionGenerator
from .render import render_scene
from .scenes import CHUNK_SCENES, GENERATOR_VERSION, SPLIT_ID_BASE, SPLITS, WorldConfig, random_scene


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
    return cache_home() / "shapes-world"


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

