"""Training and fine-tuning on transformers.Trainer.

The Trainer gives DDP under torchrun, --resume, mixed precision, gradient clipping,
the learning-rate schedule, TensorBoard logs and the progress bar. This module adds
what is VQA-specific: image-grouped batches, the VQA accuracy for choosing the best
epoch, answer-vocabulary extension for fine-tuning, the model card and the curves.
"""

import functools
import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .answers import build_answer_vocabulary
from .checkpoint import load_checkpoint, render_card, save_checkpoint
from .config import VQAConfig, check_options, option
from .data import (BUILTIN_DATASETS, ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, VQASplit,
                   load_builtin, load_vqa_split, screen_images, split_by_image)
from .errors import DataError, VQAError
from .evaluation import predict_split
from .extraction import extract_features
from .metrics import blind_baseline, evaluate_results
from .model import VQAModel, architecture
from .programs import side_target_vocabulary
from .reliability import RELIABILITY_FILES, fit_reliability
from .text import TOKENIZER_FILE, QuestionTokenizer


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


@dataclass
class TrainOptions:
    """Options of a training run. The model's own options (sizes, backbone, attention) are
    VQAConfig's fields; `training/train.py` offers both."""

    output_dir: str = option("checkpoints/my-model", "checkpoint folder to write (Trainer state goes to OUTPUT_DIR.trainer)")
    dataset: str = option("easy-vqa", "'easy-vqa' or 'shapes-world' (built in), or 'files' (VQA v2 layout)")
    train_scenes: int | None = option(None, "shapes-world: training scenes, generated and cached on first use "
                                             "(default 6,000; validation and test stay the built-in splits)",
                                      low=1, high=10_000_000)
    train_questions: str | None = option(None, "questions JSON of the training split (--dataset files)")
    train_annotations: str | None = option(None, "annotations JSON of the training split (--dataset files)")
    train_images: str | None = option(None, "image folder of the training split (--dataset files)")
    test_questions: str | None = option(None, "questions JSON of a test split, scored once at the end")
    test_annotations: str | None = option(None, "annotations JSON of the test split")
    test_images: str | None = option(None, "image folder of the test split")
    pretrained: bool = option(False, "start the backbone from ImageNet weights in the local timm/Hugging Face cache")
    backbone_weights: str | None = option(None, "start the backbone from this .safetensors weights file")
    top_answers: int = option(3129, "answer vocabulary: the most frequent normalised answers", low=1, high=100_000)
    tokenizer_vocab: int = option(4000, "SentencePiece vocabulary size (fewer when the questions have fewer pieces)",
                                  low=8, high=1_000_000)
    epochs: float = option(10, "training epochs", above=0, high=100_000)
    batch_size: int = option(128, "questions per step and process", low=1, high=1_000_000)
    learning_rate: float = option(1e-3, "peak learning rate of the heads (cosine schedule with warm-up)",
                                  low=0, high=10)
    backbone_learning_rate: float | None = option(
        None, "learning rate of the CNN (default: --learning-rate); a CNN trained from scratch wants less",
        low=0, high=10)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0, high=10)
    warmup_ratio: float = option(0.05, "fraction of the steps spent warming up the learning rate", low=0, high=0.99)
    max_grad_norm: float = option(5.0, "gradient clipping norm", above=0)
    val_fraction: float = option(0.1, "fraction of the training images held out for validation (no val split)",
                                 above=0, high=0.9)
    seed: int = option(0, "seed of initialisation, split and batch order")
    init_from: str | None = option(None, "fine-tune this checkpoint: keep its tokenizer and answers, add new ones")
    resume: bool = option(False, "continue from the last complete checkpoint in OUTPUT_DIR.trainer")
    num_workers: int = option(0, "data loading processes", low=0, high=256)
    feature_cache: str | None = option(None, "feature cache folder (frozen backbone); default OUTPUT_DIR.features")
    max_train_questions: int | None = option(None, "use only this many training questions (a quick run)", low=1)
    skip_bad_images: bool = option(False, "drop unreadable images (listed in OUTPUT_DIR/skipped_images.json) "
                                          "instead of stopping before the first step")
    allow_nonstandard_answers: bool = option(False, "accept questions with other than 10 human answers")
    save_half: bool = option(False, "store the final weights in float16 (half the size)")
    logging_steps: int = option(20, "steps between loss logs", low=1)


