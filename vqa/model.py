"""The model, read top to bottom: ImageEncoder -> QuestionEncoder -> VQAModel.

Antol et al. 2015 ("VQA: Visual Question Answering"), "deeper LSTM Q + norm I":
the L2-normalised CNN feature and the LSTM question vector are each mapped into a
common space with Linear + tanh, multiplied elementwise, and classified over the
top answers.
"""

from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import huggingface_hub
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .config import VQAConfig
from .errors import CheckpointError


def create_backbone(name: str, pretrained: bool | str = False) -> nn.Module:
    """A timm model that returns pooled features (num_classes=0).

    `pretrained`: False (random init), True (ImageNet weights from the local timm /
    Hugging Face cache: nothing is downloaded), or the path of a weights file.
    """
    if pretrained is False:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if pretrained is True:
        # huggingface_hub reads HF_HUB_OFFLINE once, at import: set its constant, so that only
        # the local cache is looked at (no network retries, no fallback to pickle files).
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
            try:
                return timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as error:  # timm raises several types for a missing cache entry
                raise CheckpointError(
                    f"no pretrained weights for timm model {name!r} in the local timm/Hugging Face cache "
                    f"({type(error).__name__}: {error}). Put them in the cache, pass the path of a "
                    ".safetensors weights file instead, or train from scratch without --pretrained."
                ) from error
    path = Path(pretrained)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"backbone weights {path}: only .safetensors files are loaded (pickle files can run code). "
            "Convert a trusted file with: python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\""
        )
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})


class ImageEncoder(nn.Module):
    """CNN pooled features -> L2-normalise -> Linear -> tanh, into the common space."""

    def __init__(self, config: VQAConfig, pretrained: bool | str = False):
        super().__init__()
        self.backbone = create_backbone(config.backbone, pretrained)
        # Pooled output size: timm's head_hidden_size where a pre-logits layer follows pooling
        # (MobileNetV3, EfficientNet-style heads), num_features otherwise.
        feature_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        config.image_feature_dim = feature_dim
        self.project = nn.Linear(feature_dim, config.common_dim)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled CNN features (N, F); what the feature cache stores."""
        return self.backbone(pixel_values)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # "norm I": unit L2 norm, then scaled by sqrt(F) so that components have unit RMS.
        # Unscaled, each component is ~1/sqrt(F) and a freshly initialised Linear + tanh
        # passes almost nothing on: a backbone trained from scratch then barely learns.
        features = F.normalize(features.float(), dim=-1) * features.shape[-1] ** 0.5
        return torch.tanh(self.project(features))  # (N, C)


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
    config_class = VQAConfig
    base_model_prefix = "vqa"
    main_input_name = "input_ids"
    # forward() takes **kwargs only to ignore extra batch keys; without this the Trainer
    # would treat the loss as a sum and scale it by the number of DDP processes.
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

    def answer_logits(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Fusion by elementwise product, then the classifier: (B, C) x (B, C) -> (B, A)."""
        return self.classifier(image * question)

    def image_transform(self):
        """timm's eval preprocessing for this backbone, at the configured size."""
        args = {}
        if self.config.image_size:
            args["input_size"] = (3, self.config.image_size, self.config.image_size)
        if self.config.crop_pct:
            args["crop_pct"] = self.config.crop_pct
        data_config = resolve_data_config(args, model=self.image_encoder.backbone)
        return create_transform(**data_config, is_training=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) piece ids, 0-padded
        lengths: torch.Tensor,  # (B,)
        image_index: torch.Tensor,  # (B,) row of each question's image in pixel_values / image_features
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W): each image of the batch once
        image_features: torch.Tensor | None = None,  # (N, F) cached pooled CNN features
        labels: torch.Tensor | None = None,  # (B, num_labels) soft VQA scores
        **kwargs,
    ) -> VQAOutput:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("VQAModel.forward needs pixel_values or image_features")
            image_features = self.image_encoder.features(pixel_values)
        image = self.image_encoder(image_features)[image_index]  # (B, C)
        question = self.question_encoder(input_ids, lengths)  # (B, C)
        logits = self.answer_logits(image, question)
        loss = None
        if labels is not None:
            # Soft cross-entropy: each answer weighted by its VQA score (0 for answers outside the vocabulary).
            loss = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        return VQAOutput(loss=loss, logits=logits)
