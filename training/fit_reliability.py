"""Fit what a trained checkpoint knows about its limits, into the checkpoint folder.

    # the shipped checkpoints (training does this itself; this is for older checkpoints)
    python training/fit_reliability.py --checkpoint checkpoints/easy-vqa --dataset easy-vqa
    python training/fit_reliability.py --checkpoint checkpoints/mine --dataset files \\
        --train-questions Q.json --train-annotations A.json --train-images images/

Writes ood.safetensors + ood.json (out-of-distribution image detector: Mahalanobis distance
of pooled CNN features, threshold flagging 1 % of held-out images), words.json (the training
questions' words) and `answer_threshold` (confidence for at most 1 % wrong answers on the
validation split) into the checkpoint's model card. The validation split is the one training
held out: the same --val-fraction and the seed recorded in the card.
"""

import argparse
import sys

from vqa.checkpoint import load_checkpoint, read_card, update_card
from vqa.data import BUILTIN_DATASETS, ImageSource
from vqa.errors import VQAError
from vqa.reliability import fit_reliability
from vqa.training import TrainOptions, prepare_data


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder to fit (files are added to it)")
    parser.add_argument("--dataset", required=True, choices=[*BUILTIN_DATASETS, "files"],
                        help="the data the checkpoint was trained on")
    parser.add_argument("--train-questions", help="questions JSON of the training split (--dataset files)")
    parser.add_argument("--train-annotations", help="annotations JSON of the training split (--dataset files)")
    parser.add_argument("--train-images", help="image folder of the training split (--dataset files)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of training images held out for validation, as in training")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: the card's seed, else 0)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer = load_checkpoint(args.checkpoint)
        seed = args.seed if args.seed is not None else read_card(args.checkpoint).get("seed", 0)
        options = TrainOptions(dataset=args.dataset, train_questions=args.train_questions,
                               train_annotations=args.train_annotations, train_images=args.train_images,
                               val_fraction=args.val_fraction, seed=seed)
        train, val, _, _ = prepare_data(options)
        source = ImageSource({**train.image_paths, **val.image_paths}, model.image_transform())
        facts = fit_reliability(model, tokenizer, train, source, val, source, args.checkpoint, seed)
        update_card(args.checkpoint, facts)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