def exit_status(run) -> int:
    """A training script's exit status for `run()`: 0, or 2 with "error: ..." for a mistake the
    project names (VQAError), or 130 when a signal stopped training (the checkpoint is kept)."""
    try:
        run()
    except VQAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stopped:
        print(str(stopped), file=sys.stderr)
        return 130
    return 0


def run_command(argv: list[str]) -> str:
    """The command that reproduces a run: `--resume` continues a run, it does not define one."""
    return " ".join(shlex.quote(a) for a in ["python", *argv] if a != "--resume")


def load_training_data(options: TrainOptions) -> tuple[VQASplit, VQASplit | None, VQASplit | None]:
    """(train, validation or None to hold out part of train, test or None)."""
    if options.dataset in BUILTIN_DATASETS:
        splits = BUILTIN_DATASETS[options.dataset]
        val = load_builtin(options.dataset, "val") if "val" in splits else None
        train = load_builtin(options.dataset, "train", scenes=options.train_scenes)
        return train, val, load_builtin(options.dataset, "test")
    if options.train_scenes is not None:
        raise DataError("--train-scenes sets the size of the built-in shapes world: it needs --dataset shapes-world")
    if options.dataset == "files":
        if not (options.train_questions and options.train_annotations and options.train_images):
            raise DataError("--dataset files needs --train-questions, --train-annotations and --train-images")
        allow = options.allow_nonstandard_answers
        train = load_vqa_split(options.train_questions, options.train_annotations, options.train_images,
                               allow_nonstandard_answers=allow)
        test = None
        if options.test_questions:
            test = load_vqa_split(options.test_questions, options.test_annotations, options.test_images,
                                  allow_nonstandard_answers=allow)
        return train, None, test
    raise DataError(f"unknown dataset {options.dataset!r}: use {', '.join(BUILTIN_DATASETS)} or 'files'")


def extend_answers(model: VQAModel, answers: list[str]) -> VQAModel:
    """Append answers the model does not know; known answers keep their classifier rows."""
    old = model.config.answers
    new = [a for a in answers if a not in set(old)]
    if not new:
        return model
    last: nn.Linear = model.classifier[-1]
    grown = nn.Linear(last.in_features, len(old) + len(new))
    with torch.no_grad():
        grown.weight[: len(old)] = last.weight
        grown.bias[: len(old)] = last.bias
    model.classifier[-1] = grown
    labels = old + new
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {a: i for i, a in enumerate(labels)}
    return model


