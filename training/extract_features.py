"""Run a frozen timm backbone over an image folder once and cache its features.

Every option is described by `--help`. The cache (vqa/feature_cache.py) is what
`training/train.py --freeze-backbone --feature-cache DIR` reads from DIR/train: give both the
same --backbone, --image-size, --output-stride, --attention-glimpses (0 or not) and weights,
or the cache is refused. A killed run is resumed by running the same command again.

    # one process
    python training/extract_features.py --backbone resnet152 --pretrained \\
        --images train2014/ --out features/train

    # every GPU of a machine (or CPU processes); each process extracts a share, rank 0 merges
    torchrun --nproc-per-node 8 training/extract_features.py --backbone resnet152 --pretrained \\
        --images val2014/ --out features/val

    # several machines: the same command on each, the --out folder on a shared filesystem
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        training/extract_features.py ...

    # only the images of a question file, with weights from a file; unreadable images are
    # skipped and listed in features/test-dev/skipped_images.json
    python training/extract_features.py --backbone resnet152 --backbone-weights resnet152.safetensors \\
        --images test2015/ --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \\
        --out features/test-dev --skip-bad-images

    # spatial maps for the attention model (--attention-glimpses > 0): 14 x 14 at 448 px
    torchrun --nproc-per-node 8 training/extract_features.py --backbone resnet152 --pretrained \\
        --image-size 448 --attention-glimpses 2 --images train2014/ --out features/train-maps

A map cache is large: ResNet-152 at 448 px gives 2048 x 14 x 14 float16 = 784 KiB per image,
66.5 GB for VQA v2's 82,783 train2014 images (99 GB with val2014; --output-stride 16 makes
28 x 28 maps, four times that). Training reads it memory-mapped, never loaded: each batch
copies its rows out of the file and the page cache streams it, so it needs disk space and
read speed, not memory (a local NVMe disk; on a network filesystem reads set the pace).
A pooled cache of the same images is 339 MB.
"""

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from vqa.config import VQAConfig, cli_dataclass, model_options, option
from vqa.errors import DataError, VQAError
from vqa.extraction import extract_features
from vqa.model import VQAModel
from vqa.records import index_image_folder, load_vqa_split

SKIPPED_FILE = "skipped_images.json"
# The model options that change the features; the rest (sizes of the heads) do not.
FEATURE_OPTIONS = ("backbone", "image_size", "output_stride", "attention_glimpses")
ModelOptions = cli_dataclass("ModelOptions", [f for f in model_options() if f.name in FEATURE_OPTIONS])


@dataclass
class ExtractOptions:
    images: str = field(metadata={"help": "image folder (files named ..._<image id>.jpg, .jpeg or .png)"})
    out: str = field(metadata={"help": "cache folder (created, or completed if it exists)"})
    questions: str | None = option(None, "VQA questions JSON: extract only the images it asks about")
    pretrained: bool = option(False, "ImageNet weights from the local timm/Hugging Face cache (nothing is downloaded)")
    backbone_weights: str | None = option(None, "backbone weights from this .safetensors file")
    batch_size: int = option(64, "images per forward pass and process")
    num_workers: int | None = option(None, "decoding processes per process (default: up to 8 per GPU, none on a CPU)")
    skip_bad_images: bool = option(False, f"skip unreadable or missing images and list them in OUT/{SKIPPED_FILE}, "
                                          "instead of stopping at the first")
    no_progress: bool = option(False, "no progress bar")


def parse_args(argv=None) -> tuple[ExtractOptions, dict]:
    parser = HfArgumentParser((ExtractOptions, ModelOptions), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    options, model = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return options, dataclasses.asdict(model)


def image_paths(options: ExtractOptions) -> tuple[dict[int, Path], list[dict]]:
    """(image_id -> file, the images the questions ask about that have no file)."""
    if not options.questions:
        paths = index_image_folder(options.images)
        if not paths:
            raise DataError(f"no images (.jpg, .jpeg, .png ending in an image id) in {options.images}")
        return paths, []
    split = load_vqa_split(options.questions, None, options.images)
    missing = [{"image_id": i, "path": None, "error": f"no image file for image_id {i} in {options.images}"}
               for i in split.image_ids if i not in split.image_paths]
    if missing and not options.skip_bad_images:
        raise DataError(f"{missing[0]['error']} (--skip-bad-images skips such images)")
    return split.image_paths, missing


def main(argv=None) -> int:
    options, model_config = parse_args(argv)
    try:
        paths, missing = image_paths(options)
        torch.manual_seed(0)  # random weights (no --pretrained) are then the same in every process and run
        config = VQAConfig(**model_config, freeze_backbone=True)
        model = VQAModel(config, pretrained_backbone=options.backbone_weights or options.pretrained)
        started = time.time()
        cache = extract_features(model, paths, options.out, batch_size=options.batch_size,
                                 progress=not options.no_progress, num_workers=options.num_workers,
                                 skip_bad_images=options.skip_bad_images)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            PartialState().destroy_process_group()
    if PartialState().is_main_process:
        report(options, cache, missing, len(paths) + len(missing), time.time() - started)
    return 0


def report(options: ExtractOptions, cache, missing: list[dict], asked: int, seconds: float) -> None:
    skipped = sorted(missing + cache.skipped, key=lambda s: s["image_id"])
    listing = Path(options.out) / SKIPPED_FILE
    if options.skip_bad_images:
        listing.write_text(json.dumps(skipped, indent=2))
    else:
        listing.unlink(missing_ok=True)  # from an earlier run: every image was read this time
    shape = "x".join(map(str, cache.feature_shape))
    print(f"{options.out}: features of {len(cache)} images ({asked} asked for), {shape} {cache.meta['backbone']}, "
          f"{seconds:.1f} s")
    if skipped:
        print(f"--skip-bad-images: skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}, "
              f"listed in {listing}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
