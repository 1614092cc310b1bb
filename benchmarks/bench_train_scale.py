"""Training at VQA v2 scale on cached CNN features: throughput, memory, FLOP utilisation.

    python benchmarks/bench_train_scale.py                          # batch 512, 20 timed steps
    # the figures of docs/vqa-v2.md: one thread (a shared CPU), then the LSTM proposal
    python benchmarks/bench_train_scale.py --threads 1 --batch-sizes 256 512 --steps 20
    python benchmarks/bench_train_scale.py --threads 1 --batch-sizes 256 512 1024 --steps 20 \
        --question-lstm by-length --data-epochs 0 --memory-epochs 0 --build-sample 0

Built on the fly in a temporary folder, VQA v2 train2014-sized: 443,757 questions on
82,783 images (5.36 each), 2048-d float16 features as a FeatureCache memmap on disk
(323 MB), 3,129 answers, questions of 7 pieces on average (VQA v2: 6.2 words plus "?"),
10 human answers each turned into soft scores with the official leave-one-out formula.

The model is the real VQAModel at the paper's sizes (embedding 300, 2 x 512 LSTM, common
1024, classifier hidden 1000; its resnet152 backbone is frozen and never run), trained by
the real VQATrainer (transformers.Trainer: AdamW, cosine schedule, gradient clipping)
through the real data path: ImageGroupedSampler -> items -> VQACollator ->
ImageSource(feature_cache=FeatureCache). The items come from `ArrayQuestions`, which
returns exactly QuestionDataset's item dicts from flat numpy arrays: building 443,757
real QuestionDataset items (SentencePiece + official answer scoring per question) is
measured on a slice and extrapolated instead.

Reported:
- samples/s of training, timed after warm-up steps, and one epoch's time at that rate;
- FLOP utilisation = model FLOPs per sample x samples/s / fp32 matmul FLOP/s, the
  matmul rate measured in the same run (a 2048^3 torch.mm, best of 5, before and after;
  also per CPU second, against torch.mm and against oneDNN's matmul, the faster of the
  two on AMD CPUs).
  FLOPs are counted analytically, 2 per multiply-add over the real tokens (no padding),
  backward 2x forward, and checked against FlopCounterMode on one batch's forward;
- memory: peak resident set, and anonymous resident memory after each of several epochs
  (data path over all questions; training over a slice): it must not grow;
- where the time of a step goes (torch.profiler, top operators), and the question LSTM
  run packed (as VQAModel does) against one unpadded call per question length.
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqa.config import VQAConfig  # noqa: E402
from vqa.data import ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, VQASplit  # noqa: E402
from vqa.features import FEATURES_FILE, INDEX_FILE, META_FILE, FeatureCache  # noqa: E402
from vqa.model import VQAModel  # noqa: E402

QUESTIONS, IMAGES, ANSWERS, FEATURE_DIM, VOCAB = 443_757, 82_783, 3_129, 2048, 4000
FIRST_IMAGE_ID = 9  # COCO train2014 ids are sparse; these are too (every 7th)


def rss() -> dict[str, float]:
    """Resident memory in MB: anonymous (heap, tensors) and file-backed (memmap pages, code)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- synthetic VQA v2


def soft_scores(counts: np.ndarray) -> np.ndarray:
    """Official VQA accuracy of an answer given by `counts` of 10 humans: the mean over the
    10 leave-one-out sets of min(1, matches / 3) (vqa.answers.vqa_accuracy)."""
    return (counts * np.minimum(1, (counts - 1) / 3) + (10 - counts) * np.minimum(1, counts / 3)) / 10


