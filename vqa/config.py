"""VQAConfig: every size of the model, and the answer vocabulary (id2label); TrainOptions: the
settings of a training run. Each with its help text and allowed values.

The one place an option is written: `training/train.py` builds its command-line
options from these fields (their `help`), so sizes are never copied elsewhere.
"""

import math
from dataclasses import dataclass, field, fields, make_dataclass

from transformers import PretrainedConfig

from .errors import OptionError


def option(default, help: str, low=None, high=None, above=None, choices=None):
    """A field with the help text that `--help` prints and its allowed values, which `check_options`
    enforces: low <= value <= high, value > above, value in choices (None always passes)."""
    allowed = {k: v for k, v in (("low", low), ("high", high), ("above", above), ("choices", choices)) if v is not None}
    return field(default=default, metadata={"help": help, **allowed})


def cli_dataclass(name: str, specs) -> type:
    """A dataclass of these fields for HfArgumentParser, with their defaults and help text only:
    the parser passes every metadata key to argparse, and the ranges are `check_options`' job."""
    return make_dataclass(name, [(f.name, f.type, field(default=f.default, metadata={"help": f.metadata["help"]}))
                                 for f in specs])


def _allowed(meta: dict) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    low = f"more than {meta['above']}" if "above" in meta else f"at least {meta['low']}" if "low" in meta else ""
    high = f"at most {meta['high']}" if "high" in meta else ""
    return " and ".join(p for p in (low, high) if p)


def check_options(values: dict, specs, where: str = "--") -> None:
    """Raise OptionError naming the first value outside its field's allowed range.

    `specs`: dataclass fields (their metadata holds the ranges); `where`: "--" names flags
    (--attention-hops), anything else prefixes the field name (config.json: image_size).
    """
    for spec in specs:
        meta, value = spec.metadata, values.get(spec.name)
        if value is None or not any(k in meta for k in ("low", "high", "above", "choices")):
            continue
        name = f"--{spec.name.replace('_', '-')}" if where == "--" else f"{where}{spec.name}"
        if "choices" in meta:
            ok = value in meta["choices"]
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            ok = False
        else:
            ok = (value >= meta.get("low", -math.inf) and value <= meta.get("high", math.inf)
                  and value > meta.get("above", -math.inf))
        if not ok:
            raise OptionError(f"{name} must be {_allowed(meta)}, not {value!r}")


