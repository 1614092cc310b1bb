"""Attention told where to look: the sets each program looks at (vqa/programs.py), the points
each hop is given (vqa/batching.py), and the model's counts, every-hop answer and attention
loss (vqa/model.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from fixtures import tiny_config

from vqa.batching import QuestionDataset, VQACollator, attention_points
from vqa.errors import DataError
from vqa.model import COUNT_BINS, VQAModel, architecture, counts, location_targets
from vqa.programs import hop_sets, program_nodes, referred_sets
from vqa.records import load_vqa_split
from vqa.text import QuestionTokenizer
from vqa.worlds.shapes import write_split

ANSWERS = ["yes", "no", "0", "1", "2", "3"]

# Objects 0..4 of a CLEVR-format scene; relationships[rel][i]: the objects that are rel of object i.
SCENE = {
    "objects": [
        {"shape": "square", "color": "blue", "size": "large", "pixel_coords": [100, 60]},
        {"shape": "circle", "color": "red", "size": "small", "pixel_coords": [20, 20]},
        {"shape": "circle", "color": "red", "size": "large", "pixel_coords": [40, 100]},
        {"shape": "circle", "color": "red", "size": "small", "pixel_coords": [120, 20]},
        {"shape": "square", "color": "green", "size": "small", "pixel_coords": [60, 60]},
    ],
    "relationships": {"left": [[1, 2, 4], [], [1], [0, 1, 2, 4], [1, 2]],
                      "right": [[3], [0, 2, 3, 4], [0, 3, 4], [], [0, 3]]},
}
# "How many red circles are left of the blue square?"
COUNT_LEFT = program_nodes(("count", None, ("filter_shape", "circle", ("filter_color", "red", (
    "relate", "left", ("unique", None, ("filter_shape", "square", ("filter_color", "blue", ("scene", None)))))))))
# "Are there more red things than squares?"
MORE = program_nodes(("greater_than", None, ("count", None, ("filter_color", "red", ("scene", None))),
                      ("count", None, ("filter_shape", "square", ("scene", None)))))


def test_a_program_looks_at_its_anchor_then_at_the_set_it_answers_about():
    assert referred_sets(COUNT_LEFT, SCENE) == [(frozenset({0}), False), (frozenset({1, 2}), True)]
    assert referred_sets(MORE, SCENE) == [(frozenset({1, 2, 3}), True), (frozenset({0, 4}), True)]
    # The shapes world's own executor agrees on the answer the last set gives.
    assert len(referred_sets(COUNT_LEFT, SCENE)[-1][0]) == 2


def test_each_hop_gets_a_set_the_last_hop_the_answers():
    looked = referred_sets(COUNT_LEFT, SCENE)
    assert hop_sets(looked, 1) == [frozenset({1, 2})]
    assert hop_sets(looked, 2) == [frozenset({0}), frozenset({1, 2})]
    assert hop_sets(looked, 3) == [frozenset({0}), frozenset({0}), frozenset({1, 2})]  # the first repeats
    # Two answer sets, two hops: one each, in order; one hop: the last.
    assert hop_sets(referred_sets(MORE, SCENE), 2) == [frozenset({1, 2, 3}), frozenset({0, 4})]
    assert hop_sets(referred_sets(MORE, SCENE), 1) == [frozenset({0, 4})]


def test_with_several_anchors_the_hop_before_the_answer_gets_the_nearest():
    # count_and's shape: two references each related, intersected, then counted.
    looked = [(frozenset({2}), False), (frozenset({0}), False), (frozenset({0, 1}), False),
              (frozenset({1, 2}), False), (frozenset({1}), True)]
    assert hop_sets(looked, 2) == [frozenset({1, 2}), frozenset({1})]
    assert hop_sets(looked, 3) == [frozenset({0, 1}), frozenset({1, 2}), frozenset({1})]
    # More answer sets than hops: the first and the last.
    answers = [(frozenset({k}), True) for k in range(4)]
    assert hop_sets(answers, 2) == [frozenset({0}), frozenset({3})]


def test_programs_that_do_not_run_on_the_scene_get_no_target():
    not_unique = program_nodes(("query_size", None, ("unique", None, ("filter_color", "red", ("scene", None)))))
    assert referred_sets(not_unique, SCENE) is None  # three red things: "the red thing" names none
    unknown = [{"function": "scene", "inputs": []}, {"function": "filter_glow", "inputs": [0], "value_inputs": []}]
    assert referred_sets(unknown, SCENE) is None
    # An empty set is a target (exist: no, count: 0): the map should find nothing.
    none = program_nodes(("exist", None, ("filter_color", "yellow", ("scene", None))))
    assert referred_sets(none, SCENE) == [(frozenset(), True)]


def test_the_shapes_worlds_questions_look_where_their_answers_are(tmp_path):
    """On generated scenes, the last hop's set of every count question holds as many objects
    as its answer, and every exist question's set is empty exactly when the answer is no."""
    paths = write_split(tmp_path, "val", 12, 5, questions_per_scene=10, progress=False, workers=1)
    scenes = {s["image_filename"]: s for s in json.loads(paths["scenes"].read_text())["scenes"]}
    split = load_vqa_split(paths["questions"], paths["annotations"], paths["images"], scenes_file=paths["scenes"])
    checked = 0
    for record in split.records:
        looked = referred_sets(record["program"], scenes[split.image_paths[record["image_id"]].name])
        assert looked is not None, record["question"]
        last = hop_sets(looked, 2)[-1]
        if record["question_type"] == "count":
            assert len(last) == int(record["multiple_choice_answer"]), record["question"]
            checked += 1
        if record["template"] == "exist":
            assert bool(last) == (record["multiple_choice_answer"] == "yes"), record["question"]
            checked += 1
    assert checked >= 10

    # The dataset gives each hop the objects' centres, through the letterbox, in 0..1.
    points = attention_points(split, split.records, 2, (3, 128, 128))
    record = next(r for r in split.records if r["question_type"] == "count" and r["multiple_choice_answer"] != "0")
    scene = scenes[split.image_paths[record["image_id"]].name]
    expected = sorted(hop_sets(referred_sets(record["program"], scene), 2)[-1])
    assert points[split.records.index(record)][-1] == [
        pytest.approx(((scene["objects"][i]["pixel_coords"][0] + 0.5) / 128,
                       (scene["objects"][i]["pixel_coords"][1] + 0.5) / 128)) for i in expected]


