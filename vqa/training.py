"""Training and fine-tuning on transformers.Trainer.

The Trainer gives DDP under torchrun, --resume, mixed precision, gradient clipping,
the learning-rate schedule, TensorBoard logs and the progress bar. This module adds
what is VQA-specific: image-grouped batches, the VQA accuracy for choosing the best
epoch, answer-vocabulary extension for fine-tuning, the model card and the curves.
"""

import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .answers import build_answer_vocabulary
from .checkpoint import load_checkpoint, render_card, save_checkpoint
from .config import VQAConfig
from .data import (ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, VQASplit, drop_bad_images,
                   load_easy_vqa, load_vqa_split, split_by_image)
from .errors import DataError
from .features import extract_features
from .model import VQAModel
from .text import QuestionTokenizer


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


@dataclass
class TrainOptions:
    output_dir: str = "checkpoints/my-model"
    dataset: str = "easy-vqa"  # "easy-vqa" or "files"
    train_questions: str | None = None  # VQA v2-layout files when dataset == "files"
    train_annotations: str | None = None
    train_images: str | None = None
    test_questions: str | None = None
    test_annotations: str | None = None
    test_images: str | None = None
    backbone: str = "resnet18"
    pretrained: bool | str = False  # False, True (local cache) or a weights file
    freeze_backbone: bool = False
    image_size: int | None = None
    crop_pct: float | None = None
    embed_dim: int = 300
    lstm_hidden: int = 512
    lstm_layers: int = 2
    common_dim: int = 1024
    classifier_hidden: int = 1000
    dropout: float = 0.5
    top_answers: int = 3129
    tokenizer_vocab: int = 4000
    epochs: float = 10
    batch_size: int = 128  # questions per step and process
    learning_rate: float = 1e-3
    backbone_learning_rate: float | None = None  # a trained-from-scratch CNN wants less than the heads
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 5.0
    val_fraction: float = 0.1
    seed: int = 0
    init_from: str | None = None
    resume: bool = False
    num_workers: int = 0
    feature_cache: str | None = None  # folder; default <output_dir>/features when the backbone is frozen
    max_train_questions: int | None = None  # a quick run on part of the data
    skip_bad_images: bool = False  # drop unreadable images (listed in the output) instead of failing
    save_half: bool = False  # store the final weights in float16
    logging_steps: int = 20
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in ["python", *sys.argv]))


def load_training_data(options: TrainOptions) -> tuple[VQASplit, VQASplit | None]:
    if options.dataset == "easy-vqa":
        return load_easy_vqa("train"), load_easy_vqa("test")
    if options.dataset == "files":
        if not (options.train_questions and options.train_annotations and options.train_images):
            raise DataError("--dataset files needs --train-questions, --train-annotations and --train-images")
        train = load_vqa_split(options.train_questions, options.train_annotations, options.train_images)
        test = None
        if options.test_questions:
            test = load_vqa_split(options.test_questions, options.test_annotations, options.test_images)
        return train, test
    raise DataError(f"unknown dataset {options.dataset!r}: use 'easy-vqa' or 'files'")


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


