"""Training at VQA v2 scale on cached CNN features: throughput, memory, FLOP utilisation.

    python benchmarks/bench_train_scale.py                          # pooled model, batch 512, 20 timed steps
    # the pooled figures of docs/vqa-v2.md: one thread (a shared CPU)
    OMP_NUM_THREADS=1 python benchmarks/bench_train_scale.py --threads 1 --batch-sizes 256 512 --steps 20
    # the attention figures: 2 glimpses over 2048 x 14 x 14 maps of 4,000 images (3.1 GB)
    OMP_NUM_THREADS=1 python benchmarks/bench_train_scale.py --threads 1 --attention-glimpses 2 --map-size 14

Built on the fly in a temporary folder (--tmp), VQA v2 train2014-sized: 443,757 questions
on 82,783 images (5.36 each), 3,129 answers, questions of 7 pieces on average (VQA v2: 6.2
words plus "?"), 10 human answers each turned into soft scores with the official
leave-one-out formula. The features are a float16 FeatureCache written by CacheWriter:
2048-d pooled rows (323 MB), or with --attention-glimpses G the 2048 x S x S maps of
--map-size S. A 14 x 14 map cache of all of train2014 is 66.5 GB, so the attention run
takes --images images (default 4,000: 3.1 GB at 14 x 14) and their 5.36 questions each;
per question the work is the same as at full scale.

The model is the real VQAModel at the paper's sizes (embedding 300, 2 x 512 LSTM, common
1024, classifier hidden 1000; its resnet152 backbone is frozen and never run), trained by
the real VQATrainer (transformers.Trainer: AdamW, cosine schedule, gradient clipping)
through the real data path: ImageGroupedSampler -> items -> VQACollator ->
ImageSource(feature_cache=FeatureCache), and the model's own forward. The items come from
`ArrayQuestions`, which returns exactly QuestionDataset's item dicts from flat numpy
arrays: building 443,757 real QuestionDataset items (SentencePiece + official answer
scoring per question) is measured on a slice and extrapolated instead.

Reported:
- the cache's read rate over every image in shuffled batches of 96 (a batch of 512
  questions): rows copied out of the memmap with the file dropped from the page cache first
  (the disk's rate), and FeatureCache.get (float16 rows -> float32 tensor) from the disk and
  from the page cache;
- samples/s of training, timed after warm-up steps, and one epoch's time at that rate;
- FLOP utilisation = model FLOPs per sample x samples/s / fp32 matmul FLOP/s, the
  matmul rate measured in the same run (a 2048^3 torch.mm, best of 5, before and after;
  also per CPU second, against torch.mm and against oneDNN's matmul, the faster of the
  two on AMD CPUs). FLOPs are counted analytically (`flops_per_sample`) and checked
  against FlopCounterMode on one batch's forward;
- memory: peak resident set, and anonymous resident memory after each of several epochs
  (data path over all questions; training over a slice): it must not grow. The cache's
  pages are file-backed (RssFile): the page cache, which the kernel reclaims, not the heap;
- where the time of a step goes (torch.profiler, top operators), and, as a standalone
  measurement of `model.question_encoder.lstm`, the question LSTM run packed (as VQAModel
  runs it) against one unpadded call per question length.
"""

import argparse
import ctypes
import gc
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

from vqa.batching import ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator
from vqa.config import VQAConfig
from vqa.feature_cache import CacheWriter, FEATURES_FILE, FeatureCache
from vqa.model import VQAModel
from vqa.records import VQASplit

QUESTIONS, IMAGES, ANSWERS, FEATURE_DIM, VOCAB = 443_757, 82_783, 3_129, 2048, 4000
FIRST_IMAGE_ID = 9  # COCO train2014 ids are sparse; these are too (every 7th)
BATCH_IMAGES = 96  # distinct images in a batch of 512 questions (5.36 per image)


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


