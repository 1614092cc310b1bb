"""VQA v2 from download to a test-dev results file, in five steps, each skipped once its output is complete.

    run_pipeline(PipelineOptions(root="data", out="checkpoints/vqa-v2"))   # what training/vqa_v2.py runs

1. download   train, val and test-dev into ROOT (vqa/download.py: resumable, verified)
2. features   the frozen CNN over the images of each split, into OUT.features/{train,val,test-dev}
              (vqa/extraction.py: resumable, sharded under torchrun)
3. train      on train2014, part of its images held out to choose the epoch (vqa/trainer.py) -> OUT
4. evaluate   val2014 with the official metric -> OUT/eval-val (vqa/evaluation.py)
5. test-dev   answers -> OUT/results-test-dev/vqa_OpenEnded_mscoco_test-dev2015_ALG_results.json

A step's `complete` function is the one place that says whether its output is done; a run after
a crash skips the complete steps and continues the others where they stopped (a partial
download resumes, a cache keeps its rows, training resumes from its last Trainer checkpoint).
val2014 is scored once by step 4, not by the trainer's test split, so that it goes through the
CNN once (its cached features) and not a second time from pixels.

Under torchrun every process runs the features and train steps (each takes its share); the
download and the two evaluations run in the main process, the others waiting for the download.
"""

import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .batching import screen_images
from .checkpoint import WEIGHTS_FILE, read_card
from .config import TrainOptions, VQAConfig, check_options
from .download import MANIFEST, SPLITS, archives_for, fetch, unpacked
from .errors import CheckpointError, DataError, OptionError
from .evaluation import METRICS_FILE, RESULTS_FILE, SKIPPED_FILE, run_evaluation
from .extraction import extract_features
from .feature_cache import read_index, shard_folders
from .files import atomic_write_text
from .metrics import load_results
from .model import VQAModel
from .records import load_vqa_split
from .report import REPORT_FILE
from .trainer import train

# The official file names that vqa/download.py unpacks into ROOT (docs/vqa-v2.md, section 1).
TRAIN_QUESTIONS = "v2_OpenEnded_mscoco_train2014_questions.json"
TRAIN_ANNOTATIONS = "v2_mscoco_train2014_annotations.json"
VAL_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VAL_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
TEST_DEV_QUESTIONS = "v2_OpenEnded_mscoco_test-dev2015_questions.json"
TEST_QUESTIONS = "v2_OpenEnded_mscoco_test2015_questions.json"
# Feature cache folder -> (questions, image folder): only the images the questions ask about.
# "train" is the folder vqa/trainer.py reads; test-dev asks about 36,807 of test2015's 81,434 images.
CACHES = {"train": (TRAIN_QUESTIONS, "train2014"), "val": (VAL_QUESTIONS, "val2014"),
          "test-dev": (TEST_DEV_QUESTIONS, "test2015")}
EVAL_VAL = "eval-val"
RESULTS_TEST_DEV = "results-test-dev"
# What vqa/card.py's `measure` writes into every card: without them the checkpoint was not finished.
CARD_FACTS = ("val_accuracy", "training_time_s", "command")
# The recipe of docs/vqa-v2.md, section 3, where it differs from TrainOptions' defaults: 512
# questions per step (the paper's 500), 30 epochs, 2 % of the training images held out.
RECIPE = {"epochs": 30.0, "batch_size": 512, "val_fraction": 0.02}
WAIT_S = 5.0  # how often torchrun's other processes look whether the main one has downloaded


def results_file_name(algorithm: str) -> str:
    """The name the VQA evaluation server's instructions give a results file
    (vqa_[task]_[data]_[subset]_[alg]_results.json, as in GT-Vision-Lab/VQA's Results folder)."""
    return f"vqa_OpenEnded_mscoco_test-dev2015_{algorithm}_results.json"


