"""Write a split of the shapes world (a 2D CLEVR, vqa/worlds/shapes/) in the VQA v2 layout.

    # the test split with its default size (1000 scenes, 10 questions each)
    python training/make_shapes_world.py --out data/shapes --split test

    # a small world: 2000 training scenes, then 500 test scenes and the question-only
    # baseline of the test split against those training questions
    python training/make_shapes_world.py --out data/shapes --split train --scenes 2000
    python training/make_shapes_world.py --out data/shapes --split test --scenes 500 --blind-baseline

    # other sizes
    python training/make_shapes_world.py --out data/big --split train --scenes 20000 \\
        --image-size 224 --min-objects 5 --max-objects 10 --questions-per-scene 20 --seed 1

    # the picture of docs/shapes-world.md: one scene and five questions
    python training/make_shapes_world.py --sample docs/shapes-world-sample.png --seed 7

The files read with vqa.records.load_vqa_split(OUT/shapes_world_SPLIT_questions.json,
OUT/shapes_world_SPLIT_annotations.json, OUT/SPLIT). The same --seed and sizes give the
same files, byte for byte; `load_shapes_world(split)` caches exactly what this writes.
"""

import argparse
import sys
import textwrap
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vqa.errors import DataError, VQAError
from vqa.metrics import blind_baseline
from vqa.worlds.shapes import SPLITS, WorldConfig, random_scene, render_scene, split_files, write_split
from vqa.worlds.shapes.questions import suggest_questions

DEFAULTS = WorldConfig()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (JSON files, and images in OUT/SPLIT/)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split name; it is part of the scenes' seeds")
    parser.add_argument("--scenes", type=int, default=None,
                        help="number of scenes (images); default: the built-in split's size "
                             f"({DEFAULTS.train_scenes}/{DEFAULTS.val_scenes}/{DEFAULTS.test_scenes})")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="base seed")
    parser.add_argument("--min-objects", type=int, default=DEFAULTS.min_objects, help="fewest objects per scene")
    parser.add_argument("--max-objects", type=int, default=DEFAULTS.max_objects, help="most objects per scene (<= 10)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS.image_size, help="image side in pixels")
    parser.add_argument("--questions-per-scene", type=int, default=DEFAULTS.questions_per_scene,
                        help="questions per scene, the five families in turn")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes (default: every CPU this process may use); the output does not depend on it")
    parser.add_argument("--blind-baseline", action="store_true",
                        help="then print the question-only accuracy of this split, learnt from OUT's train split")
    parser.add_argument("--sample", metavar="PNG",
                        help="write a picture of one scene (from --seed) and five questions, and nothing else")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.sample and not args.out:
        parser.error("--out is required (or --sample PNG)")
    return args


def sample_picture(seed: int, config: WorldConfig, questions: int = 5, zoom: int = 3) -> Image.Image:
    """A scene, enlarged, with `questions` suggested questions and their answers beside it."""
    scene = random_scene(seed, config)
    side = config.image_size * zoom
    image = render_scene(scene, config).resize((side, side), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=15)
    lines = []
    for n, (question, answer) in enumerate(suggest_questions(scene, questions, seed), start=1):
        lines += textwrap.wrap(f"{n}. {question}", 52) + [f"    -> {answer}", ""]
    sheet = Image.new("RGB", (side + 470, max(side, 20 * len(lines) + 20)), "white")
    sheet.paste(image, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(lines):
        draw.text((side + 16, 12 + 20 * row), line, fill="black", font=font)
    return sheet


def print_baseline(out: Path, split: str) -> None:
    from vqa.records import load_vqa_split  # imports torch: only when asked for

    if not split_files(out, "train")["questions"].is_file():
        raise DataError(f"--blind-baseline learns from the train split in {out}: write it first (--split train)")
    read = {name: load_vqa_split(files["questions"], files["annotations"])
            for name, files in (("train", split_files(out, "train")), (split, split_files(out, split)))}
    result = blind_baseline(read["train"].records, read[split].records)
    print(f"question-only baseline, {split} answered from train "
          f"({result['texts_seen']}% of the {split} questions have a text seen in train):")
    for family, accuracy in result["per_family"].items():
        print(f"  {family:18s} {accuracy:6.2f}")
    print(f"  {'overall':18s} {result['overall']:6.2f}")


def check_counts(args: argparse.Namespace) -> None:
    """DataError naming the flag when a count is below 1 (WorldConfig checks the world's sizes)."""
    for flag in ("scenes", "questions_per_scene", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")


def main(argv=None) -> int:
    args = parse_args(argv)
    params = dict(image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects)
    try:
        check_counts(args)
        if args.sample:
            config = WorldConfig(**params)
            sample_picture(args.seed, config).save(args.sample)
            print(f"wrote {args.sample}")
            return 0
        scenes = args.scenes if args.scenes is not None else getattr(DEFAULTS, f"{args.split}_scenes")
        start = time.perf_counter()
        paths = write_split(args.out, args.split, scenes, args.seed, args.questions_per_scene,
                            progress=not args.no_progress, workers=args.workers, **params)
        print(f"wrote {scenes} scenes to {args.out} in {time.perf_counter() - start:.1f} s: "
              f"{paths['questions'].name}, {paths['annotations'].name}, {paths['scenes'].name}, {args.split}/")
        if args.blind_baseline:
            print_baseline(Path(args.out), args.split)
    except (VQAError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable --out, a full disk: the path, not a traceback
        print(f"error: cannot write to {args.sample or args.out}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
