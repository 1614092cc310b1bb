"""Evaluation speed on the easy-VQA test split (9,673 questions, 1,000 images), against
the CNN floor: the time the model's backbone needs to encode those images once.

    python benchmarks/bench_evaluate.py                      # the shipped checkpoint (pooled)
    python benchmarks/bench_evaluate.py --checkpoint /path/to/checkpoint --batch-size 256 --repeats 3
    # the attention model: 2 glimpses over resnet10t's 8 x 8 map at 128 px (untrained weights)
    python benchmarks/bench_evaluate.py --attention-glimpses 2 --output-stride 16 --image-size 128 \\
        --backbone resnet10t

Evaluation: predict_split + evaluate_results, as training/evaluate.py runs them (the model
and the split are loaded before the clock starts). Reference, in the same run and with
the same batch size: `model.image_features` of each unique image once, in batches of
--batch-size images, reading and transforming them as the evaluation does (the work of a
feature extraction). Also printed: the same forward alone on pixel tensors already in
memory. Each figure is the fastest of --repeats interleaved runs, so that other load on
the machine weighs on both sides alike, in wall-clock and in CPU seconds (which that load
disturbs less). Goal: ratio <= 1.3.

With --attention-glimpses (or --backbone, --image-size, --output-stride) the model is a new
VQAModel with the checkpoint's tokenizer, answers and head sizes and those image options,
its weights untrained: the timing is what counts, its accuracy means nothing.
"""

import argparse
import sys
import time

import torch

from vqa.batching import ImageSource
from vqa.checkpoint import load_checkpoint
from vqa.config import VQAConfig, model_options
from vqa.evaluation import DEFAULT_BATCH_SIZE, predict_split
from vqa.metrics import evaluate_results
from vqa.model import VQAModel, architecture
from vqa.worlds.easy_vqa import load_easy_vqa

GOAL = 1.3


class Clock:
    """Wall and CPU seconds of a block: CPU time is what other load on the machine disturbs least."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def with_image_options(model: VQAModel, **changes) -> VQAModel:
    """A new, untrained VQAModel: `model`'s options, vocabulary and answers, with `changes`."""
    options = {f.name: getattr(model.config, f.name) for f in model_options()}
    options.update(changes)
    torch.manual_seed(0)
    config = VQAConfig(**options, vocab_size=model.config.vocab_size, id2label=model.config.id2label,
                       label2id=model.config.label2id)
    return VQAModel(config).eval()


def time_evaluation(model, tokenizer, split, batch_size: int) -> tuple[Clock, dict]:
    with Clock() as clock:
        predictions = predict_split(model, tokenizer, split, batch_size, progress=False)
        metrics = evaluate_results(predictions.results, split)
    return clock, metrics


@torch.inference_mode()
def time_backbone(model, split, batch_size: int) -> tuple[Clock, Clock]:
    """(read + transform + model.image_features, model.image_features alone) for each unique image once."""
    images = ImageSource(split.image_paths, model.image_transform())
    image_ids = split.image_ids
    model.eval()
    with Clock() as with_reading:
        for s in range(0, len(image_ids), batch_size):
            model.image_features(images.batch(image_ids[s : s + batch_size])["pixel_values"].to(model.device))
    pixels = [images.batch(image_ids[s : s + batch_size])["pixel_values"].to(model.device)
              for s in range(0, len(image_ids), batch_size)]
    with Clock() as alone:
        for batch in pixels:
            model.image_features(batch)
    return with_reading, alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/easy-vqa")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--attention-glimpses", type=int, default=None,
                        help="an untrained model with this many glimpses of attention over the CNN's map")
    parser.add_argument("--output-stride", type=int, default=None, help="with it: the CNN's output stride (8, 16)")
    parser.add_argument("--image-size", type=int, default=None, help="with it: the model's input side in pixels")
    parser.add_argument("--backbone", default=None, help="with it: the timm backbone (default: the checkpoint's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_checkpoint(args.checkpoint)
    changes = {name: value for name, value in (("attention_glimpses", args.attention_glimpses),
                                               ("output_stride", args.output_stride),
                                               ("image_size", args.image_size), ("backbone", args.backbone))
               if value is not None}
    if changes:
        model = with_image_options(model, **changes)
    split = load_easy_vqa("test")
    config = model.config
    print(f"{'untrained model with ' + args.checkpoint + ' heads' if changes else 'checkpoint ' + args.checkpoint}: "
          f"{architecture(config)}; {config.image_size or 'default'} px, output stride "
          f"{config.output_stride or 'default'}, {len(config.answers)} answers")
    print(f"{split.name}: {len(split.records)} questions, {len(split.image_ids)} images, "
          f"batch size {args.batch_size}, {torch.get_num_threads()} threads")
    time_backbone(model, split.subset(split.image_ids[: args.batch_size], "warm-up"), args.batch_size)

    runs = []
    for repeat in range(args.repeats):
        evaluation, metrics = time_evaluation(model, tokenizer, split, args.batch_size)
        with_reading, alone = time_backbone(model, split, args.batch_size)
        runs.append((evaluation, with_reading, alone))
        print(f"run {repeat + 1}: evaluation {evaluation.wall:.2f} s, CNN with reading {with_reading.wall:.2f} s, "
              f"CNN forward alone {alone.wall:.2f} s (CPU: {evaluation.cpu:.2f}, {with_reading.cpu:.2f}, "
              f"{alone.cpu:.2f} s)")
    print(f"overall accuracy {metrics['overall']:.2f} %" + (" (untrained weights)" if changes else ""))
    for kind in ("wall", "cpu"):
        best_eval, best_ref, best_fwd = (min(getattr(run[i], kind) for run in runs) for i in range(3))
        ratio = best_eval / best_ref
        print(f"{kind:>4}: evaluation {best_eval:.2f} s / CNN encoding the {len(split.image_ids)} images once "
              f"{best_ref:.2f} s = {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}); "
              f"against the forward alone ({best_fwd:.2f} s): {best_eval / best_fwd:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
