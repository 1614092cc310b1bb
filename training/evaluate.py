"""Evaluate a checkpoint with the official VQA metric, or score an existing results file.

    # the built-in easy-VQA test split
    python training/evaluate.py --checkpoint checkpoints/easy-vqa --dataset easy-vqa --split test \\
        --out eval/easy-vqa-test

    # VQA v2 val: questions, annotations, images (a frozen backbone can read its feature cache)
    python training/evaluate.py --checkpoint checkpoints/vqa2 \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --images val2014/ \\
        --feature-cache checkpoints/vqa2.features/test --out eval/vqa2-val

    # test-dev (no annotations): predictions only, results.json for the evaluation server
    python training/evaluate.py --checkpoint checkpoints/vqa2 \\
        --questions v2_OpenEnded_mscoco_test-dev2015_questions.json --images test2015/ --out eval/test-dev

    # score a results file, no model
    python training/evaluate.py --results eval/vqa2-val/results.json \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --out eval/vqa2-val-rescored

Writes into --out: results.json ([{"question_id": int, "answer": str}], the official format),
metrics.json (with annotations: overall, perAnswerType, perQuestionType, perQuestion, in %),
report.md with accuracy_per_answer_type.png, and skipped_images.json when --skip-bad-images
skipped any. Exit status 2 with "error: ..." for bad data, results or checkpoints.
"""

import argparse
import sys

from vqa.errors import VQAError
from vqa.evaluation import DEFAULT_BATCH_SIZE, run_evaluation
from vqa.report import format_summary
from vqa.worlds.registry import BUILTIN_DATASETS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint folder: predict with it")
    parser.add_argument("--results", help="results JSON to score instead of predicting")
    parser.add_argument("--dataset", choices=list(BUILTIN_DATASETS), help="a built-in dataset")
    parser.add_argument("--hf-path", help="VQA v2 parquet: a file, a folder of them, or a Hugging Face dataset "
                                          "name (lmms-lab/VQAv2), converted once into the cache")
    parser.add_argument("--split", default="test",
                        help="split of the built-in dataset (train, val, test; easy-vqa has train and test) "
                             "or of --hf-path (validation, testdev, ...)")
    parser.add_argument("--questions", help="VQA v2-layout questions JSON")
    parser.add_argument("--annotations", help="VQA v2-layout annotations JSON (absent: predict only)")
    parser.add_argument("--images", help="folder of the images (COCO_<subtype>_<id>.jpg or <id>.png)")
    parser.add_argument("--feature-cache", help="feature cache folder, used when the backbone is frozen")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="images per CNN pass (their questions go through the classifier together)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip (and list in OUT/skipped_images.json) images that cannot be read instead of stopping")
    parser.add_argument("--allow-nonstandard-answers", action="store_true",
                        help="accept annotations with other than 10 human answers per question (see vqa/answers.py)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.results is None):
        parser.error("give --checkpoint (to predict) or --results (to score a results file), not both")
    if sum(x is not None for x in (args.dataset, args.questions, args.hf_path)) != 1:
        parser.error("give one of --dataset NAME, --hf-path SOURCE or --questions")
    if args.results is not None and args.questions is not None and args.annotations is None:
        parser.error("scoring --results needs --annotations")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # stderr is for our own messages
    try:
        metrics, _ = run_evaluation(
            args.out, checkpoint=args.checkpoint, results_file=args.results, dataset=args.dataset,
            split=args.split, questions=args.questions, annotations=args.annotations, images=args.images,
            feature_cache=args.feature_cache, batch_size=args.batch_size, skip_bad_images=args.skip_bad_images,
            allow_nonstandard_answers=args.allow_nonstandard_answers, hf_path=args.hf_path,
            log=lambda message: print(message, file=sys.stderr),
        )
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if metrics is not None:
        print(format_summary(metrics, len(metrics["perQuestion"])))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