def test_data_without_scene_graphs_is_refused_with_the_way_out(tmp_path):
    paths = write_split(tmp_path, "val", 2, 0, questions_per_scene=2, progress=False, workers=1, image_size=64)
    split = load_vqa_split(paths["questions"], paths["annotations"], paths["images"])
    with pytest.raises(DataError, match="scene graphs.*--attention-supervision-weight 0"):
        attention_points(split, split.records, 2, (3, 64, 64))


def test_the_collator_pads_points_and_marks_questions_without_targets():
    collator = VQACollator(images=type("Images", (), {"batch": lambda self, ids: {}})(), num_answers=2)
    batch = collator([
        {"input_ids": [3, 4], "image_id": 1, "scores": None, "points": [[(0.1, 0.2)], [(0.5, 0.5), (0.9, 0.9)]]},
        {"input_ids": [3], "image_id": 1, "scores": None, "points": None},
        {"input_ids": [5], "image_id": 2, "scores": None, "points": [[], [(0.3, 0.3)]]},
    ])
    assert batch["attention_points"].shape == (3, 2, 2, 2)
    assert batch["attention_known"].tolist() == [True, False, True]
    assert batch["attention_points"][0, 1].flatten().tolist() == pytest.approx([0.5, 0.5, 0.9, 0.9])
    assert batch["attention_points"][2, 0].isnan().all()  # an empty set: nothing to find


def test_points_become_the_map_locations_they_fall_in():
    nan = float("nan")
    points = torch.tensor([[[[0.05, 0.05], [0.99, 0.6]], [[0.5, 0.5], [nan, nan]]]])  # (1, 2 hops, 2, 2)
    targets = location_targets(points, 4, 4)
    assert targets.shape == (1, 2, 16)
    assert targets[0, 0].nonzero().flatten().tolist() == [0, 2 * 4 + 3]  # top left; row 2, last column
    assert targets[0, 1].nonzero().flatten().tolist() == [2 * 4 + 2]  # NaN padding finds nothing


def test_counts_are_the_sum_of_sigmoid_scores_as_soft_bins():
    logits = torch.full((2, 16, 1), -20.0)
    logits[0, :3] = 20.0  # three locations selected
    bins = counts(logits)
    assert bins.shape == (2, COUNT_BINS)
    assert bins.argmax(1).tolist() == [3, 0]
    assert bins[0, 3].item() == pytest.approx(1.0, abs=1e-6) and bins[0, 2].item() == pytest.approx(torch.e ** -1)


