"""Stage 1: the image encoder learns the objects of a scene from its graph.

The paper's CNN was trained (ImageNet) and frozen before any question was seen; bottom-up
features (Anderson et al. 2018) trained it on objects and their attributes. A world with
scene graphs (CLEVR's `*_scenes.json`, which the shapes world also writes) gives those
labels for free: at each location of the CNN's spatial map, is an object's centre here,
where in the cell is it, and what is its value of every attribute. A 1x1 convolution over
the map predicts them; after training only the backbone is kept, as a .safetensors file that
`VQAModel` loads like any pretrained weights (`--backbone-weights`).

Attribute names and values come from the data: every string field of the objects (CLEVR:
color, size, shape, material; the shapes world the same). Positions are `pixel_coords`
(x, y in image pixels, CLEVR's depth ignored), mapped through the same letterbox as the pixels.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .config import check_options, option
from .errors import DataError
from .images import input_position, open_image
from .model import backbone_transform, create_backbone, evaluating
from .records import read_json, read_scenes_file

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_CONFIG = "encoder.json"
HEAD_WEIGHTS = "head.safetensors"  # the 1x1 head, for re-measuring the card (not needed by stage 2)


@dataclass
class Scene:
    image: Path
    objects: list[dict]  # each: {"x": float, "y": float, attribute: value, ...}


def read_scenes(scenes_file: str | Path, image_dir: str | Path) -> list[Scene]:
    """The scenes of a CLEVR-format scenes file, each with its image file and its objects."""
    scenes_file, image_dir = Path(scenes_file), Path(image_dir)
    scenes = []
    for n, scene in enumerate(read_scenes_file(scenes_file)):
        where = f"{scenes_file}: scenes[{n}]"
        if not isinstance(scene, dict) or not isinstance(scene.get("image_filename"), str):
            raise DataError(f"{where} has no string field 'image_filename'")
        if not isinstance(scene.get("objects"), list):
            raise DataError(f"{where} has no list field 'objects'")
        objects = []
        for k, obj in enumerate(scene["objects"]):
            coords = obj.get("pixel_coords") if isinstance(obj, dict) else None
            if (not isinstance(coords, list) or len(coords) < 2
                    or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coords[:2])):
                raise DataError(f"{where}.objects[{k}] needs 'pixel_coords' [x, y, ...] of finite numbers, got {coords!r}")
            objects.append({"x": float(coords[0]), "y": float(coords[1]),
                            **{key: value for key, value in obj.items() if isinstance(value, str)}})
        scenes.append(Scene(image_dir / scene["image_filename"], objects))
    if not scenes:
        raise DataError(f"{scenes_file}: no scenes")
    return scenes


def attribute_values(scenes: list[Scene]) -> dict[str, list[str]]:
    """Every attribute the objects have, with its values, sorted: the labels of the head."""
    values: dict[str, set] = {}
    for scene in scenes:
        for obj in scene.objects:
            for key, value in obj.items():
                if key not in ("x", "y"):
                    values.setdefault(key, set()).add(value)
    if not values:
        raise DataError("the scenes' objects have no string attributes (such as color or shape) to learn")
    return {key: sorted(v) for key, v in sorted(values.items())}


def dense_targets(objects: list[dict], image_size: tuple[int, int], input_size: tuple[int, int],
                  map_size: tuple[int, int], attributes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Per map location: `present` (h, w) 1 where an object's centre falls, `offset` (2, h, w)
    where in its cell (0..1), `attributes` (K, h, w) the value index of each attribute, -100
    (ignored) elsewhere. image_size is (width, height) of the file; input_size (H, W) the model's.
    Two centres in one cell: the one drawn later wins, as it does in the pixels."""
    h, w = map_size
    present = torch.zeros(h, w)
    offset = torch.zeros(2, h, w)
    labels = torch.full((len(attributes), h, w), -100, dtype=torch.long)
    for obj in objects:
        u, v = input_position(obj["x"], obj["y"], image_size, input_size)
        gx, gy = u * w, v * h  # in map cells
        col, row = min(max(int(gx), 0), w - 1), min(max(int(gy), 0), h - 1)
        present[row, col] = 1.0
        offset[:, row, col] = torch.tensor([gx - col, gy - row]).clamp(0, 1)
        for k, (name, values) in enumerate(attributes.items()):
            if name in obj and obj[name] in values:
                labels[k, row, col] = values.index(obj[name])
    return {"present": present, "offset": offset, "attributes": labels}


class SceneDataset(Dataset):
    """(pixels, dense targets) of each scene, read from its image file on demand."""

    def __init__(self, scenes: list[Scene], transform, map_size: tuple[int, int], attributes: dict):
        self.scenes, self.transform, self.map_size, self.attributes = scenes, transform, map_size, attributes
        self.input_size = transform.input_size[-2:]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        scene = self.scenes[i]
        image = open_image(scene.image)
        targets = dense_targets(scene.objects, image.size, self.input_size, self.map_size, self.attributes)
        return {"pixel_values": self.transform(image), **targets}