class ArrayQuestions(Dataset):
    """QuestionDataset's items ({"index", "input_ids", "image_id", "scores"}) from flat arrays,
    sorted by image as QuestionDataset sorts them."""

    def __init__(self, rng: np.random.Generator, questions: int = QUESTIONS, images: int = IMAGES):
        image_ids = FIRST_IMAGE_ID + 7 * np.arange(images)
        self.image_id = np.sort(image_ids[np.arange(questions) % images])  # 5 or 6 questions per image
        lengths = np.clip(rng.poisson(4.2, questions) + 3, 2, 23)  # mean 7.2 pieces
        self.token_offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = rng.integers(2, VOCAB, self.token_offsets[-1], dtype=np.int32)
        # 10 human answers: a Zipf draw over the 3,129 answers (frequent answers are frequent),
        # about half of the humans agreeing on one answer as in VQA v2.
        humans = np.where(rng.random((questions, 10)) < 0.55, rng.zipf(1.3, (questions, 1)),
                          rng.zipf(1.3, (questions, 10))) - 1
        humans = np.sort(humans, axis=1)
        starts = np.ones_like(humans, dtype=bool)  # where a run of equal answers starts, per row
        starts[:, 1:] = humans[:, 1:] != humans[:, :-1]
        flat, first = humans.reshape(-1), np.flatnonzero(starts)
        counts = np.diff(np.append(first, flat.size))  # rows start runs, so no run spans two rows
        answers, rows = flat[first], first // 10
        kept = answers < ANSWERS  # answers outside the vocabulary score nothing
        self.answer_idx = answers[kept].astype(np.int32)
        self.score_val = soft_scores(counts[kept]).astype(np.float32)
        self.score_offsets = np.concatenate([[0], np.cumsum(np.bincount(rows[kept], minlength=questions))])
        self.records = _ImageIdRecords(self.image_id)  # what ImageGroupedSampler reads

    def __len__(self) -> int:
        return len(self.image_id)

    def __getitem__(self, i: int) -> dict:
        t0, t1 = self.token_offsets[i], self.token_offsets[i + 1]
        s0, s1 = self.score_offsets[i], self.score_offsets[i + 1]
        return {"index": i, "input_ids": self.tokens[t0:t1].tolist(), "image_id": int(self.image_id[i]),
                "scores": dict(zip(self.answer_idx[s0:s1].tolist(), self.score_val[s0:s1].tolist()))}

    def subset(self, n: int) -> "ArrayQuestions":
        part = object.__new__(ArrayQuestions)
        t1, s1 = self.token_offsets[n], self.score_offsets[n]
        part.image_id, part.tokens, part.token_offsets = self.image_id[:n], self.tokens[:t1], self.token_offsets[: n + 1]
        part.answer_idx, part.score_val, part.score_offsets = self.answer_idx[:s1], self.score_val[:s1], self.score_offsets[: n + 1]
        part.records = _ImageIdRecords(part.image_id)
        return part


class _ImageIdRecords:
    def __init__(self, image_id: np.ndarray):
        self.image_id = image_id

    def __len__(self) -> int:
        return len(self.image_id)

    def __iter__(self):
        return ({"image_id": i} for i in self.image_id.tolist())


def write_feature_cache(folder: Path, rng: np.random.Generator) -> FeatureCache:
    """A cache folder in vqa.features' layout: ReLU-like pooled features, float16 memmap."""
    folder.mkdir(parents=True)
    features = np.lib.format.open_memmap(folder / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(IMAGES, FEATURE_DIM))
    for start in range(0, IMAGES, 8192):
        stop = min(start + 8192, IMAGES)
        features[start:stop] = np.abs(rng.standard_normal((stop - start, FEATURE_DIM), dtype=np.float32))
    features.flush()
    del features
    ids = FIRST_IMAGE_ID + 7 * np.arange(IMAGES)
    (folder / INDEX_FILE).write_text(json.dumps({int(i): r for r, i in enumerate(ids)}))
    (folder / META_FILE).write_text(json.dumps({"backbone": "resnet152", "feature_dim": FEATURE_DIM}))
    return FeatureCache(folder)


