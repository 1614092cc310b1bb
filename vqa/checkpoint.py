"""Checkpoint folders: the one save path and the one load path.

A checkpoint is config.json + model.safetensors (save_pretrained), tokenizer.model and
a model card README.md whose front matter holds the training facts (dataset, seed,
command, measured accuracy). Only these files are read: no pickle, so loading a
checkpoint never runs code. Saving writes a sibling folder and renames it into place,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open

from .config import VQAConfig
from .errors import CheckpointError
from .text import TOKENIZER_FILE, QuestionTokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "Convert a checkpoint you trust with: python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('FILE', weights_only=True), 'model.safetensors')\""
)


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
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint config is not valid JSON: {folder / CONFIG_FILE} ({error})") from error
    labels = config.get("id2label") if isinstance(config, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise CheckpointError(f"{folder / CONFIG_FILE} has no answer vocabulary (field 'id2label')")
    if sorted(int(k) for k in labels) != list(range(len(labels))):
        raise CheckpointError(f"{folder / CONFIG_FILE}: 'id2label' keys must be 0..{len(labels) - 1}")
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint weights are corrupt: {folder / WEIGHTS_FILE} ({error})") from error
    return folder


def load_checkpoint(folder: str | Path):
    """(VQAModel in eval mode, QuestionTokenizer) from a checkpoint folder."""
    from .model import VQAModel

    folder = check_checkpoint_folder(folder)
    tokenizer = QuestionTokenizer.load(folder)
    try:
        config = VQAConfig.from_pretrained(folder)
        # Weights may be stored in half precision (the shipped checkpoint is); compute in float32.
        model = VQAModel.from_pretrained(folder, config=config, use_safetensors=True, dtype=torch.float32)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: {error}") from error
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(f"{folder / TOKENIZER_FILE} has {len(tokenizer)} pieces but the model embeds {config.vocab_size}")
    return model.eval(), tokenizer


def read_card(folder: str | Path) -> dict:
    """The front matter of the model card ("key: value" lines between --- markers)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    facts = {}
    if lines and lines[0] == "---":
        for line in lines[1:]:
            if line == "---":
                break
            key, _, value = line.partition(":")
            value = value.strip()
            try:
                facts[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                facts[key.strip()] = value
    return facts


def render_card(facts: dict, body: str) -> str:
    head = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    return f"---\n{head}\n---\n\n{body.strip()}\n"


def save_checkpoint(model, tokenizer: QuestionTokenizer, folder: str | Path, card: str | None = None,
                    extra_files: dict[str, Path] | None = None, half: bool = False) -> Path:
    """Write the checkpoint into a temporary sibling folder, then rename it into place.

    half=True stores the weights in float16 (half the size; loading computes in float32).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = None
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        # mkdtemp makes a private folder; give the checkpoint the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
