"""The model, read top to bottom: ImageEncoder -> QuestionEncoder -> VQAModel.

Antol et al. 2015 ("VQA: Visual Question Answering"), "deeper LSTM Q + norm I":
the L2-normalised CNN feature and the LSTM question vector are each mapped into a
common space with Linear + tanh, multiplied elementwise, and classified over the
top answers.
"""

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .config import VQAConfig
from .errors import CheckpointError
from .images import ModelTransform


def _cached_weights_file(name: str) -> str:
    """The path of timm model `name`'s ImageNet weights (model.safetensors) in the local
    Hugging Face cache, found with huggingface_hub's `try_to_load_from_cache`: nothing is
    downloaded, and nothing process-wide (such as HF_HUB_OFFLINE) is changed to make sure of it."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    found = try_to_load_from_cache(hub_id, "model.safetensors") if hub_id else None
    if not isinstance(found, str):
        raise CheckpointError(
            f"no pretrained weights for timm model {name!r} in the local timm/Hugging Face cache "
            f"(looked for {hub_id or 'a Hugging Face hub id'}/model.safetensors). Put them in the cache, "
            "pass the path of a .safetensors weights file instead, or train from scratch without --pretrained."
        )
    return found


def create_backbone(name: str, pretrained: bool | str = False, output_stride: int | None = None) -> nn.Module:
    """A timm model that returns pooled features (num_classes=0).

    `pretrained`: False (random init), True (ImageNet weights from the local timm /
    Hugging Face cache: nothing is downloaded), or the path of a weights file.
    `output_stride` (8, 16) keeps a finer spatial map by dilating the last stages.
    """
    options = {"num_classes": 0}
    if output_stride:
        options["output_stride"] = output_stride
    if pretrained is False:
        return timm.create_model(name, pretrained=False, **options)
    if pretrained is True:
        path = _cached_weights_file(name)
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise CheckpointError(f"backbone weights file not found: {path}")
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"backbone weights {path}: only .safetensors files are loaded (pickle files can run code). "
                "Convert a trusted file with: python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\""
            )
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **options)


def normalise(features: torch.Tensor) -> torch.Tensor:
    """"norm I": unit L2 norm over the last (feature) dimension, then scaled by sqrt(F) so that
    components have unit RMS. Unscaled, each component is ~1/sqrt(F) and a freshly initialised
    Linear + tanh passes almost nothing on: a backbone trained from scratch then barely learns."""
    return F.normalize(features.float(), dim=-1) * features.shape[-1] ** 0.5


class QuestionGuidedAttention(nn.Module):
    """Where to look, per question: G softmax maps over the CNN's locations.

    Each location's feature and the question vector meet in the common space by elementwise
    product (the fusion the whole model uses), and a Linear gives one score per glimpse
    (Kazemi & Elqursh 2017, "Show, Ask, Attend, and Answer", with product instead of concat).
    """

    def __init__(self, feature_dim: int, common_dim: int, glimpses: int, dropout: float):
        super().__init__()
        self.locations = nn.Linear(feature_dim, common_dim)
        self.dropout = nn.Dropout(dropout)
        self.scores = nn.Linear(common_dim, glimpses)

    def forward(self, grid: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """grid (N, L, F) normalised features, question (B, C) -> weights (B, L, G), each glimpse summing to 1."""
        keys = torch.tanh(self.locations(grid))  # (N, L, C): once per image, not per question
        scores = self.scores(self.dropout(keys[image_index] * question[:, None]))  # (B, L, G)
        return scores.softmax(dim=1)


class ImageEncoder(nn.Module):
    """CNN features -> L2-normalise -> (attention) -> Linear -> tanh, into the common space."""

    def __init__(self, config: VQAConfig, pretrained: bool | str = False):
        super().__init__()
        self.backbone = create_backbone(config.backbone, pretrained, config.output_stride)
        self.glimpses = config.attention_glimpses
        if self.glimpses:
            feature_dim = self.backbone.num_features  # channels of forward_features' map
            self.attention = QuestionGuidedAttention(feature_dim, config.common_dim, self.glimpses, config.dropout)
        else:
            # Pooled output size: timm's head_hidden_size where a pre-logits layer follows pooling
            # (MobileNetV3, EfficientNet-style heads), num_features otherwise.
            feature_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        config.image_feature_dim = feature_dim
        self.project = nn.Linear(feature_dim * max(self.glimpses, 1), config.common_dim)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the CNN gives, and what the feature cache stores: pooled (N, F), or with
        attention the spatial map (N, F, h, w)."""
        if self.glimpses:
            return self.backbone.forward_features(pixel_values)
        return self.backbone(pixel_values)

    def grid(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) map -> (N, h*w, F), each location normalised."""
        return normalise(features.flatten(2).transpose(1, 2))

    def attention_weights(self, features: torch.Tensor, question: torch.Tensor,
                          image_index: torch.Tensor) -> torch.Tensor:
        """(B, G, h, w) attention maps of each question over its image's map."""
        weights = self.attention(self.grid(features), question, image_index)  # (B, L, G)
        return weights.transpose(1, 2).unflatten(2, features.shape[2:])

    def forward(self, features: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Image vector (B, C) of each question: features (N, ...) of each image once, question (B, C)."""
        if not self.glimpses:
            # The pooled image vector does not depend on the question: project each image once.
            return torch.tanh(self.project(normalise(features)))[image_index]
        grid = self.grid(features)  # (N, L, F)
        weights = self.attention(grid, question, image_index)  # (B, L, G)
        attended = weights.transpose(1, 2) @ grid[image_index]  # (B, G, F)
        return torch.tanh(self.project(attended.flatten(1)))


class QuestionEncoder(nn.Module):
    """Piece ids -> embedding -> tanh -> LSTM; final h and c of every layer -> Linear -> tanh."""

    def __init__(self, config: VQAConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(config.embed_dim, config.lstm_hidden, config.lstm_layers, batch_first=True)
        self.project = nn.Linear(2 * config.lstm_layers * config.lstm_hidden, config.common_dim)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = torch.tanh(self.embed(input_ids))  # (B, T, E)
        packed = pack_padded_sequence(embedded, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        _, (h, c) = self.lstm(packed)  # each (L, B, H)
        state = torch.cat([h, c], dim=0).transpose(0, 1).flatten(1)  # (B, 2LH)
        return torch.tanh(self.project(state))  # (B, C)


@dataclass
class VQAOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class VQAModel(PreTrainedModel):
    """The whole model. Its three steps are the one forward path: every caller (training,
    evaluation, the Predictor, explanations, the feature cache, the benchmarks) goes through
    `image_features`, `question_vectors` and `answer_logits`; `forward` chains them."""

    config_class = VQAConfig
    base_model_prefix = "vqa"
    main_input_name = "input_ids"
    # The loss is a mean over the batch: the Trainer must not rescale it by the number of
    # DDP processes, as it does for models whose loss takes num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: VQAConfig, pretrained_backbone: bool | str = False):
        super().__init__(config)
        self.image_encoder = ImageEncoder(config, pretrained_backbone)
        self.question_encoder = QuestionEncoder(config)
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(config.common_dim, config.classifier_hidden),
            nn.Tanh(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module):
        # Keep PyTorch's and timm's own initialisation (and any pretrained backbone weights).
        pass

    def image_transform(self):
        """The model's eval preprocessing: timm's data config for this backbone at the configured size."""
        args = {"input_size": (3, self.config.image_size, self.config.image_size)} if self.config.image_size else {}
        data_config = resolve_data_config(args, model=self.image_encoder.backbone)
        return ModelTransform(data_config)

    # The forward path, in three steps.

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Step 1, once per distinct image: (N, 3, H, W) -> (N, F) pooled or (N, F, h, w) map."""
        return self.image_encoder.features(pixel_values)

    def question_vectors(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Step 2, once per question: (B, T) piece ids, (B,) lengths -> (B, C)."""
        return self.question_encoder(input_ids, lengths)

    def answer_logits(self, image_features: torch.Tensor, questions: torch.Tensor,
                      image_index: torch.Tensor) -> torch.Tensor:
        """Step 3: features of each image once (N, ...), question vectors (B, C), the row of each
        question's image (B,) -> answer logits (B, A). Fusion by elementwise product."""
        image = self.image_encoder(image_features, questions, image_index)  # (B, C)
        return self.classifier(image * questions)

    def attention_maps(self, image_features: torch.Tensor, questions: torch.Tensor,
                       image_index: torch.Tensor) -> torch.Tensor | None:
        """(B, G, h, w) where each question looked, or None for the pooled model."""
        if not self.config.attention_glimpses:
            return None
        return self.image_encoder.attention_weights(image_features, questions, image_index)

    @staticmethod
    def pooled_features(image_features: torch.Tensor) -> torch.Tensor:
        """(N, F) per image: the pooled features, or a map's mean over its locations (what the
        out-of-distribution detector measures)."""
        return image_features if image_features.dim() == 2 else image_features.float().mean(dim=(2, 3))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) piece ids, 0-padded
        lengths: torch.Tensor,  # (B,)
        image_index: torch.Tensor,  # (B,) row of each question's image in pixel_values / image_features
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W): each image of the batch once
        image_features: torch.Tensor | None = None,  # (N, ...) cached CNN features
        labels: torch.Tensor | None = None,  # (B, num_labels) soft VQA scores
    ) -> VQAOutput:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("VQAModel.forward needs pixel_values or image_features")
            image_features = self.image_features(pixel_values)
        logits = self.answer_logits(image_features, self.question_vectors(input_ids, lengths), image_index)
        loss = None
        if labels is not None:
            # Soft cross-entropy: each answer weighted by its VQA score (0 for answers outside the vocabulary).
            loss = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        return VQAOutput(loss=loss, logits=logits)


def architecture(config: VQAConfig) -> str:
    """One line saying what the model is, for model cards and the app."""
    image = f"{config.backbone} CNN"
    if config.attention_glimpses:
        image += f" with {config.attention_glimpses}-glimpse question-guided attention"
    return (f"{image} + {config.lstm_layers}-layer LSTM ({config.lstm_hidden} units), "
            f"fused by elementwise product in {config.common_dim} dimensions")