def question_dataset_build_cost(n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Seconds and MB (Python objects it holds, by tracemalloc) to build real QuestionDataset
    items for n synthetic records: SentencePiece and official answer scoring per question."""
    from vqa.answers import build_answer_vocabulary
    from vqa.text import QuestionTokenizer

    words = ["what", "is", "the", "color", "of", "man", "how", "many", "are", "there", "in", "picture", "this",
             "does", "have", "on", "a", "table", "people", "room", "kind", "sport", "playing", "wearing"]
    words += [f"{a}{b}" for a in ("ba", "ko", "ri", "te", "mu", "sa") for b in ("n", "lo", "rk", "ter", "ple")]
    answers = ["yes", "no", "2", "1", "white", "3", "red", "blue", "black", "4", "green", "tennis", "frisbee"]
    answers += [f"thing {k}" for k in range(ANSWERS)]
    records = []
    for q in range(n):
        text = " ".join(rng.choice(words, rng.poisson(5) + 2)) + "?"
        dominant = answers[min(rng.zipf(1.3) - 1, len(answers) - 1)]
        human = [dominant if rng.random() < 0.6 else answers[min(rng.zipf(1.3) - 1, len(answers) - 1)]
                 for _ in range(10)]
        records.append({"question_id": q, "image_id": q // 5, "question": text, "answers": human})
    tokenizer = QuestionTokenizer.train((r["question"] for r in records), vocab_size=500)
    vocabulary = build_answer_vocabulary((r["answers"] for r in records), ANSWERS)
    index = {a: i for i, a in enumerate(vocabulary)}
    started = time.perf_counter()
    QuestionDataset(VQASplit("synthetic", records, {}), tokenizer, index, 32)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    dataset = QuestionDataset(VQASplit("synthetic", records, {}), tokenizer, index, 32)
    megabytes = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    del dataset
    return seconds, megabytes


# ---------------------------------------------------------------- FLOPs


def flops_per_sample(config: VQAConfig, mean_tokens: float, images_per_question: float) -> dict[str, float]:
    """Forward FLOPs per question (2 per multiply-add) by part; training = 3x forward."""
    e, h, c = config.embed_dim, config.lstm_hidden, config.common_dim
    lstm_per_token = 2 * 4 * h * (e + h) + (config.lstm_layers - 1) * 2 * 4 * h * (2 * h)
    parts = {
        "lstm": lstm_per_token * mean_tokens,
        "question projection": 2 * (2 * config.lstm_layers * h) * c,
        "image projection": 2 * config.image_feature_dim * c * images_per_question,
        "classifier": 2 * c * config.classifier_hidden + 2 * config.classifier_hidden * config.num_labels,
    }
    parts["forward"] = sum(parts.values())
    parts["training"] = 3 * parts["forward"]
    return parts


def counted_forward_flops(model: VQAModel, batch: dict) -> float:
    """FlopCounterMode's count of one forward pass (it sees the packed LSTM's matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**batch)
    return counter.get_total_flops()


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 FLOP/s of an n^3 matmul, best of `repeats`: torch.mm (MKL's sgemm, what nn.Linear
    and the packed LSTM run on), per wall and per CPU second, and oneDNN's (mkldnn_linear,
    the kernels of the unpacked LSTM), per CPU second. On AMD CPUs MKL takes slower code
    paths than oneDNN, so the two can differ by 2x."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a_dnn, b_dnn = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
    runs = {"mm": lambda: a @ b, "onednn": lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn)}
    rates = {}
    for name, run in runs.items():
        run()
        wall = cpu = float("inf")
        for _ in range(repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - started_cpu)
        rates[name], rates[name + " per cpu s"] = 2 * n**3 / wall, 2 * n**3 / cpu
    return rates


# ---------------------------------------------------------------- training


