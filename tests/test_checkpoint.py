import json
import pickle
import shutil

import pytest
import torch

from vqa.checkpoint import load_checkpoint, read_card, render_card, save_checkpoint
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


def test_round_trip_gives_the_same_model(tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    again, _ = load_checkpoint(tiny_checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not model.training
    assert len(tokenizer) == model.config.vocab_size


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
    assert read_card(folder) == {"test_accuracy": 99.9}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    folder = save_checkpoint(model, tokenizer, tmp_path / "out", card="good")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(VQAModel, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, folder, card="never written")
    assert (folder / "README.md").read_text() == "good"
    load_checkpoint(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


