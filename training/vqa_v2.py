"""VQA v2 in one command: download -> feature cache -> train -> evaluate val -> test-dev results file.

    # on a GPU: the recipe of docs/vqa-v2.md (ResNet-152's ImageNet weights from the local timm cache)
    python training/vqa_v2.py --root data --out checkpoints/vqa-v2 --backbone resnet152 --pretrained

    # every GPU of a machine: each process extracts a share of the images and trains on a share of
    # each batch (--batch-size is per process: 8 x 64 = the recipe's 512); the main process
    # downloads and evaluates while the others wait
    torchrun --nproc-per-node 8 training/vqa_v2.py --root data --out checkpoints/vqa-v2 \\
        --backbone resnet152 --pretrained --batch-size 64

    # the same, from a mirror of the official URLs, without progress bars (for a log file)
    python training/vqa_v2.py --root data --mirror http://mirror.local:8000 --no-progress ...

Run the same command again after any interruption: each step is skipped when its output is
complete, and an unfinished one continues where it stopped (the download resumes its archive,
the feature cache keeps its rows, training resumes from its last epoch). Each step prints
`step N/5 NAME: what it does`, then `done in X s` or `skipped: OUTPUT is complete`.

Writes ROOT/ (the official files, 31 GB of COCO archives plus as much unpacked), OUT.features/
(train, val, test-dev caches), OUT/ (the checkpoint and its card), OUT.trainer/ (Trainer
checkpoints, logs), OUT/eval-val/ (metrics.json, report.md) and OUT/results-test-dev/
vqa_OpenEnded_mscoco_test-dev2015_ALG_results.json, the file to upload to the VQA challenge's
Test-Dev phase on EvalAI. docs/vqa-v2.md gives the disk space and time each step takes.
Exit status 2 with "error: ..." for a mistake in the data or the settings.
"""

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from vqa.config import TrainOptions, cli_dataclass, model_options, option
from vqa.pipeline import RECIPE, PipelineOptions, run_pipeline
from vqa.trainer import exit_status

# TrainOptions the pipeline sets itself (the data is VQA v2's, the run resumes by itself).
SET_BY_PIPELINE = ("output_dir", "dataset", "train_scenes", "train_questions", "train_annotations", "train_images",
                   "hf_path", "hf_split", "hf_test_split", "test_questions", "test_annotations", "test_images",
                   "init_from", "resume")


def with_defaults(specs, defaults: dict) -> list:
    """Copies of dataclass fields, with the defaults given here."""
    copies = []
    for spec in specs:
        spec = copy.copy(spec)
        spec.default = defaults.get(spec.name, spec.default)
        copies.append(spec)
    return copies


@dataclass
class PipelineFlags:
    root: str = field(metadata={"help": "folder for VQA v2's archives and their unpacked files (created)"})
    out: str = option("checkpoints/vqa-v2", "checkpoint folder; OUT.features, OUT.trainer are its siblings, "
                                            "OUT/eval-val and OUT/results-test-dev are inside it")
    mirror: str | None = option(None, "download from this host instead (http://host:port), the paths staying "
                                      "the official ones")
    fine_tune_backbone: bool = option(False, "train the CNN too: no feature cache, far slower (the recipe keeps "
                                             "it frozen, as the paper did)")
    algorithm: str = option("lstm-cnn", "the ALG in the results file's name, "
                                        "vqa_OpenEnded_mscoco_test-dev2015_ALG_results.json")
    no_progress: bool = option(False, "no progress bars")


TrainFlags = cli_dataclass("TrainFlags", with_defaults(
    [f for f in dataclasses.fields(TrainOptions) if f.name not in SET_BY_PIPELINE], RECIPE))
ModelFlags = cli_dataclass("ModelFlags", [f for f in model_options() if f.name != "freeze_backbone"])


def parse_args(argv=None) -> PipelineOptions:
    parser = HfArgumentParser((PipelineFlags, TrainFlags, ModelFlags), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    flags, training, model = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return PipelineOptions(
        root=flags.root, out=flags.out, mirror=flags.mirror, progress=not flags.no_progress,
        algorithm=flags.algorithm, training=TrainOptions(**dataclasses.asdict(training)),
        model={**dataclasses.asdict(model), "freeze_backbone": not flags.fine_tune_backbone},
        command=["training/vqa_v2.py", *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        return exit_status(lambda: run_pipeline(options))
    except KeyboardInterrupt as stopped:  # Ctrl-C: the download says where its partial file is kept
        print(str(stopped) or "interrupted: run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
