"""Run a frozen timm backbone over an image folder once and cache its pooled features.

The cache (vqa/features.py) is what `training/train.py --freeze-backbone --feature-cache DIR`
reads from DIR/train: pass the same --backbone, --pretrained/--weights, --image-size and
--crop-pct to both. A killed run is resumed by running the same command again.

    # one process
    python training/extract_features.py --backbone resnet152 --pretrained \\
        --images train2014/ --out features/train

    # every GPU of a machine (or CPU processes); each process extracts a share, rank 0 merges
    torchrun --nproc-per-node 8 training/extract_features.py --backbone resnet152 --pretrained \\
        --images val2014/ --out features/val

    # several machines: the same command on each, the --out folder on a shared filesystem
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \\
        training/extract_features.py ...

    # only the images of a question file, with weights from a file
    python training/extract_features.py --backbone resnet152 --weights resnet152.safetensors \\
        --images test2015/ --questions v2_OpenEnded_mscoco_test-dev2015_questions.json --out features/test-dev
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqa.config import VQAConfig  # noqa: E402
from vqa.data import index_image_folder, load_vqa_split  # noqa: E402
from vqa.errors import DataError, VQAError  # noqa: E402
from vqa.features import extract_features  # noqa: E402
from vqa.model import VQAModel  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="timm model name, e.g. resnet152")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="ImageNet weights from the local timm / Hugging Face cache (nothing is downloaded)")
    weights.add_argument("--weights", metavar="FILE", help="backbone weights from a .safetensors file")
    parser.add_argument("--images", required=True, help="image folder (files named ..._<image id>.jpg)")
    parser.add_argument("--questions", help="VQA questions JSON: extract only the images it asks about")
    parser.add_argument("--out", required=True, help="cache folder (created, or completed if it exists)")
    parser.add_argument("--image-size", type=int, default=None, help="input side; default: the backbone's")
    parser.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction; default: the backbone's")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass and process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding processes per process; default: up to 8 per GPU, none on a CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def image_paths(args) -> dict[int, Path]:
    if args.questions:
        return load_vqa_split(args.questions, None, args.images).image_paths
    paths = index_image_folder(args.images)
    if not paths:
        raise DataError(f"no images (.jpg, .jpeg, .png ending in an image id) in {args.images}")
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        paths = image_paths(args)
        torch.manual_seed(0)  # random weights (no --pretrained) are then the same in every process and run
        config = VQAConfig(backbone=args.backbone, image_size=args.image_size, crop_pct=args.crop_pct,
                           freeze_backbone=True)
        model = VQAModel(config, pretrained_backbone=args.weights or args.pretrained)
        started = time.time()
        cache = extract_features(model, paths, args.out, batch_size=args.batch_size,
                                 progress=not args.no_progress, num_workers=args.num_workers)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"{args.out}: features of {len(cache)} images ({len(paths)} asked for), "
              f"{cache.feature_dim}-d {args.backbone}, {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
