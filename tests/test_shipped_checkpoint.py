"""The shipped checkpoint: what the README promises about it, measured."""

import pytest

from fixtures import SHIPPED_CHECKPOINT
from vqa.checkpoint import load_checkpoint, read_card
from vqa.data import load_easy_vqa
from vqa.evaluation import predict_split
from vqa.metrics import evaluate_results

pytestmark = pytest.mark.skipif(not (SHIPPED_CHECKPOINT / "model.safetensors").is_file(),
                                reason=f"no shipped checkpoint at {SHIPPED_CHECKPOINT}")


@pytest.fixture(scope="module")
def test_metrics():
    model, tokenizer = load_checkpoint(SHIPPED_CHECKPOINT)
    split = load_easy_vqa("test")
    results, _ = predict_split(model, tokenizer, split, progress=False)
    return evaluate_results(results, split)


def test_accuracy_on_the_easy_vqa_test_split(test_metrics):
    assert len(test_metrics["perQuestion"]) == 9673
    assert test_metrics["overall"] >= 99.5
    assert test_metrics["perAnswerType"]["yes/no"] >= 99.0 and test_metrics["perAnswerType"]["other"] >= 99.0


def test_model_card_states_what_was_measured(test_metrics):
    card = read_card(SHIPPED_CHECKPOINT)
    assert card["dataset"] == "easy-vqa" and card["test_questions"] == 9673
    assert card["test_accuracy"] == pytest.approx(test_metrics["overall"], abs=0.01)
    assert card["training_time_s"] <= 15 * 60
    assert "--output-dir checkpoints/easy-vqa" in card["command"]


def test_checkpoint_is_small():
    size = sum(p.stat().st_size for p in SHIPPED_CHECKPOINT.iterdir())
    assert size < 20 * 1024 * 1024