def make_model(**overrides) -> VQAModel:
    torch.manual_seed(0)
    config = tiny_config(ANSWERS, vocab_size=50, image_size=64, attention_glimpses=2, output_stride=8, **overrides)
    return VQAModel(config).eval()


def inputs(n_images=3, n_questions=7):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(1, 50, (n_questions, 6)), "lengths": torch.randint(1, 7, (n_questions,)),
            "image_index": torch.arange(n_questions) % n_images, "pixel_values": torch.randn(n_images, 3, 64, 64)}


def test_levers_off_leave_the_model_as_it_was():
    plain = make_model(attention_hops=2)
    explicit = make_model(attention_hops=2, attention_counts=False, attention_all_hops=False,
                          attention_supervision_weight=0.0)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(**inputs()).logits, explicit(**inputs()).logits)
    assert architecture(plain.config) == architecture(explicit.config)


def test_counts_widen_each_hops_glimpses_and_the_answer_can_read_every_hop():
    model = make_model(attention_hops=2, attention_counts=True, attention_all_hops=True)
    encoder = model.image_encoder
    grid_dim = model.config.image_feature_dim
    assert encoder.project.in_features == 2 * grid_dim + 2 * COUNT_BINS
    assert "with counts, the answer reading every hop" in architecture(model.config)
    batch = inputs()
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"])
        questions = model.question_vectors(batch["input_ids"], batch["lengths"])
        grid, index = encoder.grid(features), batch["image_index"]
        query, outputs = questions, []
        for attention, project in [(encoder.attention, encoder.project), (encoder.more_attention[0],
                                                                           encoder.more_project[0])]:
            logits = attention.logits(grid, query, index)
            glimpses = (logits.softmax(1).transpose(1, 2) @ grid[index]).flatten(1)
            outputs.append(project(torch.cat([glimpses, counts(logits)], dim=1)))
            query = questions * torch.tanh(outputs[-1])
        assert torch.allclose(encoder(features, questions, index), torch.tanh(outputs[0] + outputs[1]), atol=1e-6)
        # Without every hop, the answer reads the last hop only.
        last = make_model(attention_hops=2, attention_counts=True)
        last.load_state_dict(model.state_dict())
        assert torch.allclose(last.image_encoder(features, questions, index), torch.tanh(outputs[1]), atol=1e-6)


def test_the_attention_loss_teaches_the_first_glimpse_where_the_objects_are():
    """Supervised, the answers are the model's own (the same logits), the loss adds the weighted
    BCE of each hop's first glimpse against its objects, and a few steps on it alone move the
    glimpse onto those objects; questions without targets add nothing."""
    model = make_model(attention_hops=2, attention_supervision_weight=2.0, dropout=0.0, freeze_backbone=True)
    batch = inputs(n_images=2, n_questions=4)
    nan = float("nan")
    points = torch.tensor([[[[0.1, 0.1], [nan, nan]], [[0.9, 0.1], [0.1, 0.9]]]] * 4)  # (4, 2, 2, 2)
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), len(ANSWERS)).float()
    known = torch.tensor([True, True, True, False])
    with torch.no_grad():
        supervised = model(**batch, labels=labels, attention_points=points, attention_known=known)
        plain = model(**batch, labels=labels)
        features = model.image_features(batch["pixel_values"])
        questions = model.question_vectors(batch["input_ids"], batch["lengths"])
        _, hop_logits = model.image_encoder.attend(features, questions, batch["image_index"])
    assert torch.equal(supervised.logits, plain.logits)
    targets = location_targets(points, 8, 8)
    scores = torch.stack([s[..., 0] for s in hop_logits], dim=1)
    expected = F.binary_cross_entropy_with_logits(scores, targets, reduction="none").sum((1, 2))[:3].mean()
    assert supervised.loss.item() == pytest.approx(plain.loss.item() + 2.0 * expected.item(), rel=1e-5)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    cached = {k: v for k, v in batch.items() if k != "pixel_values"} | {"image_features": features}
    for _ in range(150):
        optimizer.zero_grad()
        output = model(**cached, labels=torch.zeros_like(labels), attention_points=points, attention_known=known)
        output.loss.backward()
        optimizer.step()
    with torch.no_grad():
        maps = model.eval().attention_maps(features, model.question_vectors(batch["input_ids"], batch["lengths"]),
                                           batch["image_index"])  # (B, hops * G, 8, 8)
    first_hop, second_hop = maps[:3, 0].flatten(1), maps[:3, 2].flatten(1)
    assert first_hop.argmax(1).tolist() == [0] * 3  # (0.1, 0.1): top left
    assert (second_hop[:, [7, 56]].sum(1) > 0.75).all()  # top right and bottom left share the glimpse (uniform: 0.03)


