"""Stage 2 on cached maps: training questions/s with no CNN in the loop, and where the time goes.

    OMP_NUM_THREADS=1 python benchmarks/bench_stage2.py --threads 1
    python benchmarks/bench_stage2.py --threads 2 --batch-size 256

A training step of the real VQAModel (the shipped shapes-world sizes: embedding 64, 2 x 256
LSTM, common 512, classifier 512, 2 hops of 2 glimpses with coordinates, word path, side loss)
on a batch as the shapes world gives it: 128 questions of 13 pieces on 13 images (10
questions each), each image a cached 512 x 8 x 8 map. Timed: the whole step (forward,
backward, AdamW), and the question encoder alone (embedding + LSTM + projection, forward and
backward), so that the LSTM's share of a step is a ratio measured in one run. Also the
pooled model, and the LSTM at 128 units, as ratios to the first.
"""

import argparse
import time

import torch

from vqa.config import VQAConfig
from vqa.model import VQAModel


def make_model(hidden: int, glimpses: int) -> VQAModel:
    attention = dict(attention_glimpses=glimpses, attention_coords=True, attention_hops=2,
                     question_word_path=True) if glimpses else {}
    config = VQAConfig(backbone="resnet10t", output_stride=16, freeze_backbone=True, embed_dim=64,
                       lstm_hidden=hidden, common_dim=512, classifier_hidden=512, dropout=0.0, vocab_size=300,
                       id2label={i: str(i) for i in range(40)}, label2id={str(i): i for i in range(40)},
                       side_loss_weight=1.0, side_targets=[f"t{i}" for i in range(120)], **attention)
    return VQAModel(config)


def batch(args, pooled: bool) -> dict:
    images = -(-args.batch_size // 10)
    features = torch.randn(images, 512) if pooled else torch.randn(images, 512, 8, 8)
    return {"input_ids": torch.randint(1, 300, (args.batch_size, 13)),
            "lengths": torch.randint(8, 14, (args.batch_size,)),
            "image_index": torch.arange(args.batch_size) // 10,
            "image_features": features, "labels": torch.softmax(torch.randn(args.batch_size, 40), -1),
            "side_labels": (torch.rand(args.batch_size, 120) < 0.05).float()}


def rate(step, args) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def training_rate(model: VQAModel, args, pooled: bool) -> float:
    data = batch(args, pooled)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad()
        model(**data).loss.backward()
        optimizer.step()

    return rate(step, args)


def question_rate(model: VQAModel, args) -> float:
    data = batch(args, True)

    def step():
        model.zero_grad()
        model.question_vectors(data["input_ids"], data["lengths"]).sum().backward()

    return rate(step, args)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attention = make_model(256, 2).train()
    full = training_rate(attention, args, pooled=False)
    lstm = question_rate(attention, args)
    pooled = training_rate(make_model(256, 0).train(), args, pooled=True)
    small = training_rate(make_model(128, 2).train(), args, pooled=False)
    print(f"threads {args.threads}, batch {args.batch_size}")
    print(f"attention model, training step:       {full:8.0f} questions/s (an epoch of 60,000: {60000 / full:.0f} s)")
    print(f"question encoder alone (fwd + bwd):    {lstm:8.0f} questions/s: {100 * full / lstm:.0f} % of a step")
    print(f"pooled model, training step:           {pooled:8.0f} questions/s ({pooled / full:.2f}x the attention model)")
    print(f"attention model, LSTM of 128 units:    {small:8.0f} questions/s ({small / full:.2f}x)")


if __name__ == "__main__":
    main()