class VQAConfig(PretrainedConfig):
    """Configuration of `VQAModel` (Antol et al. 2015, "deeper LSTM Q + norm I").

    Defaults follow the published baseline (GT-Vision-Lab/VQA_LSTM_CNN) except the
    backbone, which is any timm model by name. transformers 5 configs are dataclasses:
    each field below is a keyword argument.
    """

    model_type = "vqa_lstm_cnn"

    backbone: str = option("resnet18", "timm model name of the image encoder (e.g. resnet10t, resnet152)")
    image_size: int | None = option(None, "model input side in pixels (default: the backbone's)", low=16, high=2048)
    crop_pct: float | None = option(None, "kept for old checkpoints: images are letterboxed whole, never cropped")
    freeze_backbone: bool = option(False, "keep the CNN fixed; its features are computed once and cached")
    output_stride: int | None = option(None, "timm output_stride (8 or 16): a finer CNN map for attention",
                                        choices=(8, 16, 32))
    image_feature_dim: int | None = option(None, "size of the CNN features (set by the model)")
    vocab_size: int = option(4000, "SentencePiece pieces (set from the trained tokenizer)", low=2, high=1_000_000)
    embed_dim: int = option(300, "word embedding size", low=1, high=8192)
    lstm_hidden: int = option(512, "hidden units per LSTM layer", low=1, high=8192)
    lstm_layers: int = option(2, "LSTM layers; the question vector is h and c of every layer", low=1, high=8)
    common_dim: int = option(1024, "size of the common space where image and question vectors are multiplied",
                             low=1, high=16384)
    classifier_hidden: int = option(1000, "hidden units of the answer classifier", low=1, high=16384)
    dropout: float = option(0.5, "dropout before each classifier layer (and on attention scores)", low=0.0, high=0.95)
    max_question_tokens: int = option(32, "longer questions are truncated to this many pieces", low=1, high=1024)
    attention_glimpses: int = option(
        0, "0: the paper's pooled image vector; G > 0: G glimpses of question-guided attention over "
           "the CNN's spatial map (Kazemi & Elqursh 2017), still fused by elementwise product", low=0, high=16)
    attention_coords: bool = option(
        False, "append each map location's (x, y) to its features (CoordConv, Liu et al. 2018): "
               "something for 'left of' to read")
    attention_hops: int = option(
        1, "stacked attention (Yang et al. 2016): hop k's query is the question vector (x) hop k-1's "
           "attended image vector", low=1, high=8)
    attention_counts: bool = option(
        False, "each glimpse also says how much it found: the sum of its locations' sigmoid scores, as "
               "soft bins 0..15, beside its attended features (a count that softmax weights normalise away)")
    attention_all_hops: bool = option(
        False, "the answer reads every hop's glimpses (one Linear over all of them), not only the last "
               "hop's: a comparison sees both objects")
    attention_hop_product: bool = option(
        False, "with --attention-all-hops: the hops' image vectors are multiplied elementwise (each after "
               "its tanh) instead of summed, so that 'the same colour as' is a product the classifier reads")
    question_word_path: bool = option(
        False, "add the mean of the question's word embeddings, projected, to the LSTM's question vector "
               "(a word-level path beside the LSTM state)")
    side_loss_weight: float = option(
        0.0, "training only: weight of the side loss that predicts, from the question vector, what the "
             "question names (from its program, or its words); 0 turns it off. Inference is unchanged",
        low=0.0, high=100.0)
    attention_supervision_weight: float = option(
        0.0, "training only: weight of the side loss that tells each hop's first glimpse which objects "
             "the question's program looks at (needs the scene graphs: CLEVR-format scenes); 0 turns it off",
        low=0.0, high=100.0)
    side_targets: list[str] = option(
        None, "names of the side-loss targets (set from the training questions)")

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary in index order."""
        return [self.id2label[i] for i in range(len(self.id2label))]


# Fields the model sets itself (from the backbone and the tokenizer): not options of a run.
DERIVED_FIELDS = ("image_feature_dim", "vocab_size", "side_targets")


def model_options() -> list:
    """The dataclass fields of VQAConfig's own options (not PretrainedConfig's, not derived)."""
    own = VQAConfig.__annotations__
    return [f for f in fields(VQAConfig) if f.name in own and f.name not in DERIVED_FIELDS]


@dataclass
class TrainOptions:
    """Options of a training run. The model's own options (sizes, backbone, attention) are
    VQAConfig's fields; `training/train.py` offers both."""

    output_dir: str = option("checkpoints/my-model", "checkpoint folder to write (Trainer state goes to OUTPUT_DIR.trainer)")
    dataset: str = option("easy-vqa", "'easy-vqa' or 'shapes-world' (built in), 'files' (VQA v2 layout) "
                                   "or 'hf' (VQA v2 parquet, --hf-path)")
    train_scenes: int | None = option(None, "shapes-world: training scenes, generated and cached on first use "
                                             "(default 6,000; validation and test stay the built-in splits)",
                                      low=1, high=10_000_000)
    train_questions: str | None = option(None, "questions JSON of the training split (--dataset files)")
    train_annotations: str | None = option(None, "annotations JSON of the training split (--dataset files)")
    train_images: str | None = option(None, "image folder of the training split (--dataset files)")
    train_scene_graphs: str | None = option(None, "CLEVR-format scenes JSON of the training images (--dataset "
                                                   "files): what --attention-supervision-weight reads")
    hf_path: str | None = option(None, "VQA v2 parquet for --dataset hf (a file, a folder of them, or a Hugging Face "
                                         "dataset name such as lmms-lab/VQAv2), converted once into the cache")
    hf_split: str = option("train", "the parquet split to train on (--dataset hf; lmms-lab/VQAv2 has "
                                    "validation and testdev)")
    hf_test_split: str | None = option(None, "a parquet split to score once at the end (--dataset hf)")
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