@dataclass
class PipelineOptions:
    """What a run of the pipeline needs. `training` holds the TrainOptions of step 3 (its
    output_dir, dataset and data files are set by the pipeline); `model` the VQAConfig options
    (backbone, image_size, sizes, attention, freeze_backbone)."""

    root: str  # the VQA v2 folder: archives and what they unpack
    out: str = "checkpoints/vqa-v2"  # the checkpoint; OUT/eval-val, OUT/results-test-dev beside its files
    mirror: str | None = None  # another host serving the official paths (vqa/download.py)
    progress: bool = True
    algorithm: str = "lstm-cnn"  # the ALG of the results file's name
    training: TrainOptions = field(default_factory=lambda: TrainOptions(**RECIPE))
    model: dict = field(default_factory=lambda: {"freeze_backbone": True})
    command: list[str] | None = None  # the command line, for the card's "reproduce with"

    @property
    def frozen(self) -> bool:
        return bool(self.model.get("freeze_backbone"))

    @property
    def feature_cache(self) -> Path:
        out = Path(self.out)
        return Path(self.training.feature_cache or out.with_name(out.name + ".features"))

    def data(self, name: str) -> Path:
        return Path(self.root) / name


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


# ---------------------------------------------------------------- 1. download

def download_what(options: PipelineOptions) -> str:
    source = f" from {options.mirror}" if options.mirror else ""
    return f"VQA v2 {', '.join(SPLITS)} and their COCO images{source} into {options.root}"


def download_complete(options: PipelineOptions) -> str | None:
    if unpacked(options.root, SPLITS):
        return f"{options.root} is complete ({len(archives_for(SPLITS))} archives unpacked, says {MANIFEST})"
    return None


def download(options: PipelineOptions) -> None:
    fetch(options.root, list(SPLITS), mirror=options.mirror, progress=options.progress,
          log=lambda message: print(f"  {message}", flush=True))


# ---------------------------------------------------------------- 2. features

def features_what(options: PipelineOptions) -> str:
    if not options.frozen:
        return "none: the backbone is fine-tuned, so its features change and are not cached"
    return (f"{options.model.get('backbone') or VQAConfig().backbone} features of "
            f"{', '.join(f'{images}/ ({name})' for name, (_, images) in CACHES.items())} into {options.feature_cache}/")


@functools.lru_cache(maxsize=None)
def _image_ids(questions: Path, size: int, mtime: float) -> tuple[int, ...]:
    """The image ids a questions file asks about, read once per version of the file (train2014's
    file is 443,757 questions; the step's checks would read it three times)."""
    return tuple(load_vqa_split(questions).image_ids)


def _wanted_images(options: PipelineOptions, name: str) -> tuple[int, ...]:
    path = options.data(CACHES[name][0])
    stat = path.stat()
    return _image_ids(path, stat.st_size, stat.st_mtime)


def cache_complete(options: PipelineOptions, name: str) -> bool:
    """Every image the split's questions ask about is in the cache's index, or listed as
    unreadable (--skip-bad-images), and no shard of an interrupted torchrun is left to merge."""
    folder = options.feature_cache / name
    if shard_folders(folder):
        return False
    done = set(read_index(folder))
    listing = folder / SKIPPED_FILE
    if listing.is_file():
        done.update(s["image_id"] for s in json.loads(listing.read_text()))
    return done.issuperset(_wanted_images(options, name))


def features_complete(options: PipelineOptions) -> str | None:
    if not options.frozen:
        return "nothing to cache, the backbone is fine-tuned"
    if all(cache_complete(options, name) for name in CACHES):
        return f"{options.feature_cache}/ is complete ({', '.join(CACHES)})"
    return None


def extraction_model(options: PipelineOptions) -> VQAModel:
    """The CNN as step 3 builds it: the same options and weights, and with random weights
    (no --pretrained) the same seed, so that training finds its features already cached
    (its cache's meta.json holds the weights' digest and refuses any other)."""
    torch.manual_seed(options.training.seed)  # vqa/trainer.py seeds, then builds the backbone first
    config = VQAConfig(**options.model)
    return VQAModel(config, pretrained_backbone=options.training.backbone_weights or options.training.pretrained)


def features(options: PipelineOptions) -> None:
    model = None
    skip_bad = options.training.skip_bad_images
    for name, (questions, images) in CACHES.items():
        folder = options.feature_cache / name
        if cache_complete(options, name):
            log(f"  {name}: complete ({len(read_index(folder)):,} images in {folder})")
            continue
        # The project's bad-image policy first: a missing file is named now, not after hours.
        split = screen_images(load_vqa_split(options.data(questions), None, options.data(images)), skip_bad)
        model = model or extraction_model(options)
        started = time.time()
        cache = extract_features(model, split.image_paths, folder, batch_size=64, progress=options.progress,
                                 skip_bad_images=skip_bad)
        skipped = [{k: s[k] for k in ("image_id", "path", "error")} for s in split.skipped] + cache.skipped
        if skipped and is_main_process():
            atomic_write_text(folder / SKIPPED_FILE, json.dumps(skipped, indent=2))
        log(f"  {name}: {len(cache):,} images, {'x'.join(map(str, cache.feature_shape))} float16 each, "
            f"{time.time() - started:.1f} s" + (f"; {len(skipped)} unreadable, listed in {folder / SKIPPED_FILE}"
                                                 if skipped else ""))


