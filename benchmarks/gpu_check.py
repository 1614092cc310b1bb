"""One GPU, the paper-size model trained as the Trainer's bf16=True trains it: speed, memory, loss.

    python benchmarks/gpu_check.py            # on a CUDA machine (about a minute)
    python benchmarks/gpu_check.py --smoke    # tiny sizes on the CPU: checks the script itself

Two VQAModels at Antol et al.'s sizes (embedding 300, 2 x 512 LSTM, common space 1024,
classifier hidden 1000, 3,129 answers), their resnet152 backbone frozen and never run: the
features are given to `forward(image_features=...)`, as with a feature cache.
- pooled: 2048-d features per image;
- attention: 2 glimpses over 2048 x 14 x 14 maps (ResNet-152 at 448 px).
A batch is 512 questions on 96 images (VQA v2 has 5.36 questions per image), questions of
7.2 pieces on average; features are float32 on the GPU, as the collator hands them over
(reading the cache is measured by bench_train_scale.py). Each answer is a function of its
question, so the loss can fall. A pool of 8 batches is cycled (learning rate 1e-3).

Each model trains --steps steps (AdamW, gradient clipping at 5, as VQATrainer) under
`torch.autocast("cuda", dtype=torch.bfloat16)`, then again in fp32 (TF32 off, PyTorch's
default, which the Trainer keeps) from the same initial weights. Reported: samples/s after
--warmup steps, peak GPU memory, the loss at the start and end, and FLOP utilisation
(bench_train_scale.flops_per_sample) against an 8192^3 matmul timed in the same run.
"""

import argparse
import json
import os
import sys
import time

import torch

from bench_train_scale import flops_per_sample  # benchmarks/, the script's folder, is on sys.path
from vqa.config import VQAConfig
from vqa.model import VQAModel


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(backbone="resnet10t", embed_dim=16, lstm_hidden=16, lstm_layers=2, common_dim=32,
                    classifier_hidden=32, answers=50, vocab=100, batch=32, images=6, map_side=3, pool=4, lr=1e-2)
    return dict(backbone="resnet152", embed_dim=300, lstm_hidden=512, lstm_layers=2, common_dim=1024,
                classifier_hidden=1000, answers=3129, vocab=4000, batch=512, images=96, map_side=14, pool=8, lr=1e-3)


def build_model(s: dict, glimpses: int) -> VQAModel:
    torch.manual_seed(0)
    answers = [f"answer {k}" for k in range(s["answers"])]
    config = VQAConfig(backbone=s["backbone"], freeze_backbone=True, attention_glimpses=glimpses,
                       vocab_size=s["vocab"], embed_dim=s["embed_dim"], lstm_hidden=s["lstm_hidden"],
                       lstm_layers=s["lstm_layers"], common_dim=s["common_dim"],
                       classifier_hidden=s["classifier_hidden"], dropout=0.5,
                       id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    return VQAModel(config)


def make_batches(s: dict, feature_dim: int, glimpses: int, device: torch.device) -> list[dict]:
    """s["pool"] synthetic batches in VQACollator's layout, on `device`."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(s["pool"]):
        lengths = (torch.poisson(torch.full((s["batch"],), 4.2), generator=g) + 3).clamp(2, 23).long()
        input_ids = torch.randint(2, s["vocab"], (s["batch"], int(lengths.max())), generator=g)
        input_ids[torch.arange(input_ids.shape[1]) >= lengths[:, None]] = 0
        # The answer: a function of the question's first piece, over 100 answers (the model can learn
        # it, and the answer prior first).
        answer = input_ids[:, 0] % min(100, s["answers"])
        labels = torch.zeros(s["batch"], s["answers"])
        labels[torch.arange(s["batch"]), answer] = 1.0
        shape = (s["images"], feature_dim, s["map_side"], s["map_side"]) if glimpses else (s["images"], feature_dim)
        features = torch.randn(shape, generator=g).abs()  # ReLU-like, as a CNN's
        image_index = torch.arange(s["batch"]) * s["images"] // s["batch"]  # sorted by image, as the sampler gives
        batch = {"input_ids": input_ids, "lengths": lengths, "image_index": image_index, "image_features": features,
                 "labels": labels}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(model: VQAModel, batches: list[dict], steps: int, warmup: int, bf16: bool, device: torch.device,
          lr: float) -> dict:
    """`steps` training steps as VQATrainer takes them; samples/s over the steps after `warmup`."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses = []
    started = None
    for step in range(steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        batch = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    synchronize(device)
    seconds = time.perf_counter() - started
    losses = torch.stack(losses).float().cpu()
    k = len(batches)  # the first pass over the pool against the last (any k steps in a row see every batch)
    first, last = losses[:k].mean().item(), losses[-k:].mean().item()
    return {"samples_per_s": batches[0]["labels"].shape[0] * (steps - warmup) / seconds,
            "step_ms": 1000 * seconds / (steps - warmup),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "loss_first_pass": first, "loss_last_pass": last,
            "finite": bool(torch.isfinite(losses).all()), "falls": last < first}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n^3 matmul, best of 5 after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to test the script")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    s = sizes(args.smoke)
    steps, warmup = (12, 2) if args.smoke else (args.steps, args.warmup)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, TF32 matmul "
              f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    elif not args.smoke:
        print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
        return 2
    n = 256 if args.smoke else 8192
    peak = {"bf16": matmul_rate(device, torch.bfloat16, n), "fp32": matmul_rate(device, torch.float32, n)}
    print(f"matmul {n}^3: bf16 {peak['bf16'] / 1e12:.1f} TFLOP/s, fp32 {peak['fp32'] / 1e12:.1f} TFLOP/s")

    report = {"device": str(device), "matmul_tflops": {k: v / 1e12 for k, v in peak.items()}, "runs": []}
    for glimpses in (0, 2):
        model = build_model(s, glimpses).to(device)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        batches = make_batches(s, model.config.image_feature_dim, glimpses, device)
        mean_tokens = torch.cat([b["lengths"] for b in batches]).float().mean().item()
        flops = flops_per_sample(model.config, mean_tokens, s["images"] / s["batch"], s["map_side"] ** 2)
        name = f"attention G={glimpses}, {s['map_side']}x{s['map_side']} maps" if glimpses else "pooled"
        for precision in ("bf16", "fp32"):
            model.load_state_dict(initial)
            run = train(model, batches, steps, warmup, precision == "bf16", device, s["lr"])
            run.update(model=name, precision=precision, batch=s["batch"], images=s["images"],
                       training_mflop_per_sample=flops["training"] / 1e6,
                       utilisation=flops["training"] * run["samples_per_s"] / peak[precision])
            report["runs"].append(run)
            memory = f", peak {run['peak_gib']:.2f} GiB" if run["peak_gib"] is not None else ""
            print(f"{name}, {precision}: {run['samples_per_s']:,.0f} samples/s ({run['step_ms']:.1f} ms/step, "
                  f"{steps - warmup} steps after {warmup}){memory}; loss {run['loss_first_pass']:.3f} -> "
                  f"{run['loss_last_pass']:.3f} (finite {run['finite']}, falls {run['falls']}); "
                  f"{flops['training'] / 1e6:.0f} MFLOP/sample = {100 * run['utilisation']:.1f} % of the {precision} matmul")
        bf16, fp32 = report["runs"][-2:]
        print(f"  {name}: bf16 autocast {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}x the fp32 speed")
        del model, batches, initial
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok = all(r["finite"] and r["falls"] for r in report["runs"])
    print("loss finite and falling in every run" if ok else "LOSS CHECK FAILED")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
