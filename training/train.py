"""Train or fine-tune a VQA model. Every option is described by `--help`.

    # the shipped easy-VQA checkpoint (about 4 minutes on a 2-core CPU)
    python training/train.py --dataset easy-vqa --output-dir checkpoints/easy-vqa \\
        --backbone resnet10t --image-size 64 --embed-dim 64 --lstm-hidden 128 \\
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
import dataclasses
import sys

from transformers import HfArgumentParser

from vqa.config import TrainOptions, cli_dataclass, model_options
from vqa.trainer import exit_status, train

ModelOptions = cli_dataclass("ModelOptions", model_options())
TrainFlags = cli_dataclass("TrainOptions", dataclasses.fields(TrainOptions))


def parse_args(argv=None) -> tuple[TrainOptions, dict]:
    parser = HfArgumentParser((TrainFlags, ModelOptions), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    options, model = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return TrainOptions(**dataclasses.asdict(options)), dataclasses.asdict(model)


def main(argv=None) -> int:
    options, model = parse_args(argv)
    return exit_status(lambda: train(options, model, ["training/train.py", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