# ---------------------------------------------------------------- 3. train

def training_options(options: PipelineOptions) -> TrainOptions:
    """Step 3's TrainOptions: train2014, with --val-fraction of its images held out; resumed
    from the last Trainer checkpoint that an interrupted run left."""
    out = Path(options.out)
    work = out.with_name(out.name + ".trainer")
    return replace(options.training, output_dir=str(out), dataset="files",
                   train_questions=str(options.data(TRAIN_QUESTIONS)),
                   train_annotations=str(options.data(TRAIN_ANNOTATIONS)),
                   train_images=str(options.data("train2014")), test_questions=None, test_annotations=None,
                   test_images=None, feature_cache=str(options.feature_cache),
                   resume=any(work.glob(f"{PREFIX_CHECKPOINT_DIR}-*")))


def train_what(options: PipelineOptions) -> str:
    epochs, held_out = options.training.epochs, options.training.val_fraction
    return (f"{epochs:g} epoch{'s' if epochs != 1 else ''} on train2014 ({held_out:.0%} of its images held out "
            f"to choose the epoch) into {options.out}")


def train_complete(options: PipelineOptions) -> str | None:
    """The checkpoint is saved whole or not at all (vqa/checkpoint.py renames its folder into
    place); its card holds the facts measured after training."""
    out = Path(options.out)
    if not (out / WEIGHTS_FILE).is_file():
        return None
    try:
        card = read_card(out)
    except CheckpointError:
        return None
    if not all(k in card for k in CARD_FACTS):
        return None
    return f"{out} is complete (validation accuracy {card['val_accuracy']} %)"


def train_step(options: PipelineOptions) -> None:
    settings = training_options(options)
    if settings.resume:
        log(f"  continuing from the last checkpoint in {settings.output_dir}.trainer")
    train(settings, options.model, options.command or ["training/vqa_v2.py", "--root", options.root,
                                                         "--out", options.out])


# ---------------------------------------------------------------- 4. evaluate val

def evaluate_what(options: PipelineOptions) -> str:
    return f"{options.out} on val2014 with the official metric into {Path(options.out) / EVAL_VAL}"