def test_the_dataset_gives_points_only_when_asked(tmp_path):
    paths = write_split(tmp_path, "val", 4, 1, questions_per_scene=5, progress=False, workers=1, image_size=64)
    split = load_vqa_split(paths["questions"], paths["annotations"], paths["images"], scenes_file=paths["scenes"])
    tokenizer = QuestionTokenizer.train([r["question"] for r in split.records], vocab_size=400)
    plain = QuestionDataset(split, tokenizer, {"yes": 0}, 16)
    supervised = QuestionDataset(split, tokenizer, {"yes": 0}, 16, attention=(2, (3, 64, 64)))
    assert "points" not in plain[0] and len(supervised[0]["points"]) == 2
    # A subset (the held-out part of a split) keeps its scene graphs.
    assert split.subset(split.image_ids[:2], "part").scenes_file == paths["scenes"]


def test_training_on_files_with_scene_graphs_supervises_attention(tmp_path):
    """The real Trainer on a tiny world in VQA v2 layout with its scenes file: the run trains
    with the attention loss (its logged loss is above the same run's without it) and writes a
    checkpoint whose card names the levers; without the scene graphs it stops before any work."""
    from vqa.config import TrainOptions
    from vqa.trainer import train

    paths = write_split(tmp_path / "data", "train", 24, 2, questions_per_scene=6, progress=False, workers=1,
                        image_size=64)
    common = dict(dataset="files", train_questions=str(paths["questions"]), train_annotations=str(paths["annotations"]),
                  train_images=str(paths["images"]), epochs=1, batch_size=32, tokenizer_vocab=300, logging_steps=1)
    model_options = dict(backbone="test_resnet", image_size=64, output_stride=8, embed_dim=8, lstm_hidden=8,
                         common_dim=16, classifier_hidden=16, dropout=0.0, attention_glimpses=1, attention_hops=2,
                         attention_counts=True, attention_all_hops=True, attention_supervision_weight=1.0)
    with pytest.raises(DataError, match="--train-scene-graphs"):
        train(TrainOptions(output_dir=str(tmp_path / "none"), **common), model_options, argv=["train.py"])
    assert not (tmp_path / "none.trainer").exists()  # refused before any work

    losses = {}
    for name, weight in (("supervised", 1.0), ("plain", 0.0)):
        options = TrainOptions(output_dir=str(tmp_path / name), train_scene_graphs=str(paths["scenes"]), **common)
        train(options, model_options | {"attention_supervision_weight": weight}, argv=["train.py"])
        state = json.loads(next((tmp_path / f"{name}.trainer").glob("checkpoint-*/trainer_state.json")).read_text())
        losses[name] = state["log_history"][0]["loss"]
    card = (tmp_path / "supervised" / "README.md").read_text()
    assert "with counts, the answer reading every hop" in card
    # The first step of both runs starts from the same weights and batch: the difference is the
    # attention loss, a BCE summed over 2 hops x 64 locations (about 2 x 64 x 0.69 at the start).
    assert losses["supervised"] > losses["plain"] + 20


def test_the_hop_product_multiplies_every_hops_vector():
    model = make_model(attention_hops=2, attention_all_hops=True, attention_hop_product=True)
    summed = make_model(attention_hops=2, attention_all_hops=True)
    summed.load_state_dict(model.state_dict())  # the same parameters: only the combination differs
    assert "the answer reading the product of every hop" in architecture(model.config)
    batch = inputs()
    encoder = model.image_encoder
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"])
        questions = model.question_vectors(batch["input_ids"], batch["lengths"])
        index = batch["image_index"]
        outputs = [p for _, p in encoder._hops(features, questions, index)]
        assert torch.allclose(encoder(features, questions, index), torch.tanh(outputs[0]) * torch.tanh(outputs[1]),
                              atol=1e-6)
        assert torch.allclose(summed.image_encoder(features, questions, index), torch.tanh(outputs[0] + outputs[1]),
                              atol=1e-6)
