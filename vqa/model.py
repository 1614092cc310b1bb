"""The model, read top to bottom: ImageEncoder -> QuestionEncoder -> VQAModel.

Antol et al. 2015 ("VQA: Visual Question Answering"), "deeper LSTM Q + norm I":
the L2-normalised CNN feature and the LSTM question vector are each mapped into a
common space with Linear + tanh, multiplied elementwise, and classified over the
top answers.
"""

from contextlib import contextmanager
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


def pretrained_weights_file(name: str) -> str:
    """The path of timm model `name`'s ImageNet weights (model.safetensors): from the local Hugging
    Face cache, else downloaded into it (huggingface_hub; HF_HUB_OFFLINE=1 forbids the download)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        raise CheckpointError(f"timm model {name!r} names no Hugging Face weights: pass the path of a "
                              ".safetensors weights file instead, or train from scratch without --pretrained.")
    try:
        return hf_hub_download(hub_id, "model.safetensors")
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise CheckpointError(
            f"no pretrained weights for timm model {name!r}: {hub_id}/model.safetensors is not in the local "
            "Hugging Face cache and cannot be downloaded (offline). Download it once online, pass the path of "
            "a .safetensors weights file instead, or train from scratch without --pretrained.") from None
    except (HfHubHTTPError, OSError) as error:
        raise CheckpointError(f"pretrained weights for timm model {name!r} ({hub_id}/model.safetensors) could "
                              f"not be downloaded: {str(error).splitlines()[0]}") from None


def create_backbone(name: str, pretrained: bool | str = False, output_stride: int | None = None) -> nn.Module:
    """A timm model that returns pooled features (num_classes=0).

    `pretrained`: False (random init), True (ImageNet weights from the local timm /
    Hugging Face cache, downloaded into it when missing and online), or the path of a weights file.
    `output_stride` (8, 16) keeps a finer spatial map by dilating the last stages.
    """
    options = {"num_classes": 0}
    if output_stride:
        options["output_stride"] = output_stride
    if pretrained is False:
        return timm.create_model(name, pretrained=False, **options)
    if pretrained is True:
        path = pretrained_weights_file(name)
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


def backbone_transform(backbone: nn.Module, image_size: int | None = None) -> ModelTransform:
    """A timm backbone's eval preprocessing (timm's data config), at image_size pixels if given."""
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    return ModelTransform(resolve_data_config(args, model=backbone))


def normalise(features: torch.Tensor) -> torch.Tensor:
    """"norm I": unit L2 norm over the last (feature) dimension, then scaled by sqrt(F) so that
    components have unit RMS. Unscaled, each component is ~1/sqrt(F) and a freshly initialised
    Linear + tanh passes almost nothing on: a backbone trained from scratch then barely learns."""
    return F.normalize(features.float(), dim=-1) * features.shape[-1] ** 0.5


class QuestionGuidedAttention(nn.Module):
    """Where to look, per question: G softmax maps over the CNN's locations.

    Each location's feature and the query meet in the common space by elementwise product
    (the fusion the whole model uses), and a Linear gives one score per glimpse (Kazemi &
    Elqursh 2017, "Show, Ask, Attend, and Answer", with product instead of concat).
    Sigmoid weights in place of softmax, whose sum would keep a count (Zhang et al. 2018), were
    tried on the shapes world and collapsed within 5 epochs to maps of all zeros or all ones:
    softmax it is. A count is read beside it instead (`VQAConfig.attention_counts`, `counts`).
    """

    def __init__(self, feature_dim: int, common_dim: int, glimpses: int, dropout: float):
        super().__init__()
        self.locations = nn.Linear(feature_dim, common_dim)
        self.dropout = nn.Dropout(dropout)
        self.scores = nn.Linear(common_dim, glimpses)

    def logits(self, grid: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """grid (N, L, F) normalised features, question (B, C) -> one score per location and glimpse (B, L, G)."""
        keys = torch.tanh(self.locations(grid))  # (N, L, C): once per image, not per question
        return self.scores(self.dropout(keys[image_index] * question[:, None]))

    def forward(self, grid: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """-> weights (B, L, G), each glimpse summing to 1."""
        return self.logits(grid, question, image_index).softmax(dim=1)


COUNT_BINS = 16  # counts 0..15 each get a bin; more objects than that fall between the last ones


def counts(logits: torch.Tensor) -> torch.Tensor:
    """(B, L, G) location scores -> (B, G * COUNT_BINS): each glimpse's sum of sigmoid scores
    (how many locations it selects) as soft one-hot bins exp(-(n - k)^2), k = 0..15, which a
    Linear reads as easily as a class."""
    found = logits.float().sigmoid().sum(dim=1)  # (B, G)
    bins = torch.arange(COUNT_BINS, device=logits.device, dtype=torch.float32)
    return torch.exp(-(found[..., None] - bins) ** 2).flatten(1)


def location_targets(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, P, 2) (x, y) points in 0..1 of the model's input, NaN padded -> (B, H, h*w) 1 where
    a point falls in the map location (row by row, as `location_coordinates`), else 0."""
    known = ~points.isnan().any(-1)  # (B, H, P)
    col = (points[..., 0].nan_to_num(0) * width).long().clamp(0, width - 1)
    row = (points[..., 1].nan_to_num(0) * height).long().clamp(0, height - 1)
    targets = torch.zeros(*points.shape[:2], height * width, device=points.device)
    return targets.scatter_add_(2, row * width + col, known.float()).clamp(max=1)


