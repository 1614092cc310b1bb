"""Fit what a trained checkpoint knows about its limits, into the checkpoint folder.

    # the shipped checkpoints (training does this itself; this is for older checkpoints)
    python training/fit_reliability.py --checkpoint checkpoints/easy-vqa --dataset easy-vqa
    python training/fit_reliability.py --checkpoint checkpoints/mine --dataset files \\
        --train-questions Q.json --train-annotations A.json --train-images images/

Writes ood.safetensors + ood.json (out-of-distribution image detector: Mahalanobis distances
of the pooled CNN features and of the input's image statistics, flagged when either is past its
threshold, the two set together to flag at most 1 % of held-out images), words.json (the training
questions' words) and `answer_threshold` (confidence for at most 1 % wrong answers on the
validation split) into the checkpoint's model card. The validation split is the one training
held out: the same --val-fraction and the seed recorded in the card.

The data must be the card's `dataset`: fitted on other data, the detector flags the model's
own test images and the threshold says "not sure" to every answer. --force fits anyway.
The new files are written beside the old ones and renamed over them once all are written.
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields

from transformers import HfArgumentParser

from vqa.batching import ImageSource
from vqa.checkpoint import load_checkpoint, read_card, update_card
from vqa.config import TrainOptions, check_options, cli_dataclass, option
from vqa.errors import OptionError, VQAError
from vqa.reliability.fit import fit_reliability
from vqa.trainer import prepare_data
from vqa.worlds.registry import BUILTIN_DATASETS

_TRAINING = {f.name: f for f in fields(TrainOptions)}


@dataclass
class Options:
    checkpoint: str = option(dataclasses.MISSING, "checkpoint folder to fit (files are added to it)")
    dataset: str = option(dataclasses.MISSING, "easy-vqa, shapes-world or files: the data the checkpoint was "
                          "trained on (its card's `dataset`)", choices=(*BUILTIN_DATASETS, "files"))
    train_questions: str | None = option(None, "questions JSON of the training split (--dataset files)")
    train_annotations: str | None = option(None, "annotations JSON of the training split (--dataset files)")
    train_images: str | None = option(None, "image folder of the training split (--dataset files)")
    # Training's own field, limits included: the split must be the one training held out.
    val_fraction: float = dataclasses.field(default=_TRAINING["val_fraction"].default,
                                            metadata=_TRAINING["val_fraction"].metadata)
    seed: int | None = option(None, "split seed (default: the card's seed, else 0)")
    force: bool = option(False, "fit on data other than the card's dataset")


Flags = cli_dataclass("Options", fields(Options))


def parse_args(argv=None) -> Options:
    parser = HfArgumentParser(Flags, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (flags,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return Options(**dataclasses.asdict(flags))


def check_dataset(options: Options, trained_on: str | None, dataset: str) -> None:
    """OptionError unless `dataset` is the one the card names (or the card names none, or --force)."""
    if trained_on is not None and dataset != trained_on and not options.force:
        raise OptionError(f"checkpoint {options.checkpoint} was trained on {trained_on}, not {dataset}: "
                          "pass --force to fit its reliability files on other data")


def main(argv=None) -> int:
    options = parse_args(argv)
    try:
        check_options(vars(options), fields(Options))
        card = read_card(options.checkpoint)
        if options.dataset != "files":  # a built-in dataset is checked before anything is loaded
            check_dataset(options, card.get("dataset"), options.dataset)
        model, tokenizer = load_checkpoint(options.checkpoint)
        seed = options.seed if options.seed is not None else card.get("seed", 0)
        training = TrainOptions(dataset=options.dataset, train_questions=options.train_questions,
                                train_annotations=options.train_annotations, train_images=options.train_images,
                                val_fraction=options.val_fraction, seed=seed)
        train, val, _, _ = prepare_data(training)
        if options.dataset == "files":  # the card names files by their training part, as training did
            check_dataset(options, card.get("dataset"), train.name)
        source = ImageSource({**train.image_paths, **val.image_paths}, model.image_transform())
        facts = fit_reliability(model, tokenizer, train, source, val, source, options.checkpoint, seed)
        update_card(options.checkpoint, facts)
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{options.checkpoint}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