def vqa_accuracy_metric(eval_pred) -> dict[str, float]:
    """Mean target score of the top answer. Targets are `answers.vqa_accuracy` of each
    answer, so this is the official VQA accuracy of the predictions, in percent."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    top = np.asarray(logits).argmax(-1)
    return {"vqa_accuracy": float(100.0 * np.asarray(labels)[np.arange(len(top)), top].mean())}


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
    """SIGINT / SIGTERM: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint and stopping (resume with --resume)", file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["epoch"], h["loss"]) for h in log_history if "loss" in h]
    val_loss = [(h["epoch"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    val_acc = [(h["epoch"], h["eval_vqa_accuracy"]) for h in log_history if "eval_vqa_accuracy" in h]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train")
    if val_loss:
        ax_loss.plot(*zip(*val_loss), "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    if val_acc:
        ax_acc.plot(*zip(*val_acc), "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="VQA accuracy (%)", title="Validation accuracy")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(options: TrainOptions) -> dict:
    """Train (or fine-tune) and write the checkpoint to options.output_dir. Returns the facts in its card."""
    started = time.time()
    out = Path(options.output_dir)
    work = out.with_name(out.name + ".trainer")  # Trainer checkpoints, TensorBoard logs
    torch.manual_seed(options.seed)
    full_train, test = load_training_data(options)
    skipped = []
    if options.skip_bad_images:
        full_train = drop_bad_images(full_train)
        skipped = list(full_train.skipped_images)
        if test is not None and test.image_paths:
            test = drop_bad_images(test)
            skipped += test.skipped_images
        if skipped:
            print(f"--skip-bad-images: skipped {len(skipped)} unreadable images:", *skipped, sep="\n  ", file=sys.stderr)
    train_part, val_part = split_by_image(full_train, options.val_fraction, options.seed)
    if options.max_train_questions:
        train_part.records = train_part.records[: options.max_train_questions]

    work.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(work) if options.resume else None
    if options.resume and resume is None:
        print(f"--resume: no complete checkpoint in {work}; starting from the beginning", file=sys.stderr)
    answers = build_answer_vocabulary((r["answers"] for r in train_part.records), options.top_answers)
    if options.init_from:
        model, tokenizer = load_checkpoint(options.init_from)
        model.train()
        extend_answers(model, answers)
    elif resume is not None and (work / "tokenizer.model").is_file():
        tokenizer = QuestionTokenizer.load(work)
    else:
        tokenizer = QuestionTokenizer.train((r["question"] for r in train_part.records), options.tokenizer_vocab)
    if not options.init_from:
        tokenizer.save(work)  # a resumed run needs the same pieces
        config = VQAConfig(
            backbone=options.backbone, image_size=options.image_size, crop_pct=options.crop_pct,
            freeze_backbone=options.freeze_backbone, vocab_size=len(tokenizer), embed_dim=options.embed_dim,
            lstm_hidden=options.lstm_hidden, lstm_layers=options.lstm_layers, common_dim=options.common_dim,
            classifier_hidden=options.classifier_hidden, dropout=options.dropout,
            id2label=dict(enumerate(answers)), label2id={a: i for i, a in enumerate(answers)},
        )
        model = VQAModel(config, pretrained_backbone=options.pretrained)
    config = model.config
    answer_index = config.label2id

    test_images = None
    if config.freeze_backbone:
        cache_dir = Path(options.feature_cache or out.with_name(out.name + ".features"))
        cache = extract_features(model, full_train.image_paths, cache_dir / "train")
        images = ImageSource(full_train.image_paths, feature_cache=cache)
        if test is not None and test.image_paths:
            test_images = ImageSource(test.image_paths, feature_cache=extract_features(model, test.image_paths, cache_dir / "test"))
    else:
        transform = model.image_transform()
        images = ImageSource(full_train.image_paths, transform)
        if test is not None:
            test_images = ImageSource(test.image_paths, transform)

    max_tokens = config.max_question_tokens
    train_set = QuestionDataset(train_part, tokenizer, answer_index, max_tokens)
    val_set = QuestionDataset(val_part, tokenizer, answer_index, max_tokens)
    use_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size * 2,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup_ratio,
        lr_scheduler_type="cosine",
        max_grad_norm=options.max_grad_norm,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="vqa_accuracy",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=options.logging_steps,
        report_to=["tensorboard"],
        seed=options.seed,
        data_seed=options.seed,
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not use_cuda,
        dataloader_num_workers=options.num_workers,
        dataloader_pin_memory=use_cuda,
        remove_unused_columns=False,
        label_names=["labels"],
        save_only_model=False,
        ddp_find_unused_parameters=False,
    )
    stop = StopOnSignal()
    trainer = VQATrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
        data_collator=VQACollator(images, len(answer_index)), compute_metrics=vqa_accuracy_metric,
        callbacks=[stop], optimizers=(optimizer_for(model, options), None),
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.received is not None:
        raise TrainingInterrupted(f"stopped by {stop.received}; the last checkpoint is in {work}: "
                                  "run the same command with --resume to continue")
    if options.save_half:
        # Measure what is stored: the card's accuracy is that of the float16 weights.
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())
    val_metrics = trainer.evaluate()
    facts = {
        "dataset": options.dataset if options.dataset == "easy-vqa" else full_train.name,
        "backbone": config.backbone,
        "answers": len(answer_index),
        "train_questions": len(train_set),
        "val_questions": len(val_set),
        "val_accuracy": round(val_metrics["eval_vqa_accuracy"], 2),
    }
    if skipped:
        facts["skipped_images"] = len(skipped)
    if test is not None and test.has_answers:
        # The test split is scored once, after every choice has been made on validation.
        test_set = QuestionDataset(test, tokenizer, answer_index, max_tokens)
        trainer.data_collator = VQACollator(test_images, len(answer_index))
        test_metrics = trainer.evaluate(test_set, metric_key_prefix="test")
        facts["test_questions"] = len(test_set)
        facts["test_accuracy"] = round(test_metrics["test_vqa_accuracy"], 2)
    facts.update({"epochs": options.epochs, "seed": options.seed, "init_from": options.init_from,
                  "training_time_s": round(time.time() - started), "command": options.command})
    if trainer.is_world_process_zero():
        curves = plot_curves(trainer.state.log_history, work / "training_curves.png")
        save_checkpoint(model, tokenizer, out, render_card(facts, model_card_body(facts, config)),
                        extra_files={"training_curves.png": curves}, half=options.save_half)
        print(f"saved {out}: " + ", ".join(f"{k}={facts[k]}" for k in ("val_accuracy", "test_accuracy") if k in facts))
    return facts


def model_card_body(facts: dict, config: VQAConfig) -> str:
    lines = [
        f"# VQA model: {config.backbone} + {config.lstm_layers}-layer LSTM",
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
    lines += [f"- Seed: {facts['seed']}, training time: {facts['training_time_s']} s", "", "Reproduce with:", "",
              "```", facts["command"], "```", "", "![training curves](training_curves.png)"]
    return "\n".join(lines)