def evaluate_complete(options: PipelineOptions) -> str | None:
    """write_evaluation writes results.json, metrics.json, then report.md last."""
    folder = Path(options.out) / EVAL_VAL
    if not (folder / REPORT_FILE).is_file() or not (folder / METRICS_FILE).is_file():
        return None
    try:
        overall = json.loads((folder / METRICS_FILE).read_text())["overall"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return f"{folder / METRICS_FILE} is complete (overall {overall} %)"


def _cache_for(options: PipelineOptions, name: str) -> Path | None:
    return options.feature_cache / name if options.frozen else None


def _log_warning(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def evaluate_val(options: PipelineOptions) -> None:
    metrics, _ = run_evaluation(Path(options.out) / EVAL_VAL, checkpoint=options.out,
                                questions=options.data(VAL_QUESTIONS), annotations=options.data(VAL_ANNOTATIONS),
                                images=options.data("val2014"), feature_cache=_cache_for(options, "val"),
                                skip_bad_images=options.training.skip_bad_images, progress=options.progress,
                                log=_log_warning)
    log(f"  VQA accuracy on val2014: {metrics['overall']} % over {len(metrics['perQuestion']):,} questions "
        f"(per answer type: {', '.join(f'{k} {v}' for k, v in metrics['perAnswerType'].items())})")


# ---------------------------------------------------------------- 5. test-dev results

def submission_path(options: PipelineOptions) -> Path:
    return Path(options.out) / RESULTS_TEST_DEV / results_file_name(options.algorithm)


def results_what(options: PipelineOptions) -> str:
    return f"answers to the test-dev questions into {submission_path(options)}"


def results_complete(options: PipelineOptions) -> str | None:
    """The upload file is written last, atomically."""
    path = submission_path(options)
    return f"{path} is complete" if path.is_file() else None


def results_test_dev(options: PipelineOptions) -> None:
    """results.json of the test-dev questions (run_evaluation), then the file to upload: the
    evaluation server (EvalAI) takes answers to every test2015 question also in its test-dev
    phase, and scores the test-dev ones; the others are given "" (as LLaVA's
    scripts/convert_vqav2_for_submission.py does)."""
    folder = Path(options.out) / RESULTS_TEST_DEV
    _, skipped = run_evaluation(folder, checkpoint=options.out, questions=options.data(TEST_DEV_QUESTIONS),
                                images=options.data("test2015"), feature_cache=_cache_for(options, "test-dev"),
                                skip_bad_images=options.training.skip_bad_images, progress=options.progress,
                                log=_log_warning)
    answers = {r["question_id"]: r["answer"] for r in load_results(folder / RESULTS_FILE)}
    test = [r["question_id"] for r in load_vqa_split(options.data(TEST_QUESTIONS)).records]
    outside = set(answers).difference(test)
    if outside:
        raise DataError(f"{len(outside)} test-dev questions (first: {min(outside)}) are not in "
                        f"{options.data(TEST_QUESTIONS)}: test-dev is a subset of test2015")
    upload = [{"question_id": q, "answer": answers.get(q, "")} for q in test]
    atomic_write_text(submission_path(options), json.dumps(upload))
    unanswered = sum(len(s["question_ids"]) for s in skipped)
    log(f"  {len(answers):,} test-dev answers"
        + (f" ({unanswered} questions on unreadable images left empty)" if unanswered else "")
        + f"; the {len(upload) - len(answers):,} other test2015 questions get \"\"")


# ---------------------------------------------------------------- the steps

@dataclass(frozen=True)
class Step:
    name: str
    what: Callable[[PipelineOptions], str]
    complete: Callable[[PipelineOptions], str | None]  # why it is skipped ("X is complete"), or None
    run: Callable[[PipelineOptions], None]
    every_process: bool  # under torchrun: every process runs it (else the main one)


STEPS = (
    Step("download", download_what, download_complete, download, every_process=False),
    Step("features", features_what, features_complete, features, every_process=True),
    Step("train", train_what, train_complete, train_step, every_process=True),
    Step("evaluate-val", evaluate_what, evaluate_complete, evaluate_val, every_process=False),
    Step("results-test-dev", results_what, results_complete, results_test_dev, every_process=False),
)


def check(options: PipelineOptions) -> None:
    """Every setting before any step: a bad flag costs a second, not a download."""
    check_options(vars(options.training), fields(TrainOptions))
    check_options(options.model, fields(VQAConfig))
    if not options.algorithm or not options.algorithm.replace("-", "").replace("_", "").isalnum():
        raise OptionError(f"--algorithm {options.algorithm!r}: use letters, digits, - and _ only "
                        "(it goes into the results file's name)")


def run_pipeline(options: PipelineOptions, steps=STEPS) -> None:
    """Run the steps in order, each skipped when its output is complete. Raises the VQAError of
    a failed step (after printing which step failed and when)."""
    check(options)
    if not (options.training.pretrained or options.training.backbone_weights):
        log("note: the CNN has random weights (no --pretrained or --backbone-weights): fine for a test run, "
            "not for a model of VQA v2")
    main = is_main_process()
    last_everywhere = max(i for i, step in enumerate(steps) if step.every_process)
    try:
        for number, step in enumerate(steps, 1):
            if not main and number - 1 > last_everywhere:
                return  # the rest is the main process's
            log(f"step {number}/{len(steps)} {step.name}: {step.what(options)}")
            done = step.complete(options)
            if done is not None:
                log(f"  skipped: {done}")
                continue
            if not main and not step.every_process:
                while step.complete(options) is None:  # torchrun stops this process if the main one fails
                    time.sleep(WAIT_S)
                continue
            started = time.time()
            try:
                step.run(options)
            except BaseException:  # VQAError, a signal, anything: the step's time is still worth saying
                log(f"  failed after {time.time() - started:.1f} s")
                raise
            log(f"  done in {time.time() - started:.1f} s")
    finally:
        if torch.distributed.is_initialized():  # started by the extraction under torchrun
            PartialState().destroy_process_group()