def build_model() -> VQAModel:
    torch.manual_seed(0)
    answers = [f"answer {k}" for k in range(ANSWERS)]
    config = VQAConfig(backbone="resnet152", freeze_backbone=True, vocab_size=VOCAB, embed_dim=300, lstm_hidden=512,
                       lstm_layers=2, common_dim=1024, classifier_hidden=1000, dropout=0.5,
                       id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)})
    return VQAModel(config).train()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back, so that resident memory shows what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_steps(dataset, collator, batch_size: int, steps: int, warmup: int, work: Path,
                epochs: int | None = None) -> dict:
    """Run the real VQATrainer; times each step and records memory at each epoch's end."""
    from transformers import TrainerCallback, TrainingArguments

    from vqa.training import VQATrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.step_ends, self.step_cpu, self.epoch_rss = [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.step_ends:
                self.on_step_end(args, state, control)

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())
            self.step_cpu.append(time.process_time())

        def on_epoch_end(self, args, state, control, **kwargs):
            release_memory()
            self.epoch_rss.append(rss())

    length = {"num_train_epochs": epochs} if epochs else {"max_steps": steps}
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=batch_size, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=0.05, max_grad_norm=5.0, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=True, seed=0, **length)
    clock = Clock()
    trainer = VQATrainer(model=build_model(), args=args, train_dataset=dataset, data_collator=collator,
                         callbacks=[clock])
    trainer.train()
    del trainer
    release_memory()
    timed, cpu = np.diff(clock.step_ends)[warmup:], np.diff(clock.step_cpu)[warmup:]
    if not len(timed):
        return {"epoch_rss": clock.epoch_rss}
    return {"samples_per_s": batch_size * len(timed) / timed.sum(), "samples_per_cpu_s": batch_size * len(cpu) / cpu.sum(),
            "step_s": float(np.median(timed)), "epoch_rss": clock.epoch_rss, "peak_mb": peak_rss_mb()}


def data_path_epochs(dataset, collator, batch_size: int, epochs: int) -> list[dict]:
    """The data path alone over every question, several epochs: samples/s and memory per epoch."""
    sampler = ImageGroupedSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        images = 0
        for batch in loader:
            images += batch["image_features"].shape[0]
        seconds = time.perf_counter() - started
        release_memory()
        out.append({"epoch": epoch + 1, "samples_per_s": len(dataset) / seconds,
                    "images_per_batch": images / len(loader), **rss()})
    return out


def profile_step(model: VQAModel, batch: dict, top: int = 8) -> list[tuple[str, float]]:
    """Share of self CPU time of the heaviest operators over 2 training steps (forward, backward, AdamW)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total) for e in events[:top]]


def lstm_by_length(lstm: torch.nn.LSTM, embedded: torch.Tensor, lengths: torch.Tensor):
    """Final (h, c) of each question with one unpadded LSTM call per distinct length: the
    same numbers as the packed call, through oneDNN's fused LSTM (which packed input skips)."""
    h = embedded.new_empty(lstm.num_layers, len(lengths), lstm.hidden_size)
    c = torch.empty_like(h)
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().squeeze(1)
        _, (h_part, c_part) = lstm(embedded[rows, :length])
        h = h.index_copy(1, rows, h_part)
        c = c.index_copy(1, rows, c_part)
    return h, c


def use_question_lstm_by_length() -> None:
    """Run VQAModel's question LSTM as one unpadded call per length, in this process only:
    the change to QuestionEncoder.forward that this benchmark measures as a proposal."""
    from vqa.model import QuestionEncoder

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = torch.tanh(self.embed(input_ids))  # (B, T, E)
        h, c = lstm_by_length(self.lstm, embedded, lengths.cpu().clamp(min=1))  # each (L, B, H)
        state = torch.cat([h, c], dim=0).transpose(0, 1).flatten(1)  # (B, 2LH)
        return torch.tanh(self.project(state))

    QuestionEncoder.forward = forward


