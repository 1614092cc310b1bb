import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from fixtures import SHIPPED_CHECKPOINT, save_tiny_checkpoint, tiny_config
from huggingface_hub import ModelCard

from vqa.checkpoint import CARD_METADATA, load_checkpoint, read_card, render_card, save_checkpoint
from vqa.errors import CheckpointError
from vqa.model import VQAModel


class WritesMarker:
    """Unpickling this object would create the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def copy_of(tmp_path, tiny_checkpoint):
    def make(name="ckpt"):
        return shutil.copytree(tiny_checkpoint, tmp_path / name)
    return make


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_without_running_them(tmp_path, suffix):
    marker = tmp_path / "marker"
    weights = tmp_path / f"pytorch_model{suffix}"
    weights.write_bytes(pickle.dumps({"weights": WritesMarker(marker)}))
    with pytest.raises(CheckpointError, match="pickle.*arbitrary code.*Convert"):
        load_checkpoint(weights)  # offered as a file
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(weights, folder)
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_checkpoint(folder)  # offered as a folder holding only that file
    assert not marker.exists()


def test_the_marker_pickle_really_would_run(tmp_path):
    # Guards the test above: loading this pickle the unsafe way does create the marker.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()


def test_round_trip_gives_the_same_model(tmp_path, easy_vqa_answers, easy_vqa_tokenizer):
    """A model saved and loaded is the model that was saved, weight for weight; another seed's is not."""
    torch.manual_seed(3)
    model = VQAModel(tiny_config(easy_vqa_answers, len(easy_vqa_tokenizer))).eval()
    loaded, tokenizer = load_checkpoint(save_checkpoint(model, easy_vqa_tokenizer, tmp_path / "a"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert not loaded.training and tokenizer.model_proto == easy_vqa_tokenizer.model_proto
    other, _ = load_checkpoint(save_tiny_checkpoint(tmp_path / "b", easy_vqa_answers, easy_vqa_tokenizer, seed=4))
    assert not torch.equal(other.classifier[-1].weight, loaded.classifier[-1].weight)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.model"])
def test_missing_file_is_named(copy_of, name):
    folder = copy_of()
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(folder)


def test_corrupt_weights_are_named(copy_of):
    folder = copy_of()
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)


def test_corrupt_config_and_missing_answers_are_named(copy_of):
    folder = copy_of("a")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON: .*config.json"):
        load_checkpoint(folder)
    folder = copy_of("b")
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="answer vocabulary"):
        load_checkpoint(folder)


def test_weights_that_do_not_match_the_config(copy_of):
    folder = copy_of()
    config = json.loads((folder / "config.json").read_text())
    config["lstm_hidden"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(folder)


def test_half_precision_checkpoint_is_half_the_size_and_loads_in_float32(tmp_path, tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    half = save_checkpoint(model, tokenizer, tmp_path / "half", half=True)
    size = (tiny_checkpoint / "model.safetensors").stat().st_size
    assert (half / "model.safetensors").stat().st_size < 0.6 * size
    loaded, _ = load_checkpoint(half)
    assert loaded.classifier[-1].weight.dtype == torch.float32
    assert model.classifier[-1].weight.dtype == torch.float32  # the caller's model is untouched
    assert torch.allclose(loaded.classifier[-1].weight, model.classifier[-1].weight, atol=1e-3)


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path, tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tokenizer, tmp_path / "out", card="first")
    (folder / "stale.txt").write_text("from the old checkpoint")
    save_checkpoint(model, tokenizer, folder, card=render_card({"test_accuracy": 99.9}, "second"))
    assert not (folder / "stale.txt").exists()
    assert read_card(folder) == {**CARD_METADATA, "test_accuracy": 99.9}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def disk_full(*args, **kwargs):
    raise OSError("disk full")


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tokenizer, tmp_path / "out", card="good")

    monkeypatch.setattr(VQAModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, folder, card="never written")
    assert (folder / "README.md").read_text() == "good"
    load_checkpoint(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]




def test_card_round_trip_with_nested_facts(tmp_path, tiny_checkpoint):
    facts = {
        "dataset": "vqa-v2",
        "test_accuracy": np.float64(61.27),  # as metrics code returns it
        "test_questions": np.int64(214354),
        "skipped_images": 0,
        "init_from": None,
        # Keys that plain YAML would read as booleans, null or numbers stay strings.
        "test_accuracy_per_answer_type": {"yes/no": 80.1, "number": 40.0, "other": 52.3},
        "test_accuracy_per_answer": {"yes": 81.5, "no": 79.0, "null": 1.0, "on": 2.0, "1": 3.0},
        "families": [{"name": "colour", "accuracy": 99.5}, {"name": "shape", "accuracy": (98.0, 97.5)}],
        "command": 'python training/train.py --output-dir "out dir" --note \'a: b # c\'',
    }
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tokenizer, tmp_path / "out", card=render_card(facts, "# Body\n\ntext"))
    card = read_card(folder)
    expected = {k: v for k, v in facts.items() if v is not None}  # ModelCardData leaves None out
    expected["families"][1]["accuracy"] = [98.0, 97.5]
    assert card == {**CARD_METADATA, **expected}
    assert type(card["test_accuracy"]) is float and type(card["test_questions"]) is int
    # The Hub's own reader sees the same metadata and the body.
    hub = ModelCard.load(folder / "README.md")
    assert hub.data.library_name == "pytorch" and hub.data.pipeline_tag == "visual-question-answering"
    assert hub.data.to_dict()["test_accuracy_per_answer"]["no"] == 79.0
    assert hub.text.strip() == "# Body\n\ntext"
    with pytest.raises(TypeError, match="model card fact .*PosixPath"):
        render_card({"init_from": tmp_path}, "")