def location_coordinates(height: int, width: int, device=None) -> torch.Tensor:
    """(h*w, 2): each map location's (x, y) centre, from -1 (left, top) to 1 (right, bottom), row by row."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).flatten(0, 1)


class ImageEncoder(nn.Module):
    """CNN features -> L2-normalise -> (attention hops) -> Linear -> tanh, into the common space."""

    def __init__(self, config: VQAConfig, pretrained: bool | str = False):
        super().__init__()
        self.backbone = create_backbone(config.backbone, pretrained, config.output_stride)
        self.glimpses = config.attention_glimpses
        self.coords = bool(config.attention_coords) and self.glimpses > 0
        hops = config.attention_hops if self.glimpses else 1
        self.counts = bool(config.attention_counts) and self.glimpses > 0
        self.all_hops = bool(config.attention_all_hops) and self.glimpses > 0
        self.hop_product = self.all_hops and bool(config.attention_hop_product)
        if self.glimpses:
            feature_dim = self.backbone.num_features  # channels of forward_features' map
            location_dim = feature_dim + 2 * self.coords
            self.attention = self._attention_layer(location_dim, config)
        else:
            # Pooled output size: timm's head_hidden_size where a pre-logits layer follows pooling
            # (MobileNetV3, EfficientNet-style heads), num_features otherwise.
            feature_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            location_dim = feature_dim
        config.image_feature_dim = feature_dim
        glimpse_dim = location_dim * max(self.glimpses, 1) + self.counts * self.glimpses * COUNT_BINS
        self.project = nn.Linear(glimpse_dim, config.common_dim)
        # Hops after the first have their own attention and projection. With one hop these lists
        # are empty: the model has exactly the parameters, and the outputs, it had before hops.
        self.more_attention = nn.ModuleList(self._attention_layer(location_dim, config) for _ in range(hops - 1))
        self.more_project = nn.ModuleList(nn.Linear(glimpse_dim, config.common_dim) for _ in range(hops - 1))
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    @staticmethod
    def _attention_layer(location_dim: int, config: VQAConfig) -> QuestionGuidedAttention:
        return QuestionGuidedAttention(location_dim, config.common_dim, config.attention_glimpses, config.dropout)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the CNN gives, and what the feature cache stores: pooled (N, F), or with
        attention the spatial map (N, F, h, w)."""
        if self.glimpses:
            return self.backbone.forward_features(pixel_values)
        return self.backbone(pixel_values)

    def grid(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) map -> (N, h*w, F), each location normalised; with coords its (x, y) appended."""
        grid = normalise(features.flatten(2).transpose(1, 2))
        if self.coords:
            xy = location_coordinates(*features.shape[2:], device=grid.device)
            grid = torch.cat([grid, xy.expand(len(grid), -1, -1)], dim=-1)
        return grid

    def _hops(self, features: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor):
        """Each hop's (location scores (B, L, G), its Linear's output (B, C) before the tanh);
        hop k's query is question (x) tanh(hop k-1's output)."""
        grid = self.grid(features)  # (N, L, F)
        query = question
        layers = [(self.attention, self.project), *zip(self.more_attention, self.more_project)]
        for attention, project in layers:
            logits = attention.logits(grid, query, image_index)  # (B, L, G)
            attended = logits.softmax(dim=1).transpose(1, 2) @ grid[image_index]  # (B, G, F)
            glimpses = attended.flatten(1)
            if self.counts:
                glimpses = torch.cat([glimpses, counts(logits)], dim=1)
            projected = project(glimpses)
            yield logits, projected
            query = question * torch.tanh(projected)

    def attend(self, features: torch.Tensor, question: torch.Tensor,
               image_index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image vector (B, C), each hop's location scores (B, L, G)). The image vector is the
        last hop's, or with `attention_all_hops` one Linear over every hop's glimpses (the sum
        of the hops' Linear outputs) before the tanh, or with `attention_hop_product` too the
        elementwise product of every hop's vector."""
        hops = list(self._hops(features, question, image_index))
        if self.hop_product:
            image = torch.stack([torch.tanh(p) for _, p in hops]).prod(0)
        else:
            image = torch.tanh(torch.stack([p for _, p in hops]).sum(0) if self.all_hops else hops[-1][1])
        return image, [logits for logits, _ in hops]

    def attention_weights(self, features: torch.Tensor, question: torch.Tensor,
                          image_index: torch.Tensor) -> torch.Tensor:
        """(B, hops * G, h, w) where each question looked, hop after hop."""
        weights = torch.cat([s.softmax(dim=1) for s, _ in self._hops(features, question, image_index)], dim=2)  # (B, L, HG)
        return weights.transpose(1, 2).unflatten(2, features.shape[2:])

    def forward(self, features: torch.Tensor, question: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Image vector (B, C) of each question: features (N, ...) of each image once, question (B, C)."""
        if not self.glimpses:
            # The pooled image vector does not depend on the question: project each image once.
            return torch.tanh(self.project(normalise(features)))[image_index]
        return self.attend(features, question, image_index)[0]


class QuestionEncoder(nn.Module):
    """Piece ids -> embedding -> tanh -> LSTM; final h and c of every layer -> Linear -> tanh.

    With `question_word_path`, the mean of the question's (raw) piece embeddings is projected
    into the same sum before the tanh: a word-level path beside the LSTM state. Measured on the
    shapes world's side targets (what a question names; 128 questions a step, 1 thread): the
    LSTM alone sat on the targets' prior (loss 18-19) for hundreds of steps, the word path
    left it after about 350 (loss 8.2 at step 400).
    """

    def __init__(self, config: VQAConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(config.embed_dim, config.lstm_hidden, config.lstm_layers, batch_first=True)
        self.project = nn.Linear(2 * config.lstm_layers * config.lstm_hidden, config.common_dim)
        self.words = nn.Linear(config.embed_dim, config.common_dim) if config.question_word_path else None

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pieces = self.embed(input_ids)  # (B, T, E); padding embeds to 0
        embedded = torch.tanh(pieces)
        packed = pack_padded_sequence(embedded, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        _, (h, c) = self.lstm(packed)  # each (L, B, H)
        state = torch.cat([h, c], dim=0).transpose(0, 1).flatten(1)  # (B, 2LH)
        vector = self.project(state)
        if self.words is not None:
            kept = torch.arange(input_ids.shape[1], device=input_ids.device)[None] < lengths[:, None].to(input_ids.device)
            mean = (pieces * kept[..., None]).sum(1) / kept.sum(1, keepdim=True).clamp(min=1)  # (B, E)
            vector = vector + self.words(mean)
        return torch.tanh(vector)  # (B, C)


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
        # Training only: what the question names, read from its vector (see vqa/programs.py).
        # Inference never calls it; the answer path is the paper's either way.
        self.side_head = nn.Linear(config.common_dim, len(config.side_targets)) if config.side_targets else None
        self.post_init()

    def _init_weights(self, module):
        # Keep PyTorch's and timm's own initialisation (and any pretrained backbone weights).
        pass

    def image_transform(self):
        """The model's eval preprocessing: timm's data config for this backbone at the configured size."""
        return backbone_transform(self.image_encoder.backbone, self.config.image_size)

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
        return self.fuse(self.image_encoder(image_features, questions, image_index), questions)

    def fuse(self, image: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """Image vectors (B, C) times question vectors (B, C), elementwise -> answer logits (B, A)."""
        return self.classifier(image * questions)

    def _supervised_attention(self, image_features, questions, image_index, points, known):
        """Training only: (answer logits, attention loss): each hop's first glimpse told, location by
        location (BCE), which objects the question's program looks at (`programs.hop_sets`)."""
        image, hop_logits = self.image_encoder.attend(image_features, questions, image_index)
        targets = location_targets(points, *image_features.shape[2:])  # (B, H, L)
        scores = torch.stack([s[..., 0] for s in hop_logits], dim=1).float()  # (B, H, L)
        loss = F.binary_cross_entropy_with_logits(scores, targets, reduction="none").sum((1, 2))
        return self.fuse(image, questions), (loss * known).sum() / known.sum().clamp(min=1)

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
        side_labels: torch.Tensor | None = None,  # (B, len(config.side_targets)) multi-hot, training only
        attention_points: torch.Tensor | None = None,  # (B, hops, P, 2) objects each hop should find, training only
        attention_known: torch.Tensor | None = None,  # (B,) 1 where the question has attention_points
    ) -> VQAOutput:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("VQAModel.forward needs pixel_values or image_features")
            image_features = self.image_features(pixel_values)
        questions = self.question_vectors(input_ids, lengths)
        attention_loss = None
        if (attention_points is not None and self.config.attention_supervision_weight
                and self.config.attention_glimpses and labels is not None):
            logits, attention_loss = self._supervised_attention(image_features, questions, image_index,
                                                                attention_points, attention_known.float())
        else:
            logits = self.answer_logits(image_features, questions, image_index)
        loss = None
        if labels is not None:
            # Soft cross-entropy: each answer weighted by its VQA score (0 for answers outside the vocabulary).
            loss = -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            if side_labels is not None and self.side_head is not None and self.config.side_loss_weight:
                side = F.binary_cross_entropy_with_logits(self.side_head(questions).float(), side_labels,
                                                          reduction="sum") / len(questions)
                loss = loss + self.config.side_loss_weight * side
            if attention_loss is not None:
                loss = loss + self.config.attention_supervision_weight * attention_loss
        return VQAOutput(loss=loss, logits=logits)


def architecture(config: VQAConfig) -> str:
    """One line saying what the model is, for model cards and the app."""
    image = f"{config.backbone} CNN"
    if config.attention_glimpses:
        hops = f"{config.attention_hops} hops of " if config.attention_hops > 1 else ""
        extras = [name for name, on in (("coordinates", config.attention_coords), ("counts", config.attention_counts))
                  if on]
        extras = f" with {' and '.join(extras)}" if extras else ""
        every = ""
        if config.attention_all_hops and config.attention_hops > 1:
            every = ", the answer reading " + ("the product of every hop" if config.attention_hop_product
                                               else "every hop")
        image += f" with {hops}{config.attention_glimpses}-glimpse question-guided attention{extras}{every}"
    words = " with a word-level path" if config.question_word_path else ""
    return (f"{image} + {config.lstm_layers}-layer LSTM ({config.lstm_hidden} units){words}, "
            f"fused by elementwise product in {config.common_dim} dimensions")


@contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (dropout off, BatchNorm statistics fixed), each submodule's
    own mode restored after: a frozen backbone may be in eval mode inside a training model."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
