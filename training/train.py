"""Train or fine-tune a VQA model.

    # the shipped easy-VQA checkpoint (about 10 minutes on a 2-core CPU)
    python training/train.py --dataset easy-vqa --output-dir checkpoints/easy-vqa \\
        --backbone resnet10t --image-size 64 --crop-pct 1.0 --embed-dim 64 --lstm-hidden 128 \\
        --common-dim 512 --classifier-hidden 512 --dropout 0 --epochs 8 \\
        --learning-rate 2e-3 --backbone-learning-rate 5e-4 --save-half

    # VQA v2-layout files, on all GPUs of a machine
    torchrun --nproc-per-node 4 training/train.py --dataset files \\
        --train-questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --train-annotations v2_mscoco_train2014_annotations.json --train-images train2014/ \\
        --backbone resnet152 --pretrained --freeze-backbone --output-dir checkpoints/vqa2

    # fine-tune a trained model on new data (keeps its tokenizer, adds new answers)
    python training/train.py --init-from checkpoints/easy-vqa --dataset files ...

    # continue an interrupted run from its last saved epoch
    python training/train.py ... --resume
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqa.errors import VQAError  # noqa: E402
from vqa.training import TrainingInterrupted, TrainOptions, train  # noqa: E402


def parse_args(argv=None) -> TrainOptions:
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainOptions):
        if f.name in ("command", "pretrained", "freeze_backbone", "resume", "skip_bad_images", "save_half"):
            continue
        default = getattr(defaults, f.name)
        # The field's annotation says the type: "int", "float | None", "str | None", ...
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    parser.add_argument("--pretrained", nargs="?", const=True, default=False,
                        help="ImageNet weights: from the local timm/Hugging Face cache, or the given .safetensors file")
    parser.add_argument("--freeze-backbone", action="store_true", help="keep the CNN fixed and cache its features")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this output dir")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="drop unreadable images and their questions (they are listed) instead of failing")
    parser.add_argument("--save-half", action="store_true", help="store the final weights in float16")
    args = parser.parse_args(argv)
    return TrainOptions(**vars(args))


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        train(options)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(str(stopped), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
