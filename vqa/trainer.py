"""Training and fine-tuning on transformers.Trainer.

The Trainer gives DDP under torchrun, --resume, mixed precision, gradient clipping,
the learning-rate schedule, TensorBoard logs and the progress bar. This module adds
what is VQA-specific: image-grouped batches, the VQA accuracy for choosing the best
epoch, answer-vocabulary extension for fine-tuning, the signals; `vqa.card` measures the
result and writes the checkpoint, `vqa.reliability.fit` its reliability files.
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
from accelerate import PartialState
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .answers import build_answer_vocabulary
from .batching import (ImageGroupedSampler, ImageSource, QuestionDataset, VQACollator, require_scene_graphs,
                       screen_images)
from .card import measure, save_run
from .checkpoint import load_checkpoint
from .config import TrainOptions, VQAConfig, check_options
from .errors import DataError, VQAError
from .extraction import extract_features
from .hf_parquet import load_hf_split
from .model import VQAModel
from .programs import side_target_vocabulary
from .records import VQASplit, load_vqa_split, split_by_image
from .reliability.fit import fit_reliability
from .text import TOKENIZER_FILE, QuestionTokenizer
from .worlds.registry import BUILTIN_DATASETS, load_builtin


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""


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
                               allow_nonstandard_answers=allow, scenes_file=options.train_scene_graphs)
        test = None
        if options.test_questions:
            test = load_vqa_split(options.test_questions, options.test_annotations, options.test_images,
                                  allow_nonstandard_answers=allow)
        return train, None, test
    if options.dataset == "hf":
        if not options.hf_path:
            raise DataError("--dataset hf needs --hf-path (a .parquet file, a folder of them, or a Hub name "
                            "such as lmms-lab/VQAv2)")
        allow = options.allow_nonstandard_answers
        with PartialState().main_process_first():  # under torchrun, one process converts, the others read
            train = load_hf_split(options.hf_path, options.hf_split, allow_nonstandard_answers=allow)
            test = (load_hf_split(options.hf_path, options.hf_test_split, allow_nonstandard_answers=allow)
                    if options.hf_test_split else None)
        return train, None, test
    raise DataError(f"unknown dataset {options.dataset!r}: use {', '.join(BUILTIN_DATASETS)}, 'files' or 'hf'")


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
            facts.update(fit_reliability_files(run))
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
    if model_options.get("attention_supervision_weight") and model_options.get("attention_glimpses"):
        require_scene_graphs(train_part)  # before the feature cache, not after it
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
    attention = None
    if model.config.attention_supervision_weight and model.config.attention_glimpses:
        attention = (model.config.attention_hops, model.image_transform().input_size)
    val = QuestionDataset(run.val, run.tokenizer, answer_index, max_tokens, side, attention)
    families = [r.get("question_type", "") for r in val.records]
    trainer = VQATrainer(
        model=model, args=args,
        train_dataset=QuestionDataset(run.train, run.tokenizer, answer_index, max_tokens, side, attention),
        eval_dataset=val, data_collator=VQACollator(run.sources["train"], len(answer_index), len(side or ())),
        compute_metrics=functools.partial(vqa_accuracy_metric, families=families),
        callbacks=[stop, run.clock], optimizers=(optimizer_for(model, options), None),
    )
    trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    if stop.received is not None:
        raise TrainingInterrupted(f"stopped by {stop.received}; the last checkpoint is in {run.work}: "
                                  "run the same command with --resume to continue")
    if options.save_half:
        round_to_half(model)  # measure what is stored: the card's accuracy is that of the float16 weights
    model.eval()
    return trainer


def round_to_half(model: torch.nn.Module) -> None:
    """Round every floating-point weight and buffer to float16 precision, in place."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def fit_reliability_files(run: Run) -> dict:
    """Fit the reliability files (vqa/reliability/fit.py) into OUTPUT_DIR.trainer/reliability;
    their facts for the card."""
    folder = run.work / "reliability"
    folder.mkdir(exist_ok=True)
    # The answer threshold is chosen on what the app sees: validation images from pixels, not a
    # cache's float16 features (they moved the pooled model's threshold by 1e-5).
    val_pixels = ImageSource(run.val.image_paths, run.model.image_transform())
    return fit_reliability(run.model, run.tokenizer, run.train, run.sources["train"], run.val, val_pixels,
                           folder, run.options.seed)


