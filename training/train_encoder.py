"""Stage 1: train a CNN on scene graphs (objects, positions, attributes), before any question.

    # the shapes world's encoder (shared by both shipped shapes-world models)
    python training/train_encoder.py --dataset shapes-world --output-dir checkpoints/shapes-world-encoder \\
        --backbone resnet10t --image-size 128 --output-stride 16 --epochs 6

    # CLEVR-format data: scenes JSON (objects with pixel_coords and attributes) + images
    python training/train_encoder.py --dataset files --train-scenes CLEVR_train_scenes.json \\
        --train-images images/train --val-scenes CLEVR_val_scenes.json --val-images images/val \\
        --backbone resnet18 --image-size 224 --output-stride 16 --output-dir checkpoints/clevr-encoder

Then stage 2: `training/train.py --backbone-weights OUTPUT_DIR/encoder.safetensors --freeze-backbone ...`
with the same --backbone, --image-size and --output-stride.
"""

import argparse
import dataclasses
import sys

from transformers import HfArgumentParser

from vqa.config import cli_dataclass
from vqa.scene_encoder import EncoderOptions, train_scene_encoder
from vqa.trainer import exit_status, run_command


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = cli_dataclass("EncoderOptions", dataclasses.fields(EncoderOptions))
    parser = HfArgumentParser(flags, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (parsed,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    options = EncoderOptions(**dataclasses.asdict(parsed))

    def run():
        facts = train_scene_encoder(options, run_command(["training/train_encoder.py", *argv]))
        print(f"saved {options.output_dir}: held-out accuracy " + ", ".join(f"{k} {v}" for k, v in facts["val_accuracy"].items()))

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
