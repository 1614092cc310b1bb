"""VQAConfig: every size of the model, and the answer vocabulary (id2label)."""

from transformers import PretrainedConfig


class VQAConfig(PretrainedConfig):
    """Configuration of `VQAModel` (Antol et al. 2015, "deeper LSTM Q + norm I").

    Defaults follow the published baseline (GT-Vision-Lab/VQA_LSTM_CNN) except the
    backbone, which is any timm model by name. transformers 5 configs are dataclasses:
    each field below is a keyword argument.
    """

    model_type = "vqa_lstm_cnn"

    backbone: str = "resnet18"  # any timm model name
    image_size: int | None = None  # input side in pixels; None = the backbone's default
    crop_pct: float | None = None  # centre-crop fraction; None = the backbone's default
    freeze_backbone: bool = False  # True: CNN features are fixed (and cacheable)
    image_feature_dim: int | None = None  # backbone.num_features, filled in by the model
    vocab_size: int = 4000  # SentencePiece pieces (set from the trained tokenizer)
    embed_dim: int = 300  # word embedding
    lstm_hidden: int = 512  # hidden units per LSTM layer
    lstm_layers: int = 2
    common_dim: int = 1024  # the space where image and question vectors are multiplied
    classifier_hidden: int = 1000
    dropout: float = 0.5
    max_question_tokens: int = 32  # longer questions are truncated to this many pieces

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary in index order."""
        return [self.id2label[i] for i in range(len(self.id2label))]