def question_lstm_variants(model: VQAModel, batch: dict, repeats: int = 4) -> dict[str, float]:
    """Seconds (best of `repeats`) of the question LSTM's forward + backward on the batch: as the
    model runs it (packed) and one call per length; their largest difference in h and c."""
    from torch.nn.utils.rnn import pack_padded_sequence

    lstm = model.question_encoder.lstm
    embedded = torch.tanh(model.question_encoder.embed(batch["input_ids"])).detach()  # (B, T, E)
    lengths = batch["lengths"]

    def packed():
        return lstm(pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False))[1]

    def by_length():
        return lstm_by_length(lstm, embedded, lengths)

    seconds = {}
    for name, run in (("packed", packed), ("by length", by_length)):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            h, c = run()
            (h.sum() + c.sum()).backward()
            best = min(best, time.perf_counter() - started)
        seconds[name] = best
    with torch.no_grad():
        (h1, c1), (h2, c2) = packed(), by_length()
    seconds["max difference"] = max((h1 - h2).abs().max().item(), (c1 - c2).abs().max().item())
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--data-epochs", type=int, default=2, help="epochs of the data path alone over all questions")
    parser.add_argument("--memory-epochs", type=int, default=3, help="training epochs over a slice, for memory")
    parser.add_argument("--memory-questions", type=int, default=2048)
    parser.add_argument("--build-sample", type=int, default=20_000, help="questions to build QuestionDataset items from")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--question-lstm", choices=["packed", "by-length"], default="packed",
                        help="packed: VQAModel as it is; by-length: one LSTM call per question length (a proposal)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.question_lstm == "by-length":
        use_question_lstm_by_length()

    rng = np.random.default_rng(0)
    print(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} (other processes on this machine slow every figure); question LSTM: "
          f"{args.question_lstm}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        dataset = ArrayQuestions(rng)
        cache = write_feature_cache(tmp / "features", rng)
        lengths = np.diff(dataset.token_offsets)
        print(f"synthetic VQA v2 train: {len(dataset):,} questions, {len(cache):,} images, {FEATURE_DIM}-d fp16 "
              f"features ({cache.features.nbytes / 2**20:.0f} MB memmap), {ANSWERS:,} answers, "
              f"{lengths.mean():.2f} pieces per question, {len(dataset.answer_idx) / len(dataset):.2f} scored "
              f"answers per question; built in {time.perf_counter() - started:.0f} s")

        if args.build_sample:
            seconds, megabytes = question_dataset_build_cost(args.build_sample, rng)
            scale = QUESTIONS / args.build_sample
            print(f"real QuestionDataset items: {seconds:.2f} s and {megabytes:.0f} MB for {args.build_sample:,} "
                  f"questions -> about {seconds * scale:.0f} s and {megabytes * scale:.0f} MB for {QUESTIONS:,}")

        collator = VQACollator(ImageSource({}, feature_cache=cache), ANSWERS)
        rows = dataset.image_id[: 96 * 6 : 6].tolist()  # a batch's worth of distinct images
        reads = []
        for _ in range(50):
            started = time.perf_counter()
            cache.get(rows)
            reads.append(time.perf_counter() - started)
        print(f"FeatureCache.get: {len(rows)} images in {np.median(reads) * 1000:.2f} ms")

        if args.data_epochs:
            print(f"\ndata path alone (sampler + items + collator + cache), batch {args.batch_sizes[0]}, "
                  "all questions:")
        for row in data_path_epochs(dataset, collator, args.batch_sizes[0], args.data_epochs):
            print(f"  epoch {row['epoch']}: {row['samples_per_s']:8.0f} samples/s, {row['images_per_batch']:.0f} "
                  f"images per batch, RssAnon {row['RssAnon']:.0f} MB, RssFile {row['RssFile']:.0f} MB")

        model = build_model()
        sample_batch = collator([dataset[i] for i in range(max(args.batch_sizes))])
        mean_tokens = float(lengths.mean())
        images_per_question = len(cache) / len(dataset)
        flops = flops_per_sample(model.config, mean_tokens, images_per_question)
        print("\nFLOPs per question, forward: " + ", ".join(
            f"{k} {v / 1e6:.1f}M" for k, v in flops.items() if k not in ("forward", "training")))
        check = sample_batch
        analytic = flops_per_sample(model.config, check["lengths"].float().mean().item(),
                                    check["image_features"].shape[0] / len(check["lengths"]))
        counted = counted_forward_flops(model.eval(), check)
        print(f"  forward {flops['forward'] / 1e6:.1f} MFLOP, training (3x) {flops['training'] / 1e6:.1f} MFLOP; "
              f"FlopCounterMode on one batch's forward: {counted / (analytic['forward'] * len(check['lengths'])):.3f}x "
              "the analytic count")
        del model

        results = {}
        for batch_size in args.batch_sizes:
            before = matmul_rates()
            run = train_steps(dataset, collator, batch_size, args.steps + args.warmup, args.warmup, tmp / "trainer")
            after = matmul_rates()
            rate = {k: (before[k] + after[k]) / 2 for k in before}
            results[batch_size] = run
            achieved, achieved_cpu = flops["training"] * run["samples_per_s"], flops["training"] * run["samples_per_cpu_s"]
            print(f"\ntraining, batch {batch_size}: {run['samples_per_s']:.1f} samples/s (median step "
                  f"{run['step_s']:.2f} s, {args.steps} steps after {args.warmup} warm-up), peak memory so far "
                  f"{run['peak_mb']:.0f} MB\n  {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / rate['mm']:.0f} % of "
                  f"the fp32 torch.mm rate ({rate['mm'] / 1e9:.1f} GFLOP/s, 2048^3, before and after)\n"
                  f"  per CPU second, which other processes disturb less: {achieved_cpu / 1e9:.1f} GFLOP = "
                  f"{100 * achieved_cpu / rate['mm per cpu s']:.0f} % of torch.mm's {rate['mm per cpu s'] / 1e9:.1f}, "
                  f"{100 * achieved_cpu / rate['onednn per cpu s']:.0f} % of oneDNN's {rate['onednn per cpu s'] / 1e9:.1f}")
        best = max(results, key=lambda b: results[b]["samples_per_s"])
        wall_min = QUESTIONS / results[best]["samples_per_s"] / 60
        cpu_min = QUESTIONS / results[best]["samples_per_cpu_s"] / 60  # at one CPU second per second
        print(f"one VQA v2 train epoch ({QUESTIONS:,} questions) at batch {best}: {wall_min:.0f} min at the wall-clock "
              f"rate measured here; {cpu_min:.0f} CPU-minutes, i.e. {cpu_min / os.cpu_count():.0f}-{cpu_min:.0f} min "
              f"on this CPU's {os.cpu_count()} cores idle (perfect to no scaling over cores)")

        model = build_model()
        batch = {k: v[:best] if k != "image_features" else v for k, v in sample_batch.items()}
        print(f"\nwhere a training step goes (self CPU time, batch {best}):")
        for name, share in profile_step(model, batch):
            print(f"  {100 * share:5.1f} %  {name}")
        variants = question_lstm_variants(model, batch)
        print(f"question LSTM forward + backward, batch {best}: packed (as VQAModel runs it) "
              f"{variants['packed']:.2f} s, one call per length {variants['by length']:.2f} s "
              f"(same h and c within {variants['max difference']:.1e})")
        del model, batch
        release_memory()
        if not args.memory_epochs:
            print(f"peak resident memory of the whole run: {peak_rss_mb():.0f} MB")
            return 0

        before = rss()
        memory = train_steps(dataset.subset(args.memory_questions), collator, 128, 0, 0, tmp / "memory",
                             epochs=args.memory_epochs)
        print(f"\ntraining {args.memory_epochs} epochs over {args.memory_questions:,} questions (batch 128): "
              f"resident memory before: RssAnon {before['RssAnon']:.0f} MB; after each epoch:")
        for epoch, row in enumerate(memory["epoch_rss"], 1):
            print(f"  epoch {epoch}: RssAnon {row['RssAnon']:.0f} MB, RssFile {row['RssFile']:.0f} MB")
        print(f"peak resident memory of the whole run: {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
