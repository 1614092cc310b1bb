"""Evaluation speed on the easy-VQA test split (9,673 questions, 1,000 images), against
the time the backbone alone needs to encode those images once.

    python benchmarks/bench_evaluate.py
    python benchmarks/bench_evaluate.py --checkpoint /path/to/checkpoint --batch-size 256 --repeats 3

Evaluation: predict_split + evaluate_results, as training/evaluate.py runs them (the
checkpoint and the split are loaded before the clock starts). Reference, in the same
run and with the same batch size: the backbone encodes each unique image once, in
batches of --batch-size images, reading and transforming them as the evaluation does
(the work of a feature extraction). Also printed: the backbone forward alone on pixel
tensors already in memory. Each figure is the fastest of --repeats interleaved runs,
so that other load on the machine weighs on both sides alike, in wall-clock and in CPU
seconds (which that load disturbs less). Goal: ratio <= 1.3.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqa.checkpoint import load_checkpoint  # noqa: E402
from vqa.data import ImageSource, load_easy_vqa  # noqa: E402
from vqa.evaluation import DEFAULT_BATCH_SIZE, predict_split  # noqa: E402
from vqa.metrics import evaluate_results  # noqa: E402

GOAL = 1.3


class Clock:
    """Wall and CPU seconds of a block: CPU time is what other load on the machine disturbs least."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_evaluation(model, tokenizer, split, batch_size: int) -> tuple[Clock, dict]:
    with Clock() as clock:
        results, _ = predict_split(model, tokenizer, split, batch_size, progress=False)
        metrics = evaluate_results(results, split)
    return clock, metrics


@torch.inference_mode()
def time_backbone(model, split, batch_size: int) -> tuple[Clock, Clock]:
    """(read + transform + forward, forward alone) for each unique image once."""
    images = ImageSource(split.image_paths, model.image_transform())
    image_ids = split.image_ids
    backbone = model.image_encoder.backbone.eval()
    with Clock() as with_reading:
        for s in range(0, len(image_ids), batch_size):
            backbone(images.batch(image_ids[s : s + batch_size])["pixel_values"].to(model.device))
    pixels = [images.batch(image_ids[s : s + batch_size])["pixel_values"].to(model.device)
              for s in range(0, len(image_ids), batch_size)]
    with Clock() as alone:
        for batch in pixels:
            backbone(batch)
    return with_reading, alone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/easy-vqa")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_checkpoint(args.checkpoint)
    split = load_easy_vqa("test")
    config = model.config
    print(f"checkpoint {args.checkpoint}: {config.backbone} at {config.image_size or 'default'} px, "
          f"LSTM {config.lstm_layers}x{config.lstm_hidden}, common {config.common_dim}, {len(config.answers)} answers")
    print(f"{split.name}: {len(split.records)} questions, {len(split.image_ids)} images, "
          f"batch size {args.batch_size}, {torch.get_num_threads()} threads")
    time_backbone(model, split.subset(split.image_ids[: args.batch_size], "warm-up"), args.batch_size)

    runs = []
    for repeat in range(args.repeats):
        evaluation, metrics = time_evaluation(model, tokenizer, split, args.batch_size)
        with_reading, alone = time_backbone(model, split, args.batch_size)
        runs.append((evaluation, with_reading, alone))
        print(f"run {repeat + 1}: evaluation {evaluation.wall:.2f} s, backbone with reading {with_reading.wall:.2f} s, "
              f"backbone forward alone {alone.wall:.2f} s (CPU: {evaluation.cpu:.2f}, {with_reading.cpu:.2f}, "
              f"{alone.cpu:.2f} s)")
    print(f"overall accuracy {metrics['overall']:.2f} %")
    for kind in ("wall", "cpu"):
        best_eval, best_ref, best_fwd = (min(getattr(run[i], kind) for run in runs) for i in range(3))
        ratio = best_eval / best_ref
        print(f"{kind:>4}: evaluation {best_eval:.2f} s / backbone encoding the {len(split.image_ids)} images once "
              f"{best_ref:.2f} s = {ratio:.2f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'}); "
              f"against the forward alone ({best_fwd:.2f} s): {best_eval / best_fwd:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
