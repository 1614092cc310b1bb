"""Out-of-distribution detection of every shipped checkpoint: AUROC against offline OOD sets.

    python benchmarks/bench_ood.py                       # every checkpoint in checkpoints/
    python benchmarks/bench_ood.py --checkpoint checkpoints/shapes-world --per-set 200

For each checkpoint, the in-distribution images are the test split of the dataset it was
trained on (its card's `dataset`); the OOD sets are those of benchmarks/ood_sets.py (uniform
noise, colour gradients, textures, rendered text, the real photos that installed packages
ship, in a tuning part and a held-out part split by file, as varied views and as whole files;
procedural photo-like scenes), the other built-in dataset's test images (easy-VQA against the
shapes-world models and the reverse) and near-world edits of the model's own test images
(rotated, inverted, bordered, zoomed). Each image is scored by the checkpoint's own detector
(ood.safetensors: Mahalanobis distance of the pooled CNN features and, where fitted, of the
input's image statistics; vqa/reliability/ood.py) exactly as the Predictor does.
Reported per (model, set): AUROC (goal >= 0.99) and the share flagged; and the false-alarm
rate on the model's own test images (goal <= 1 %). Writes --out/ood.json and ood.md.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from ood_sets import ALL_SETS, NEAR_WORLD_EDITS, whole_photos
from PIL import Image

from vqa.checkpoint import read_card
from vqa.images import open_image
from vqa.predict import Predictor
from vqa.reliability.rates import auroc
from vqa.worlds.registry import BUILTIN_DATASETS, load_builtin

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def scores_of(predictor: Predictor, images) -> np.ndarray:
    """The detector's score of each image (PIL images or paths), as the Predictor computes it."""
    out = []
    for start in range(0, len(images), 64):
        pixels = torch.stack([predictor.transform(open_image(i)) for i in images[start:start + 64]])
        features = predictor.model.image_features(pixels.to(predictor.device))
        out.append(predictor.density.score_images(predictor.model.pooled_features(features).cpu().numpy(), pixels))
    return np.concatenate(out)


def test_images(dataset: str, limit: int) -> list[Path]:
    split = load_builtin(dataset, "test")
    return [split.image_paths[i] for i in split.image_ids[:limit]]


def measure(folder: Path, per_set: int, in_images: int) -> dict:
    predictor = Predictor.from_checkpoint(folder, device="cpu")
    if predictor.density is None:
        raise SystemExit(f"{folder} has no OOD detector (run training/fit_reliability.py)")
    dataset = read_card(folder)["dataset"]
    side = predictor.transform.input_size[-1]
    inside = scores_of(predictor, test_images(dataset, in_images))
    rows = {"false_alarm_rate": float((inside > predictor.density.threshold).mean()), "test_images": len(inside),
            "sets": {}}
    sets = {name: make(per_set, side) for name, make in ALL_SETS.items() if name != "package_photos"}
    sets["package_photos"] = ALL_SETS["package_photos"](None, side)
    sets["whole_photos_tuning"] = whole_photos("tuning")  # each file at its own aspect, letterboxed
    sets["whole_photos_heldout"] = whole_photos("heldout")
    for other in BUILTIN_DATASETS:
        if other != dataset:  # easy-VQA's images against the shapes-world models, and the reverse
            sets["the other built-in dataset"] = test_images(other, per_set)
    # Near-world edits of the model's own test images (the first per_set of them).
    own = [Image.open(p).convert("RGB") for p in test_images(dataset, per_set)]
    for name, edit in NEAR_WORLD_EDITS.items():
        sets[name] = edit(own)
    for name, images in sets.items():
        outside = scores_of(predictor, images)
        rows["sets"][name] = {"images": len(outside), "auroc": round(auroc(inside, outside), 4),
                              "flagged": round(float((outside > predictor.density.threshold).mean()), 4)}
    return rows


def markdown(table: dict) -> str:
    names = list(next(iter(table.values()))["sets"])
    lines = ["| model | false alarms on its test images | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for model, rows in table.items():
        cells = [f"{rows['sets'][n]['auroc']:.4f} ({100 * rows['sets'][n]['flagged']:.0f} % flagged)" for n in names]
        lines.append(f"| {model} | {100 * rows['false_alarm_rate']:.2f} % of {rows['test_images']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", help="checkpoint folder (default: every shipped one)")
    parser.add_argument("--per-set", type=int, default=200, help="images of each OOD set")
    parser.add_argument("--test-images", type=int, default=1000, help="in-distribution test images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default="ood-report", help="folder for ood.json and ood.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = [Path(c) for c in args.checkpoint] if args.checkpoint else sorted(
        p for p in (ROOT / "checkpoints").iterdir() if (p / "ood.safetensors").is_file())
    table = {folder.name: measure(folder, args.per_set, args.test_images) for folder in folders}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ood.json").write_text(json.dumps(table, indent=2))
    (out / "ood.md").write_text(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