def legacy_card_facts(text: str) -> dict:
    """The reader this project used before YAML: one "key: JSON value" per line."""
    lines, facts = text.splitlines(), {}
    for line in lines[1:lines.index("---", 1)]:
        key, _, value = line.partition(":")
        try:
            facts[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            facts[key.strip()] = value.strip()
    return facts


LEGACY_CARD = """---
dataset: "easy-vqa"
backbone: "resnet10t"
answers: 13
val_accuracy: 100.0
test_accuracy: 99.96
epochs: 8.0
seed: 0
init_from: null
training_time_s: 361
command: "python training/train.py --dataset easy-vqa --output-dir checkpoints/easy-vqa --save-half"
---

# VQA model: resnet10t + 2-layer LSTM
"""


def test_cards_of_the_earlier_format_read_the_same_values(tmp_path):
    """Cards written before the YAML metadata (one JSON value per line) still read alike."""
    (tmp_path / "README.md").write_text(LEGACY_CARD, encoding="utf-8")
    legacy = legacy_card_facts(LEGACY_CARD)
    assert len(legacy) == 10 and legacy["init_from"] is None and legacy["epochs"] == 8.0
    card = read_card(tmp_path)
    assert card == legacy
    assert [type(v) for v in card.values()] == [type(v) for v in legacy.values()]


@pytest.mark.skipif(not (SHIPPED_CHECKPOINT / "README.md").is_file(), reason="no shipped model card")
def test_the_shipped_card_keeps_its_facts():
    card = read_card(SHIPPED_CHECKPOINT)
    assert card["test_accuracy"] == 99.96 and card["epochs"] == 8.0 and card["dataset"] == "easy-vqa"
    assert card["pipeline_tag"] == "visual-question-answering"


def test_cards_without_metadata(tmp_path):
    assert read_card(tmp_path) == {}  # no README.md
    (tmp_path / "README.md").write_text("# just a title\n")
    assert read_card(tmp_path) == {}


@pytest.mark.parametrize("content, problem", [
    (b"---\ndataset: caf\xe9\n---\n", "is not UTF-8"),  # Latin-1, as some editors save
    (b"---\ndataset: [unclosed\n---\n", "has unreadable metadata"),
    (b"---\n- a list\n---\n", "has unreadable metadata"),
])
def test_unreadable_card_is_refused_by_name(copy_of, content, problem):
    folder = copy_of()
    (folder / "README.md").write_bytes(content)
    with pytest.raises(CheckpointError, match=f"model card .*README.md {problem}"):
        read_card(folder)
    with pytest.raises(CheckpointError, match=f"README.md {problem}"):
        load_checkpoint(folder)


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model"])
def test_empty_or_invalid_tokenizer_is_refused_by_name(copy_of, content):
    folder = copy_of()
    (folder / "tokenizer.model").write_bytes(content)
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_checkpoint(folder)


@pytest.mark.parametrize("value, half", [(float("nan"), False), (float("-inf"), False), (1e5, True)])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny_checkpoint, value, half):
    # 1e5 is finite in float32 but over float16's largest value (65504): a half save stores inf.
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    name = f"classifier.{len(model.classifier) - 1}.weight"
    with torch.no_grad():
        model.state_dict()[name][3, 5] = value
    folder = save_checkpoint(model, tokenizer, tmp_path / "bad", half=half)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' holds 1 NaN or infinite"):
        load_checkpoint(folder)


def test_leftovers_of_killed_saves_are_removed(tmp_path, tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    leftovers = [".out.k3j_x9a2", ".out.old"]  # what mkdtemp and the old-copy step name
    others = [".out.v2.k3j_x9a2", ".outer.k3j_x9a2", ".out.notes", "out.k3j_x9a2", "other"]
    for name in leftovers + others:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".out.abcdefgh").write_text("a file, not a folder we made")
    save_checkpoint(model, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + [".out.abcdefgh", "out"])


def test_a_save_killed_between_its_renames_keeps_the_old_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    # Killed after moving out -> .out.old and before moving the new one in: only .out.old holds it.
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tokenizer, tmp_path / "out", card="old")
    folder.rename(tmp_path / ".out.old")
    (tmp_path / ".out.a1b2c3d4").mkdir()  # the new one, maybe half written

    monkeypatch.setattr(VQAModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, folder, card="new")
    assert (folder / "README.md").read_text() == "old"
    load_checkpoint(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_every_range_accepts_its_ends_and_refuses_just_beyond():
    """For every option with a range (VQAConfig's and TrainOptions' metadata), the ends pass
    check_options and a value just beyond each is refused, naming the flag."""
    from dataclasses import fields

    from vqa.config import TrainOptions, VQAConfig, check_options
    from vqa.errors import OptionError

    specs = [f for f in (*fields(VQAConfig), *fields(TrainOptions)) if {"low", "high", "above"} & f.metadata.keys()]
    assert len(specs) >= 20
    for spec in specs:
        meta, flag = spec.metadata, "--" + spec.name.replace("_", "-")
        integer = "int" in str(spec.type) and "float" not in str(spec.type)
        step = 1 if integer else 1e-9 * max(1.0, abs(meta.get("high", 1)))
        ends = [meta[k] for k in ("low", "high") if k in meta]
        beyond = [meta["low"] - step] if "low" in meta else []
        beyond += [meta["high"] + step] if "high" in meta else []
        if "above" in meta:
            ends.append(meta["above"] + step)
            beyond.append(meta["above"])
        for value in ends:
            check_options({spec.name: value}, [spec])
        for value in beyond:
            with pytest.raises(OptionError, match=flag):
                check_options({spec.name: value}, [spec])