def vqa_accuracy_metric(eval_pred, families: list[str] | None = None) -> dict[str, float]:
    """Mean target score of the top answer. Targets are `answers.vqa_accuracy` of each
    answer, so this is the official VQA accuracy of the predictions, in percent; with the
    question type of each row (`families`), also per type as `vqa_accuracy_<type>`."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    top = np.asarray(logits).argmax(-1)
    scores = np.asarray(labels)[np.arange(len(top)), top]
    metrics = {"vqa_accuracy": float(100.0 * scores.mean())}
    if families is not None and len(families) == len(scores):
        kinds = np.asarray(families)
        for family in sorted(set(families)):
            metrics[f"vqa_accuracy_{family}"] = float(100.0 * scores[kinds == family].mean())
    return metrics


def last_complete_checkpoint(work: Path) -> Path | None:
    """The newest Trainer checkpoint that was written to the end.

    The Trainer writes trainer_state.json last; a checkpoint without a readable one was
    cut short (e.g. SIGKILL during the save) and is removed, so that resuming never
    starts from half a checkpoint and the one before it stays the last good one.
    """
    if not work.is_dir():
        return None
    candidates = sorted(
        (p for p in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for folder in reversed(candidates):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return folder
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            print(f"removing incomplete checkpoint {folder}", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    return None


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, stop.

    Once training is over, the Trainer's last checkpoint holds every step and what is left is
    measuring and the final save, which a resumed run would only redo: the first signal then
    lets them finish and says so. A second signal, at any time, stops at once (KeyboardInterrupt);
    the final save renames a whole folder into place, so the old one or the new one is left.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None  # the signal that stops training
        self.after_training = None  # the signal received once training was over
        self.training_over = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None or self.after_training is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if self.training_over:
            self.after_training = name
            print(f"\n{name} received after training: finishing the final save (a second signal stops at once; "
                  "the last checkpoint stays for --resume)", file=sys.stderr)
            return
        self.received = name
        print(f"\n{self.received} received: saving a checkpoint and stopping (resume with --resume)", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A signal before this point stops the run (fit checks `received`); after it, none is lost.
        self.training_over = True


def optimizer_for(model: VQAModel, options: TrainOptions) -> torch.optim.Optimizer:
    """AdamW with the backbone in its own group, so that it can learn at its own rate."""
    backbone = [p for p in model.image_encoder.backbone.parameters() if p.requires_grad]
    in_backbone = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    groups = [{"params": heads, "lr": options.learning_rate}]
    if backbone:
        groups.append({"params": backbone, "lr": options.backbone_learning_rate or options.learning_rate})
    return torch.optim.AdamW(groups, lr=options.learning_rate, weight_decay=options.weight_decay)


class VQATrainer(Trainer):
    """Trainer whose training batches group questions by image (one CNN pass per image)."""

    def _get_train_sampler(self, *args, **kwargs):
        return ImageGroupedSampler(self.train_dataset, seed=self.args.seed,
                                   drop_tail=self.args.per_device_train_batch_size * self.args.world_size)


def plot_curves(log_history: list[dict], path: Path) -> Path:
    """Loss, validation accuracy, and validation accuracy per question type (what was learned when)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["epoch"], h["loss"]) for h in log_history if "loss" in h]
    val_loss = [(h["epoch"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    val_acc = [(h["epoch"], h["eval_vqa_accuracy"]) for h in log_history if "eval_vqa_accuracy" in h]
    prefix = "eval_vqa_accuracy_"
    families = sorted({k[len(prefix):] for h in log_history for k in h if k.startswith(prefix)})
    fig, axes = plt.subplots(1, 3 if families else 2, figsize=(15 if families else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if val_loss:
        ax_loss.plot(*zip(*val_loss), "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log")  # side losses start 10x higher
    ax_loss.legend()
    if val_acc:
        ax_acc.plot(*zip(*val_acc), "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="VQA accuracy (%)", title="Validation accuracy")
    ax_acc.grid(alpha=0.3)
    if families:
        for family in families:
            points = [(h["epoch"], h[prefix + family]) for h in log_history if prefix + family in h]
            axes[2].plot(*zip(*points), ".-", label=family)
        axes[2].set(xlabel="epoch", ylabel="VQA accuracy (%)", title="Validation accuracy per question type")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prepare_data(options: TrainOptions) -> tuple[VQASplit, VQASplit, VQASplit | None, list[dict]]:
    """(train, validation, test, skipped images), every image screened before any step runs."""
    train_all, val, test = load_training_data(options)
    train_all = screen_images(train_all, options.skip_bad_images)
    skipped = list(train_all.skipped)
    if val is not None:
        val = screen_images(val, options.skip_bad_images)
        skipped += val.skipped
    else:
        train_all, val = split_by_image(train_all, options.val_fraction, options.seed)
    if test is not None and test.image_paths:
        test = screen_images(test, options.skip_bad_images)
        skipped += test.skipped
    if options.max_train_questions:
        train_all.records = train_all.records[: options.max_train_questions]
    clash = [i for i in val.image_paths if train_all.image_paths.get(i, val.image_paths[i]) != val.image_paths[i]]
    if clash:
        raise DataError(f"image id {clash[0]} names two files, {train_all.image_paths[clash[0]]} (train) and "
                        f"{val.image_paths[clash[0]]} (validation): image ids must be unique across the splits")
    if skipped:
        print(f"--skip-bad-images: skipped {len(skipped)} unreadable images:",
              *(s["error"] for s in skipped), sep="\n  ", file=sys.stderr)
    return train_all, val, test, skipped


def build_model(options: TrainOptions, model_options: dict, train: VQASplit, work: Path,
                resume: Path | None) -> tuple[VQAModel, QuestionTokenizer]:
    """A new model (its tokenizer trained on the training questions), or a fine-tuned one."""
    answers = build_answer_vocabulary((r["answers"] for r in train.records), options.top_answers)
    if options.init_from:
        model, tokenizer = load_checkpoint(options.init_from)
        return extend_answers(model.train(), answers), tokenizer
    if resume is not None and (work / TOKENIZER_FILE).is_file():
        tokenizer = QuestionTokenizer.load(work)
    else:
        tokenizer = QuestionTokenizer.train((r["question"] for r in train.records), options.tokenizer_vocab)
    tokenizer.save(work)  # a resumed run needs the same pieces
    side = side_target_vocabulary(train.records) if model_options.get("side_loss_weight") else None
    config = VQAConfig(**model_options, vocab_size=len(tokenizer), id2label=dict(enumerate(answers)),
                       label2id={a: i for i, a in enumerate(answers)}, side_targets=side)
    return VQAModel(config, pretrained_backbone=options.backbone_weights or options.pretrained), tokenizer


def image_sources(model: VQAModel, options: TrainOptions, splits: dict[str, VQASplit]) -> dict[str, ImageSource]:
    """An ImageSource per split: pixels through the model's transform, or, with a frozen
    backbone, rows of a feature cache that is filled once (each image through the CNN once)."""
    out = Path(options.output_dir)
    sources = {}
    for name, split in splits.items():
        if model.config.freeze_backbone:
            folder = Path(options.feature_cache or out.with_name(out.name + ".features")) / name
            cache = extract_features(model, split.image_paths, folder, skip_bad_images=options.skip_bad_images)
            sources[name] = ImageSource(split.image_paths, feature_cache=cache)
        else:
            sources[name] = ImageSource(split.image_paths, model.image_transform())
    return sources


def training_arguments(options: TrainOptions, work: Path) -> TrainingArguments:
    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(work), num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size * 2, learning_rate=options.learning_rate,
        weight_decay=options.weight_decay, warmup_steps=options.warmup_ratio, lr_scheduler_type="cosine",
        max_grad_norm=options.max_grad_norm, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="vqa_accuracy", greater_is_better=True,
        logging_strategy="steps", logging_steps=options.logging_steps, report_to=["tensorboard"],
        seed=options.seed, data_seed=options.seed, bf16=use_cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not use_cuda, dataloader_num_workers=options.num_workers, dataloader_pin_memory=use_cuda,
        remove_unused_columns=False, label_names=["labels"], save_only_model=False,
        ddp_find_unused_parameters=False,
    )


class RunClock(TrainerCallback):
    """Training time summed over every invocation of a run (a resumed run adds to it), kept in
    OUTPUT_DIR.trainer/run.json with the command that reproduces the run."""

    def __init__(self, work: Path, command: str, resumed: bool):
        self.path = work / "run.json"
        self.started = time.time()
        self.before = 0.0
        self.command = command
        if resumed and self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.before, self.command = saved["training_time_s"], saved["command"]

    def total(self) -> float:
        return self.before + time.time() - self.started

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.write_text(json.dumps({"training_time_s": self.total(), "command": self.command}))


def official_scores(model: VQAModel, tokenizer: QuestionTokenizer, split: VQASplit, source: ImageSource) -> dict:
    """The official metric (overall, per answer type, per question type) of the model on `split`."""
    predictions = predict_split(model, tokenizer, split, feature_cache=source.feature_cache, progress=False)
    return evaluate_results(predictions.results, split)


def subset_accuracy(scores: dict, split: VQASplit, keep) -> float:
    """Mean official accuracy (%) over the questions of `split` for which keep(record) is true."""
    values = [scores["perQuestion"][r["question_id"]] for r in split.records if keep(r)]
    return round(sum(values) / len(values), 2) if values else float("nan")


@dataclass
class Run:
    """Everything a training run builds before the Trainer starts."""

    options: TrainOptions
    work: Path  # OUTPUT_DIR.trainer: Trainer checkpoints, logs, run.json
    train: VQASplit
    val: VQASplit
    test: VQASplit | None
    skipped: list[dict]
    resume: Path | None
    clock: "RunClock"
    model: VQAModel
    tokenizer: QuestionTokenizer
    sources: dict[str, ImageSource]


def train(options: TrainOptions, model_options: dict | None = None, argv: list[str] | None = None) -> dict:
    """Train (or fine-tune) and write the checkpoint to options.output_dir: build -> train ->
    measure -> save. Returns the facts in its card ({} in torchrun's other processes).

    `model_options`: VQAConfig fields (sizes, backbone, attention), ignored when fine-tuning.
    """
    # Every setting is checked before any data is read: a bad flag costs a second, not a run.
    check_options(vars(options), fields(TrainOptions))
    check_options(model_options or {}, fields(VQAConfig))
    run = build_run(options, model_options or {}, argv if argv is not None else sys.argv)
    handlers = {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS}
    try:
        trainer = fit(run)
        try:
            # Every process evaluates (the Trainer gathers their predictions); only the first
            # measures and writes: torchrun's two processes once fitted the reliability files at
            # once and raced on their files. The others end here rather than wait at a barrier,
            # which would time out (ddp_timeout, 30 min) while the first scores a large test
            # split, and torchrun would then stop the first mid-save.
            val_accuracy = round(trainer.evaluate()["eval_vqa_accuracy"], 2)
            if not trainer.is_world_process_zero():
                return {}
            facts = measure(run, trainer, val_accuracy)
            save_run(run, trainer, facts)
            return facts
        except KeyboardInterrupt:  # StopOnSignal's second signal, training being over
            raise TrainingInterrupted(f"stopped before the final save was done; the last checkpoint, of the last "
                                      f"step, is in {run.work}: run the same command with --resume to finish") from None
    finally:  # fit's StopOnSignal handlers end with the run (in-process they outlived it)
        for sig, handler in handlers.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, handler)


def build_run(options: TrainOptions, model_options: dict, argv: list[str]) -> Run:
    out = Path(options.output_dir)
    work = out.with_name(out.name + ".trainer")
    torch.manual_seed(options.seed)
    train_part, val_part, test, skipped = prepare_data(options)
    work.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(work) if options.resume else None
    if options.resume and resume is None:
        print(f"--resume: no complete checkpoint in {work}; starting from the beginning", file=sys.stderr)
    clock = RunClock(work, run_command(argv), resume is not None)
    model, tokenizer = build_model(options, model_options, train_part, work, resume)
    # One source serves training and validation batches: image ids are unique across the two.
    splits = {"train": train_part.subset(train_part.image_ids + val_part.image_ids, "train+val")}
    splits["train"].image_paths = {**train_part.image_paths, **val_part.image_paths}
    sources = image_sources(model, options, splits)
    if test is not None:
        # The test split is scored from pixels, as the app and evaluate.py see it: a cache's
        # float16 features flipped enough answers to move a family's accuracy by 0.05 points.
        sources["test"] = ImageSource(test.image_paths, model.image_transform())
    return Run(options, work, train_part, val_part, test, skipped, resume, clock, model, tokenizer, sources)


def fit(run: Run) -> Trainer:
    """The Trainer's run, from the last complete checkpoint with --resume; the best epoch by
    validation accuracy is loaded at the end."""
    options, model = run.options, run.model
    answer_index, max_tokens = model.config.label2id, model.config.max_question_tokens
    args = training_arguments(options, run.work)
    batch = options.batch_size * args.world_size
    if len(run.train.records) < batch:
        raise DataError(f"{len(run.train.records)} training questions, fewer than one batch of {batch} "
                        "(--batch-size times processes): lower --batch-size or give more data")
    stop = StopOnSignal()
    side = model.config.side_targets if model.config.side_loss_weight else None
    val = QuestionDataset(run.val, run.tokenizer, answer_index, max_tokens, side)
    families = [r.get("question_type", "") for r in val.records]
    trainer = VQATrainer(
        model=model, args=args,
        train_dataset=QuestionDataset(run.train, run.tokenizer, answer_index, max_tokens, side),
        eval_dataset=val, data_collator=VQACollator(run.sources["train"], len(answer_index), len(side or ())),
        compute_metrics=functools.partial(vqa_accuracy_metric, families=families),
        callbacks=[stop, run.clock], optimizers=(optimizer_for(model, options), None),
    )
    trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    if stop.received is not None:
        raise TrainingInterrupted(f"stopped by {stop.received}; the last checkpoint is in {run.work}: "
                                  "run the same command with --resume to continue")
    if options.save_half:
        # Measure what is stored: the card's accuracy is that of the float16 weights.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
    model.eval()
    return trainer


def measure(run: Run, trainer: Trainer, val_accuracy: float) -> dict:
    """The card's facts: validation accuracy (`trainer.evaluate()`'s), the reliability fits, and
    the test split scored once (after every choice was made on validation), beside a
    question-only baseline."""
    options, model = run.options, run.model
    facts = {
        "dataset": options.dataset if options.dataset != "files" else run.train.name,
        "backbone": model.config.backbone, "attention_glimpses": model.config.attention_glimpses,
        "answers": len(model.config.label2id), "train_questions": len(trainer.train_dataset),
        "val_questions": len(trainer.eval_dataset), "val_accuracy": val_accuracy,
    }
    if run.skipped:
        facts["skipped_images"] = len(run.skipped)
    reliability = run.work / "reliability"
    reliability.mkdir(exist_ok=True)
    facts.update(fit_reliability(model, run.tokenizer, run.train, run.sources["train"], run.val,
                                 run.sources["train"], reliability, options.seed))
    test = run.test
    if test is not None and test.has_answers:
        scores = official_scores(model, run.tokenizer, test, run.sources["test"])
        facts.update({"test_questions": len(test.records), "test_accuracy": scores["overall"],
                      "test_accuracy_per_answer_type": scores["perAnswerType"],
                      "test_accuracy_per_question_type": scores["perQuestionType"]})
        if "perTemplate" in scores:
            facts["test_accuracy_per_template"] = scores["perTemplate"]
        blind = blind_baseline(run.train.records, test.records)
        facts["blind_test_accuracy"] = blind["overall"]
        facts["blind_test_accuracy_per_question_type"] = blind["per_family"]
        if any("relation" in r for r in test.records):  # spatial-relation questions, where pooling fails
            facts["test_accuracy_relation_questions"] = subset_accuracy(scores, test, lambda r: r.get("relation"))
    stage1 = stage1_facts(options.backbone_weights)
    if stage1:
        facts["stage1"] = stage1
    facts.update({"epochs": options.epochs, "seed": options.seed, "init_from": options.init_from,
                  "training_time_s": round(run.clock.total()), "command": run.clock.command})
    return facts


def stage1_facts(backbone_weights: str | None) -> dict | None:
    """What the stage-1 encoder's card says (vqa/scene_encoder.py writes encoder.json beside its
    weights): its command, seed, time and held-out accuracy, for this model's card."""
    settings = Path(backbone_weights).with_name("encoder.json") if backbone_weights else None
    if settings is None or not settings.is_file():
        return None
    facts = json.loads(settings.read_text())
    return {k: facts[k] for k in ("command", "seed", "training_time_s", "val_accuracy", "train_scenes") if k in facts}


def save_run(run: Run, trainer: Trainer, facts: dict) -> Path:
    work, model = run.work, run.model
    extra = {"training_curves.png": plot_curves(trainer.state.log_history, work / "training_curves.png")}
    extra.update({name: work / "reliability" / name for name in RELIABILITY_FILES})
    if run.skipped:
        (work / "skipped_images.json").write_text(json.dumps(run.skipped, indent=2))
        extra["skipped_images.json"] = work / "skipped_images.json"
    card = render_card(facts, model_card_body(facts, model.config))
    out = save_checkpoint(model, run.tokenizer, run.options.output_dir, card, extra_files=extra,
                          half=run.options.save_half)
    print(f"saved {out}: " + ", ".join(f"{k}={facts[k]}" for k in ("val_accuracy", "test_accuracy") if k in facts))
    return out


def _accuracy_table(title: str, scores: dict, blind: dict | None = None) -> list[str]:
    if blind is None:
        rows = [f"| {name} | {value:.2f} |" for name, value in sorted(scores.items())]
        return ["", f"| {title} | test VQA accuracy (%) |", "|---|---|", *rows]
    rows = [f"| {name} | {value:.2f} | {blind.get(name, float('nan')):.2f} |" for name, value in sorted(scores.items())]
    return ["", f"| {title} | test VQA accuracy (%) | question-only baseline (%) |", "|---|---|---|", *rows]


def model_card_body(facts: dict, config: VQAConfig) -> str:
    lines = [
        f"# VQA model: {architecture(config)}",
        "",
        'Antol et al. 2015, "deeper LSTM Q + norm I": L2-normalised CNN features and the LSTM question',
        "vector are fused by elementwise product and classified over the answer vocabulary.",
        "",
        f"- Dataset: {facts['dataset']} ({facts['train_questions']} training questions, {facts['val_questions']} validation)",
        f"- Answers: {facts['answers']}: {', '.join(config.answers[:20])}{' ...' if facts['answers'] > 20 else ''}",
        f"- Validation VQA accuracy: {facts['val_accuracy']} %",
    ]
    if "test_accuracy" in facts:
        lines.append(f"- Test VQA accuracy: {facts['test_accuracy']} % ({facts['test_questions']} questions)")
    lines.append(f"- Seed: {facts['seed']}, training time: {facts['training_time_s']} s")
    if "test_accuracy_per_answer_type" in facts:
        lines += _accuracy_table("answer type", facts["test_accuracy_per_answer_type"])
        lines += _accuracy_table("question type", facts["test_accuracy_per_question_type"],
                                 facts.get("blind_test_accuracy_per_question_type"))
    if "test_accuracy_per_template" in facts:
        lines += _accuracy_table("template", facts["test_accuracy_per_template"])
    if "blind_test_accuracy" in facts:
        lines.append(f"\nQuestion-only baseline (most frequent training answer of the same question text): "
                     f"{facts['blind_test_accuracy']} % overall.")
    if "test_accuracy_relation_questions" in facts:
        lines.append(f"Questions with a spatial relation: {facts['test_accuracy_relation_questions']} %.")
    if "stage1" in facts:
        stage1 = facts["stage1"]
        held_out = ", ".join(f"{k} {v:.2f} %" for k, v in stage1.get("val_accuracy", {}).items())
        lines += ["", "Two stages: the CNN first learned the scenes' objects from their graphs (stage 1, "
                  f"{stage1.get('training_time_s')} s, seed {stage1.get('seed')}; held out: {held_out}), "
                  "then stayed frozen while the question side trained on its cached maps (stage 2).", "",
                  "Reproduce with stage 1, then stage 2:", "", "```", stage1.get("command", ""), facts["command"], "```"]
    else:
        lines += ["", "Reproduce with:", "", "```", facts["command"], "```"]
    lines += ["", "![training curves](training_curves.png)"]
    return "\n".join(lines)
