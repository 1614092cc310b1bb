"""VQAConfig: every size of the model, and the answer vocabulary (id2label).

The one place a model option is written: `training/train.py` builds its command-line
options from these fields (their `help`), so sizes are never copied elsewhere.
"""

from dataclasses import field, fields

from transformers import PretrainedConfig


def option(default, help: str):
    """A config field with the help text that `--help` prints."""
    return field(default=default, metadata={"help": help})


class VQAConfig(PretrainedConfig):
    """Configuration of `VQAModel` (Antol et al. 2015, "deeper LSTM Q + norm I").

    Defaults follow the published baseline (GT-Vision-Lab/VQA_LSTM_CNN) except the
    backbone, which is any timm model by name. transformers 5 configs are dataclasses:
    each field below is a keyword argument.
    """

    model_type = "vqa_lstm_cnn"

    backbone: str = option("resnet18", "timm model name of the image encoder (e.g. resnet10t, resnet152)")
    image_size: int | None = option(None, "model input side in pixels (default: the backbone's)")
    crop_pct: float | None = option(None, "kept for old checkpoints: images are letterboxed whole, never cropped")
    freeze_backbone: bool = option(False, "keep the CNN fixed; its features are computed once and cached")
    output_stride: int | None = option(None, "timm output_stride (8 or 16): a finer CNN map for attention")
    image_feature_dim: int | None = option(None, "size of the CNN features (set by the model)")
    vocab_size: int = option(4000, "SentencePiece pieces (set from the trained tokenizer)")
    embed_dim: int = option(300, "word embedding size")
    lstm_hidden: int = option(512, "hidden units per LSTM layer")
    lstm_layers: int = option(2, "LSTM layers; the question vector is h and c of every layer")
    common_dim: int = option(1024, "size of the common space where image and question vectors are multiplied")
    classifier_hidden: int = option(1000, "hidden units of the answer classifier")
    dropout: float = option(0.5, "dropout before each classifier layer (and on attention scores)")
    max_question_tokens: int = option(32, "longer questions are truncated to this many pieces")
    attention_glimpses: int = option(
        0, "0: the paper's pooled image vector; G > 0: G glimpses of question-guided attention over "
           "the CNN's spatial map (Kazemi & Elqursh 2017), still fused by elementwise product")

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary in index order."""
        return [self.id2label[i] for i in range(len(self.id2label))]


# Fields the model sets itself (from the backbone and the tokenizer): not options of a run.
DERIVED_FIELDS = ("image_feature_dim", "vocab_size")


def model_options() -> list:
    """The dataclass fields of VQAConfig's own options (not PretrainedConfig's, not derived)."""
    own = VQAConfig.__annotations__
    return [f for f in fields(VQAConfig) if f.name in own and f.name not in DERIVED_FIELDS]