class SceneEncoder(nn.Module):
    """A timm backbone's spatial map -> 1x1 conv -> per location: presence, offset, attributes."""

    def __init__(self, backbone: str, attributes: dict[str, list[str]], output_stride: int | None = None,
                 pretrained: bool | str = False, image_size: int | None = None):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, output_stride)
        self.attributes = attributes
        self.sizes = [len(v) for v in attributes.values()]
        self.head = nn.Conv2d(self.backbone.num_features, 1 + 2 + sum(self.sizes), kernel_size=1)
        self.transform = backbone_transform(self.backbone, image_size)
        # In eval mode: a probe in training mode would move BatchNorm's running statistics.
        with torch.no_grad(), evaluating(self.backbone):
            self.map_size = tuple(self.backbone.forward_features(
                torch.zeros(1, *self.transform.input_size)).shape[-2:])

    def predict(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(presence logits (N, h, w), offsets (N, 2, h, w), [attribute logits (N, V_k, h, w)])."""
        out = self.head(self.backbone.forward_features(pixel_values))
        return out[:, 0], out[:, 1:3].sigmoid(), list(out[:, 3:].split(self.sizes, dim=1))

    def forward(self, pixel_values, present=None, offset=None, attributes=None) -> dict:
        presence, where, values = self.predict(pixel_values)
        if present is None:
            return {"logits": presence}
        # Every location says whether a centre is there; only centres say where and what.
        mask = present.bool()
        loss = F.binary_cross_entropy_with_logits(presence, present)
        if mask.any():
            loss = loss + F.l1_loss(where.permute(0, 2, 3, 1)[mask], offset.permute(0, 2, 3, 1)[mask])
            for k, logits in enumerate(values):
                loss = loss + F.cross_entropy(logits, attributes[:, k], ignore_index=-100)
        return {"loss": loss, "logits": presence}


@torch.no_grad()
def scene_accuracy(encoder: SceneEncoder, dataset: SceneDataset, batch_size: int = 64) -> dict[str, float]:
    """On held-out scenes, in percent: `objects` (F1 of finding the map locations that hold an
    object's centre), then each attribute's accuracy at the true centres."""
    found = predicted = actual = 0
    right = {name: 0 for name in encoder.attributes}
    total = {name: 0 for name in encoder.attributes}
    with evaluating(encoder):
        for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            presence, _, values = encoder.predict(batch["pixel_values"])
            hits, truth = presence > 0, batch["present"].bool()
            found, predicted, actual = (found + int((hits & truth).sum()), predicted + int(hits.sum()),
                                        actual + int(truth.sum()))
            for k, name in enumerate(encoder.attributes):
                labels = batch["attributes"][:, k]
                kept = labels != -100
                right[name] += int((values[k].argmax(1)[kept] == labels[kept]).sum())
                total[name] += int(kept.sum())
    scores = {"objects": round(200.0 * found / max(predicted + actual, 1), 2)}
    return scores | {name: round(100.0 * right[name] / max(total[name], 1), 2) for name in right}


def save_encoder(encoder: SceneEncoder, folder: str | Path, facts: dict, card: str) -> Path:
    """The backbone's weights (what `--backbone-weights` loads), its settings and its card."""
    from safetensors.torch import save_file

    from .files import atomic_folder

    with atomic_folder(folder) as tmp:
        state = {k: v.detach().contiguous() for k, v in encoder.backbone.state_dict().items()}
        save_file(state, str(tmp / ENCODER_WEIGHTS))
        save_file({k: v.detach().contiguous() for k, v in encoder.head.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
        (tmp / ENCODER_CONFIG).write_text(json.dumps(facts, indent=1))
        (tmp / "README.md").write_text(card)
    return Path(folder)


def load_encoder(folder: str | Path) -> SceneEncoder:
    """A stage-1 encoder folder (as `save_encoder` writes it) back as a SceneEncoder, head included."""
    from safetensors.torch import load_file

    folder = Path(folder)
    settings = read_json(folder / ENCODER_CONFIG, "encoder settings")
    encoder = SceneEncoder(settings["backbone"], settings["attributes"], settings["output_stride"],
                           pretrained=str(folder / ENCODER_WEIGHTS), image_size=settings["image_size"])
    encoder.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return encoder.eval()


@dataclass
class EncoderOptions:
    """Options of a stage-1 run (`training/train_encoder.py` offers each as a flag)."""

    output_dir: str = option("checkpoints/my-encoder", "folder to write (encoder.safetensors, encoder.json, README.md)")
    dataset: str = option("shapes-world", "'shapes-world' (built in) or 'files' (CLEVR-format scenes + images)")
    train_scenes: str | None = option(None, "scenes JSON of the training images (--dataset files)")
    train_images: str | None = option(None, "their image folder")
    val_scenes: str | None = option(None, "scenes JSON of held-out images, for the card's accuracy")
    val_images: str | None = option(None, "their image folder")
    backbone: str = option("resnet10t", "timm model name")
    image_size: int | None = option(None, "input side in pixels (default: the backbone's)", low=16, high=2048)
    output_stride: int | None = option(16, "timm output_stride: 16 keeps an 8x8 map at 128 px", choices=(8, 16, 32))
    pretrained: bool = option(False, "start from ImageNet weights in the local timm/Hugging Face cache")
    epochs: float = option(6, "training epochs", above=0, high=100_000)
    batch_size: int = option(64, "images per step", low=1, high=100_000)
    learning_rate: float = option(2e-3, "peak learning rate (cosine schedule with warm-up)", above=0, high=10)
    seed: int = option(0, "seed of initialisation and batch order")
    num_workers: int = option(0, "data loading processes", low=0, high=256)
    resume: bool = option(False, "continue from the last complete checkpoint in OUTPUT_DIR.trainer")


def encoder_data(options: "EncoderOptions") -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes)."""
    if options.dataset == "shapes-world":
        from .worlds.shapes import builtin_scene_files

        return tuple(read_scenes(*builtin_scene_files(split)) for split in ("train", "val"))
    if options.dataset == "files":
        if not (options.train_scenes and options.train_images and options.val_scenes and options.val_images):
            raise DataError("--dataset files needs --train-scenes, --train-images, --val-scenes and --val-images")
        return (read_scenes(options.train_scenes, options.train_images),
                read_scenes(options.val_scenes, options.val_images))
    raise DataError(f"unknown dataset {options.dataset!r}: use 'shapes-world' or 'files'")


def encoder_card(facts: dict) -> str:
    rows = "\n".join(f"| {name} | {value:.2f} |" for name, value in facts["val_accuracy"].items())
    values = "; ".join(f"{k}: {', '.join(v)}" for k, v in facts["attributes"].items())
    return (f"# Scene encoder: {facts['backbone']}, trained on scene graphs\n\n"
            "Stage 1 of the two-stage recipe (docs: README, \"Training\"): the CNN learns, at each "
            "location of its spatial map, whether an object's centre is there, where in the cell, "
            "and its value of every attribute. Load it with `training/train.py --backbone-weights "
            f"{facts['output_dir']}/{ENCODER_WEIGHTS} --freeze-backbone`.\n\n"
            f"- Data: {facts['train_scenes']} training scenes, {facts['val_scenes']} held out\n"
            f"- Map: {facts['map_size'][0]}x{facts['map_size'][1]} at {facts['image_size']} px "
            f"(output_stride {facts['output_stride']})\n"
            f"- Attributes: {values}\n"
            f"- Seed {facts['seed']}, {facts['epochs']} epochs, training time {facts['training_time_s']} s\n\n"
            "Held-out figures (%): `objects` = F1 of finding the map locations that hold an object's centre;\n"
            "each attribute = its value at the true centres.\n\n"
            f"| target | accuracy |\n|---|---|\n{rows}\n\n"
            f"Reproduce with:\n\n```\n{facts['command']}\n```\n")


def train_scene_encoder(options: EncoderOptions, command: str) -> dict:
    """Train stage 1 with transformers.Trainer and write the encoder folder; returns its facts."""
    import time

    from transformers import Trainer, TrainingArguments

    from .trainer import StopOnSignal, TrainingInterrupted, last_complete_checkpoint

    check_options(vars(options), fields(EncoderOptions))
    train_scenes, val_scenes = encoder_data(options)
    attributes = attribute_values(train_scenes)
    torch.manual_seed(options.seed)
    encoder = SceneEncoder(options.backbone, attributes, options.output_stride, options.pretrained,
                           options.image_size)
    datasets = [SceneDataset(s, encoder.transform, encoder.map_size, attributes) for s in (train_scenes, val_scenes)]
    out = Path(options.output_dir)
    work = out.with_name(out.name + ".trainer")
    args = TrainingArguments(
        output_dir=str(work), num_train_epochs=options.epochs, per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate, warmup_steps=0.05, lr_scheduler_type="cosine",
        save_strategy="epoch", save_total_limit=1, logging_steps=20, report_to=["tensorboard"], seed=options.seed,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=options.num_workers, remove_unused_columns=False,
    )
    stop = StopOnSignal()
    trainer = Trainer(model=encoder, args=args, train_dataset=datasets[0], callbacks=[stop])
    started = time.time()
    resume = last_complete_checkpoint(work) if options.resume else None
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.received is not None:
        raise TrainingInterrupted(f"stopped by {stop.received}; the last checkpoint is in {work}")
    facts = {
        "backbone": options.backbone, "image_size": encoder.transform.input_size[-1],
        "output_stride": options.output_stride, "map_size": list(encoder.map_size), "attributes": attributes,
        "train_scenes": len(train_scenes), "val_scenes": len(val_scenes), "epochs": options.epochs,
        "seed": options.seed, "training_time_s": round(time.time() - started),
        "val_accuracy": scene_accuracy(encoder, datasets[1]), "command": command, "output_dir": str(out),
    }
    save_encoder(encoder, out, facts, encoder_card(facts))
    return facts
