"""Checkpoint folders: the one save path and the one load path.

A checkpoint is config.json + model.safetensors (save_pretrained), tokenizer.model and
a Hugging Face model card README.md whose YAML metadata holds the training facts (dataset,
seed, command, measured accuracy). Only these files are read: no pickle, so loading a
checkpoint never runs code. Saving writes a sibling folder and renames it into place,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""

import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load
from safetensors import SafetensorError, safe_open

from .config import VQAConfig, check_options
from .errors import CheckpointError
from .files import atomic_folder, atomic_write_text
from .text import TOKENIZER_FILE, QuestionTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "Convert a checkpoint you trust with: python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('FILE', weights_only=True), 'model.safetensors')\""
)
# Hub metadata every card carries; the training facts follow it. The model is plain PyTorch
# code (not loadable by transformers' Auto classes), hence library_name "pytorch".
CARD_METADATA = {"library_name": "pytorch", "pipeline_tag": "visual-question-answering",
                 "tags": ["visual-question-answering", "vqa"]}


def check_checkpoint_folder(folder: str | Path) -> Path:
    """Raise CheckpointError naming the file when `folder` is not a loadable, safe checkpoint."""
    folder = Path(folder)
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{folder} is a pickle file, which can run arbitrary code when loaded; "
                                  f"it is refused. {CONVERT_HINT}")
        raise CheckpointError(f"{folder} is a file; a checkpoint is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run "
                                  f"arbitrary code when loaded; they are refused. {CONVERT_HINT}")
        raise CheckpointError(f"checkpoint weights missing: {folder / WEIGHTS_FILE}")
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint file missing: {folder / name}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint config is not valid JSON: {folder / CONFIG_FILE} ({error})") from error
    labels = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise CheckpointError(f"{folder / CONFIG_FILE} has no answer vocabulary (field 'id2label')")
    if sorted(int(k) for k in labels) != list(range(len(labels))):
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'id2label' keys must be 0..{len(labels) - 1}")
    _check_weights(folder / WEIGHTS_FILE)
    read_card(folder)  # a card that cannot be read is refused now, not when the app shows it
    return folder


def _check_weights(path: Path) -> None:
    """Refuse unreadable weights, and NaN or infinite ones (a diverged run), naming the tensor."""
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                # A float64 sum is NaN or inf only if an element is (for float16/32 weights it cannot
                # overflow): 57 ms for the shipped 6 M weights, where torch.isfinite(t).all() took 122 ms.
                if tensor.is_floating_point() and not tensor.sum(dtype=torch.float64).isfinite():
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        raise CheckpointError(f"checkpoint weights {path}: tensor {name!r} holds {bad} NaN or "
                                              f"infinite values (of {tensor.numel()}); the model cannot answer")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint weights are corrupt: {path} ({error})") from error


def load_checkpoint(folder: str | Path):
    """(VQAModel in eval mode, QuestionTokenizer) from a checkpoint folder."""
    from .model import VQAModel

    folder = check_checkpoint_folder(folder)
    tokenizer = QuestionTokenizer.load(folder)
    try:
        config = VQAConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / CONFIG_FILE} cannot be read as a VQA model's config: {error}") from error
    check_options(vars(config), fields(VQAConfig), f"{folder / CONFIG_FILE}: ")
    try:
        # Weights may be stored in half precision (the shipped checkpoints are); compute in float32.
        model = VQAModel.from_pretrained(folder, config=config, use_safetensors=True, dtype=torch.float32)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: {error}") from error
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{folder / TOKENIZER_FILE} has {len(tokenizer)} pieces but the model embeds {config.vocab_size}")
    return model.eval(), tokenizer


def read_card(folder: str | Path) -> dict:
    """The model card's YAML metadata ({} when there is no card, or it has none)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        return metadata_load(path) or {}
    except UnicodeDecodeError as error:
        raise CheckpointError(f"model card {path} is not UTF-8 text ({error})") from error
    except (yaml.YAMLError, ValueError) as error:
        raise CheckpointError(f"model card {path} has unreadable metadata ({error})") from error


def render_card(facts: dict, body: str) -> str:
    """A Hub model card: CARD_METADATA and `facts` (nested dicts and lists allowed) as YAML, then `body`.

    None values are left out (ModelCardData drops them): read them back with .get().
    """
    data = ModelCardData(**{**CARD_METADATA, **_plain(facts)})
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def _plain(value):
    """Numpy and torch scalars as Python numbers, tuples as lists: YAML that yaml.safe_load reads back."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):  # exactly: numpy.float64 is a float
        return value
    if hasattr(value, "item"):  # numpy or torch scalar
        return value.item()
    raise TypeError(f"model card fact {value!r} is a {type(value).__name__}, not a number, string, list or dict")


def save_checkpoint(model, tokenizer: QuestionTokenizer, folder: str | Path, card: str | None = None,
                    extra_files: dict[str, Path] | None = None, half: bool = False) -> Path:
    """Write the checkpoint into a temporary sibling folder, then rename it into place.

    half=True stores the weights in float16 (half the size; loading computes in float32).
    """
    with atomic_folder(folder) as tmp:
        state = None
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return Path(folder)


def update_card(folder: str | Path, facts: dict) -> Path:
    """Merge `facts` into the card's metadata, keeping its text; written atomically."""
    path = Path(folder) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    body = text.split("\n---\n", 1)[1] if text.startswith("---\n") and "\n---\n" in text else text
    return atomic_write_text(path, render_card({**read_card(folder), **facts}, body))