def write_feature_cache(folder: Path, rng: np.random.Generator, images: int, map_size: int) -> FeatureCache:
    """A cache of `images` rows written by CacheWriter: pooled (2048,) rows, or (2048, S, S) maps
    with map_size S > 0; nonnegative (ReLU-like) uniform values, stored as float16."""
    shape = [FEATURE_DIM, map_size, map_size] if map_size else [FEATURE_DIM]
    meta = {"backbone": "resnet152", "image_size": 32 * map_size or None, "transform": "synthetic",
            "weights": "synthetic", "output_stride": None, "feature_shape": shape}
    ids = (FIRST_IMAGE_ID + 7 * np.arange(images)).tolist()
    chunk = max(1, 2**27 // (2 * int(np.prod(shape))))  # 128 MB of float16 rows per append
    with CacheWriter(folder, meta, images) as writer:
        for start in range(0, images, chunk):
            rows = ids[start : start + chunk]
            writer.append(rows, rng.random((len(rows), *shape), dtype=np.float32))
    return FeatureCache(folder)


def drop_from_page_cache(path: Path) -> None:
    """Evict the file's clean pages (posix_fadvise DONTNEED), so that the next read comes from
    the disk. Pages some process has mapped stay: call it before the cache is read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_rates(cache: FeatureCache, rng: np.random.Generator, batch_images: int = BATCH_IMAGES) -> dict[str, float]:
    """MB/s (10^6 bytes) of float16 cache rows read over every image once, in shuffled batches of
    `batch_images` as the image-grouped sampler asks for them:
    - "disk": the rows copied out of a fresh memmap, the file dropped from the page cache first;
    - "get, disk": FeatureCache.get (rows -> float32 tensor), the file dropped first;
    - "get, page cache": FeatureCache.get again, the file now in the page cache."""
    path = cache.folder / FEATURES_FILE
    ids = np.array(sorted(cache.index))
    rng.shuffle(ids)
    batches = [ids[s : s + batch_images] for s in range(0, len(ids), batch_images)]
    megabytes = cache.features[: len(ids)].nbytes / 1e6

    def rate(read) -> float:
        started = time.perf_counter()
        for batch in batches:
            read(batch)
        return megabytes / (time.perf_counter() - started)

    drop_from_page_cache(path)
    raw = np.load(path, mmap_mode="r")
    rates = {"disk": rate(lambda batch: raw[np.sort(cache.rows(batch))])}
    del raw  # unmapped, so that its pages can be dropped again
    drop_from_page_cache(path)
    rates["get, disk"] = rate(cache.get)
    rates["get, page cache"] = rate(cache.get)
    return rates


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


def flops_per_sample(config: VQAConfig, mean_tokens: float, images_per_question: float,
                     locations: int = 0) -> dict[str, float]:
    """FLOPs per question of the matrix products (2 per multiply-add) by part, forward, and
    "training" = forward + backward. Backward is 2x forward where the product's input needs a
    gradient (input and weight gradients), 1x where that input is the frozen CNN's features
    (weight gradient only). With attention (config.attention_glimpses = G over `locations`
    L = h*w): the location projection runs once per image, the scores and the attended sum
    once per question and location, the image projection takes the G x F attended vectors."""
    e, h, c, f = config.embed_dim, config.lstm_hidden, config.common_dim, config.image_feature_dim
    g = config.attention_glimpses
    lstm_per_token = 2 * 4 * h * (e + h) + (config.lstm_layers - 1) * 2 * 4 * h * (2 * h)
    parts = {  # name: (forward FLOPs, backward / forward)
        "lstm": (lstm_per_token * mean_tokens, 2),
        "question projection": (2 * (2 * config.lstm_layers * h) * c, 2),
        "classifier": (2 * c * config.classifier_hidden + 2 * config.classifier_hidden * config.num_labels, 2),
    }
    if g:
        parts["location projection"] = (2 * locations * f * c * images_per_question, 1)
        parts["attention scores"] = (2 * locations * c * g, 2)
        parts["attended sum"] = (2 * g * locations * f, 1)  # the map needs no gradient, the weights do
        parts["image projection"] = (2 * g * f * c, 2)
    else:
        parts["image projection"] = (2 * f * c * images_per_question, 1)
    out = {name: forward for name, (forward, _) in parts.items()}
    out["forward"] = sum(out.values())
    out["training"] = sum(forward * (1 + backward) for forward, backward in parts.values())
    return out


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


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back, so that resident memory shows what is held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_steps(model: VQAModel, dataset, collator, batch_size: int, steps: int, warmup: int, work: Path,
                epochs: int | None = None) -> dict:
    """Train `model` with the real VQATrainer; times each step and records memory at each epoch's end."""
    from transformers import TrainerCallback, TrainingArguments

    from vqa.trainer import VQATrainer

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
    trainer = VQATrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         callbacks=[clock])
    trainer.train()
    del trainer, model
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
        row_mb = collator.images.feature_cache.features[0].nbytes / 1e6
        out.append({"epoch": epoch + 1, "samples_per_s": len(dataset) / seconds, "read_mb_per_s": images * row_mb / seconds,
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


def build_model(glimpses: int = 0) -> VQAModel:
    """The paper-size model, pooled or with `glimpses` of attention; same weights every call."""
    torch.manual_seed(0)
    answers = [f"answer {k}" for k in range(ANSWERS)]
    config = VQAConfig(backbone="resnet152", freeze_backbone=True, vocab_size=VOCAB, embed_dim=300, lstm_hidden=512,
                       lstm_layers=2, common_dim=1024, classifier_hidden=1000, dropout=0.5,
                       attention_glimpses=glimpses, id2label=dict(enumerate(answers)),
                       label2id={a: i for i, a in enumerate(answers)})
    return VQAModel(config).train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention-glimpses", type=int, default=0,
                        help="0: the pooled model on 2048-d features; G > 0: G glimpses over --map-size maps")
    parser.add_argument("--map-size", type=int, default=14,
                        help="side S of the 2048 x S x S maps (14: ResNet-152 at 448 px; 7: at 224 px)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"images in the cache, with 5.36 questions each (default: {IMAGES:,} pooled, "
                             "4,000 with attention)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per batch size (default: 20 pooled, 8 with attention)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--data-epochs", type=int, default=2, help="epochs of the data path alone over all questions")
    parser.add_argument("--memory-epochs", type=int, default=3, help="training epochs over a slice, for memory")
    parser.add_argument("--memory-questions", type=int, default=None,
                        help="questions of that slice (default: 2048 pooled, 1024 with attention)")
    parser.add_argument("--build-sample", type=int, default=20_000, help="questions to build QuestionDataset items from")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--tmp", default=None, help="folder for the synthetic cache (default: the system's temp folder)")
    args = parser.parse_args(argv)
    glimpses = args.attention_glimpses
    map_size = args.map_size if glimpses else 0
    images = args.images or (4000 if glimpses else IMAGES)
    questions = round(images * QUESTIONS / IMAGES)
    steps = args.steps or (8 if glimpses else 20)
    memory_questions = args.memory_questions or (1024 if glimpses else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    model_name = f"{glimpses}-glimpse attention over 2048 x {map_size} x {map_size} maps" if glimpses else "pooled"
    print(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load average "
          f"{os.getloadavg()[0]:.1f} (other processes on this machine slow every figure); model: {model_name}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        dataset = ArrayQuestions(rng, questions, images)
        built = time.perf_counter() - started
        started = time.perf_counter()
        cache = write_feature_cache(tmp / "features", rng, images, map_size)
        written = time.perf_counter() - started
        size_mb = cache.features.nbytes / 2**20
        lengths = np.diff(dataset.token_offsets)
        print(f"synthetic VQA v2 train: {len(dataset):,} questions, {len(cache):,} images, "
              f"{' x '.join(map(str, cache.feature_shape))} float16 features ({size_mb:,.0f} MiB memmap, generated and "
              f"written by CacheWriter in {written:.0f} s), {ANSWERS:,} answers, "
              f"{lengths.mean():.2f} pieces per question, {len(dataset.answer_idx) / len(dataset):.2f} scored answers "
              f"per question; questions built in {built:.0f} s")
        if images < IMAGES:
            print(f"  (a slice: all {IMAGES:,} train2014 images would be "
                  f"{cache.features.nbytes * IMAGES / images / 1e9:,.1f} GB)")

        if args.build_sample:
            seconds, megabytes = question_dataset_build_cost(args.build_sample, rng)
            scale = QUESTIONS / args.build_sample
            print(f"real QuestionDataset items: {seconds:.2f} s and {megabytes:.0f} MB for {args.build_sample:,} "
                  f"questions -> about {seconds * scale:.0f} s and {megabytes * scale:.0f} MB for {QUESTIONS:,}")

        rates = read_rates(cache, rng)
        print(f"reading every image once in shuffled batches of {BATCH_IMAGES}: {rates['disk']:,.0f} MB/s of rows "
              f"from a memmap on the disk (dropped from the page cache first); FeatureCache.get (float16 -> float32 "
              f"tensor) {rates['get, disk']:,.0f} MB/s from the disk, {rates['get, page cache']:,.0f} MB/s from the "
              "page cache")

        collator = VQACollator(ImageSource({}, feature_cache=cache), ANSWERS)
        if args.data_epochs:
            print(f"\ndata path alone (sampler + items + collator + cache), batch {args.batch_sizes[0]}, "
                  "all questions:")
        for row in data_path_epochs(dataset, collator, args.batch_sizes[0], args.data_epochs):
            print(f"  epoch {row['epoch']}: {row['samples_per_s']:8.0f} samples/s, {row['images_per_batch']:.0f} "
                  f"images per batch, {row['read_mb_per_s']:,.0f} MB/s of features, RssAnon {row['RssAnon']:.0f} MB, "
                  f"RssFile {row['RssFile']:.0f} MB")

        model = build_model(glimpses)
        sample_batch = collator([dataset[i] for i in range(max(args.batch_sizes))])
        mean_tokens = float(lengths.mean())
        images_per_question = len(cache) / len(dataset)
        flops = flops_per_sample(model.config, mean_tokens, images_per_question, map_size**2)
        print("\nFLOPs per question, forward: " + ", ".join(
            f"{k} {v / 1e6:.1f}M" for k, v in flops.items() if k not in ("forward", "training")))
        check = sample_batch
        analytic = flops_per_sample(model.config, check["lengths"].float().mean().item(),
                                    check["image_features"].shape[0] / len(check["lengths"]), map_size**2)
        counted = counted_forward_flops(model.eval(), check)
        print(f"  forward {flops['forward'] / 1e6:.1f} MFLOP, training {flops['training'] / 1e6:.1f} MFLOP; "
              f"FlopCounterMode on one batch's forward: {counted / (analytic['forward'] * len(check['lengths'])):.3f}x "
              "the analytic count")
        del model

        results = {}
        for batch_size in args.batch_sizes:
            before = matmul_rates()
            run = train_steps(build_model(glimpses), dataset, collator, batch_size, steps + args.warmup, args.warmup,
                              tmp / "trainer")
            after = matmul_rates()
            rate = {k: (before[k] + after[k]) / 2 for k in before}
            results[batch_size] = run
            achieved, achieved_cpu = flops["training"] * run["samples_per_s"], flops["training"] * run["samples_per_cpu_s"]
            print(f"\ntraining, batch {batch_size}: {run['samples_per_s']:.1f} samples/s (median step "
                  f"{run['step_s']:.2f} s, {steps} steps after {args.warmup} warm-up), peak memory so far "
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

        model = build_model(glimpses)
        batch = {k: v[:best] if k != "image_features" else v for k, v in sample_batch.items()}
        print(f"\nwhere a training step goes (self CPU time, batch {best}):")
        for name, share in profile_step(model, batch):
            print(f"  {100 * share:5.1f} %  {name}")
        variants = question_lstm_variants(model, batch)
        print(f"model.question_encoder.lstm alone, forward + backward, batch {best}: packed (as VQAModel runs it) "
              f"{variants['packed']:.2f} s, one call per length {variants['by length']:.2f} s "
              f"(same h and c within {variants['max difference']:.1e})")
        del model, batch, sample_batch
        release_memory()
        if not args.memory_epochs:
            print(f"peak resident memory of the whole run: {peak_rss_mb():.0f} MB")
            return 0

        before = rss()
        memory = train_steps(build_model(glimpses), dataset.subset(memory_questions), collator, 128, 0, 0,
                             tmp / "memory", epochs=args.memory_epochs)
        print(f"\ntraining {args.memory_epochs} epochs over {memory_questions:,} questions (batch 128): "
              f"resident memory before: RssAnon {before['RssAnon']:.0f} MB; after each epoch:")
        for epoch, row in enumerate(memory["epoch_rss"], 1):
            print(f"  epoch {epoch}: RssAnon {row['RssAnon']:.0f} MB, RssFile {row['RssFile']:.0f} MB")
        print(f"peak resident memory of the whole run: {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
