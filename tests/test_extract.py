"""training/extract_features.py, and torchrun: sharded extraction and DDP training.

The torchrun tests launch `python -m torch.distributed.run --nproc-per-node 2` on the
CPU (gloo) with tiny models, and compare against one process doing the same work.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, draw_shape, make_vqa_v2_files

from vqa.checkpoint import read_card
from vqa.features import FeatureCache

EXTRACT = ROOT / "training" / "extract_features.py"
TRAIN = ROOT / "training" / "train.py"
TINY_CNN = ["--backbone", "test_resnet", "--image-size", "32", "--crop-pct", "1.0"]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: list, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """A script in its own process(es), one CPU thread each (as torchrun sets it)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def extract_cli():
    script = load_script(EXTRACT)
    return lambda args: script.main([str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return make_vqa_v2_files(tmp_path_factory.mktemp("vqa"), n_images=6)


def test_cli_extracts_every_image_of_the_folder(tmp_path, files, extract_cli, capsys):
    code = extract_cli([*TINY_CNN, "--images", files["images"], "--out", tmp_path / "cache",
                             "--batch-size", "4", "--num-workers", "0", "--no-progress"])
    assert code == 0
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 6 and cache.meta["backbone"] == "test_resnet" and cache.meta["image_size"] == 32
    assert "features of 6 images" in capsys.readouterr().out


def test_cli_with_questions_extracts_only_their_images(tmp_path, files, extract_cli):
    extra = Path(files["images"]).parent / "extra"
    extra.mkdir(exist_ok=True)
    for image in Path(files["images"]).iterdir():
        (extra / image.name).write_bytes(image.read_bytes())
    draw_shape("red", "circle").save(extra / "COCO_val2014_000000999999.jpg")
    code = extract_cli([*TINY_CNN, "--images", extra, "--questions", files["questions"],
                             "--out", tmp_path / "cache", "--num-workers", "0", "--no-progress"])
    assert code == 0
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 6 and 999_999 not in cache


def test_cli_names_missing_weights(tmp_path, files, extract_cli, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a cache miss, never a download
    args = [*TINY_CNN, "--images", files["images"], "--out", tmp_path / "cache", "--no-progress"]
    assert extract_cli([*args, "--pretrained"]) == 2
    assert "no pretrained weights for timm model 'test_resnet'" in capsys.readouterr().err
    assert extract_cli([*args, "--weights", tmp_path / "nowhere.safetensors"]) == 2
    assert "backbone weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "index.json").exists()


def test_torchrun_extraction_equals_one_process(tmp_path, extract_cli):
    data = make_vqa_v2_files(tmp_path / "data", n_images=13)  # 13: the two ranks get unequal shares
    args = [*TINY_CNN, "--images", data["images"], "--batch-size", "4", "--num-workers", "0", "--no-progress"]
    assert extract_cli([*args, "--out", tmp_path / "one"]) == 0
    run([EXTRACT, *args, "--out", tmp_path / "two"], processes=2)
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert not (tmp_path / "two" / "shards").exists()
    ids = sorted(one.index)
    assert sorted(two.index) == ids and len(ids) == 13
    assert one.meta == two.meta
    # Both are fp16 roundings of fp32 features computed in batches of other sizes:
    # at most one fp16 step apart (relative 2**-10 ~ 1e-3).
    np.testing.assert_allclose(two.get(ids).numpy(), one.get(ids).numpy(), rtol=2e-3, atol=1e-4)


def loss_curve(output_dir: Path) -> list[dict]:
    work = output_dir.with_name(output_dir.name + ".trainer")
    last = max(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [{k: h[k] for k in ("step", "loss", "eval_loss", "eval_vqa_accuracy") if k in h} for h in history]


def test_torchrun_training_follows_the_single_process_loss_curve(tmp_path):
    """Two processes with batch 2 each take the same steps as one process with batch 4.

    ImageGroupedSampler draws the same question order in every process (it depends only
    on seed and epoch) and accelerate hands consecutive batches of it to consecutive
    ranks, so step k's global batch is questions [4k, 4k+4) in both runs. DDP averages the
    two half-batch gradients, which equals the full-batch mean when the halves are equal:
    the sizes below make every batch full (144 training questions, 16 validation
    questions). Dropout is 0, as its masks are drawn per process. What is left is float
    reassociation (two B=2 GEMMs + all-reduce vs one B=4 GEMM): about 1e-7 relative per
    step, seen here as <= 1e-6 after 108 Adam steps. The tolerance, 1e-4, is 100x that and
    still 10x below what another batch composition does: another question order moves
    the logged training losses by 1-6 % and the validation losses by 0.1-0.2 %.
    """
    data = make_vqa_v2_files(tmp_path / "data", n_images=80)  # 72 training images, 8 held out
    args = [TRAIN, "--dataset", "files", "--train-questions", data["questions"],
            "--train-annotations", data["annotations"], "--train-images", data["images"], *TINY_CNN,
            "--freeze-backbone", "--embed-dim", "8", "--lstm-hidden", "8", "--common-dim", "16",
            "--classifier-hidden", "16", "--dropout", "0", "--epochs", "3", "--seed", "0"]
    run([*args, "--batch-size", "4", "--output-dir", tmp_path / "one"])
    run([*args, "--batch-size", "2", "--output-dir", tmp_path / "two"], processes=2)

    card = read_card(tmp_path / "one")
    assert card["train_questions"] % 4 == 0 and card["val_questions"] % 8 == 0  # full batches only
    one, two = loss_curve(tmp_path / "one"), loss_curve(tmp_path / "two")
    assert [h["step"] for h in one] == [h["step"] for h in two]
    assert sum("loss" in h for h in one) >= 4 and sum("eval_loss" in h for h in one) == 3
    for a, b in zip(one, two):
        for key in ("loss", "eval_loss", "eval_vqa_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"])
    losses = [h["loss"] for h in one if "loss" in h]
    assert losses[-1] < losses[0]  # it learned: the curves compared are not flat
    assert read_card(tmp_path / "two")["val_accuracy"] == pytest.approx(card["val_accuracy"], abs=1e-2)
