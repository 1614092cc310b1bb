"""Download VQA v2 (questions, answers) and the COCO images into the layout docs/vqa-v2.md reads.

    # everything: train, val and test-dev (COCO's image zips alone are 13 + 6 + 12 GB, as much again unpacked)
    python training/download_vqa_v2.py --root data

    # only the validation split, from a mirror that serves the official paths
    python training/download_vqa_v2.py --root data --splits val --mirror http://mirror.local:8000

Run the same command again after any interruption: a partial archive resumes where it stopped
(ROOT/.partial/NAME.part), verified archives are not fetched again (their sha256 is in
ROOT/MANIFEST.json), and unpacked ones are skipped. ROOT then holds the JSON files and the image
folders train2014/, val2014/, test2015/; the archives are kept next to them.
"""

import argparse
import sys

from vqa.download import SPLITS, fetch
from vqa.errors import VQAError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder for the archives and their unpacked files")
    parser.add_argument("--splits", default=",".join(SPLITS),
                        help=f"comma-separated splits among {', '.join(SPLITS)} (default: all)")
    parser.add_argument("--mirror", help="replace the scheme and host of every official URL by this one "
                                         "(the paths stay), e.g. http://mirror.local:8000")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in args.splits if s not in SPLITS]
    if unknown or not args.splits:
        parser.error(f"--splits: unknown split {unknown[0]!r}" if unknown else "--splits names no split")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        fetch(args.root, args.splits, mirror=args.mirror, progress=not args.no_progress)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stopped:
        print(str(stopped) or "interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
