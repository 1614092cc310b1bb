"""VQAModel: the one forward path (image_features -> question_vectors -> answer_logits), the
paper's pooled formula, question-guided attention, save/load, the backbone and its transform."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import ForwardCounter, tiny_config
from PIL import Image
from timm.data import resolve_data_config

from vqa.checkpoint import load_checkpoint, save_checkpoint
from vqa.errors import CheckpointError
from vqa.images import ModelTransform
from vqa.model import VQAModel, architecture, create_backbone
from vqa.trainer import extend_answers

ANSWERS = ["yes", "no", "red", "circle"]


def batch(n_images=3, n_questions=7, vocab=50, size=32):
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(1, vocab, (n_questions, 6)),
        "lengths": torch.randint(1, 7, (n_questions,)),
        "image_index": torch.arange(n_questions) % n_images,
        "pixel_values": torch.randn(n_images, 3, size, size),
    }


def make_model(seed=0, **overrides) -> VQAModel:
    torch.manual_seed(seed)
    return VQAModel(tiny_config(ANSWERS, vocab_size=50, **{"image_size": 32, **overrides})).eval()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def attention_model():
    # 64 px through test_resnet at output_stride 8: an 8 x 8 map.
    return make_model(image_size=64, attention_glimpses=2, output_stride=8)


# The forward path.

def test_shapes_and_soft_cross_entropy_loss(model):
    inputs = batch()
    labels = torch.zeros(7, len(ANSWERS))
    labels[:, 0] = 1.0
    labels[0, 1] = 0.3
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (7, len(ANSWERS))
    expected = -(labels * torch.log_softmax(out.logits, -1)).sum(-1).mean()
    assert torch.allclose(out.loss, expected)
    assert model(**inputs).loss is None


def test_pooled_model_is_bit_identical_to_the_papers_formula(model):
    """G = 0: tanh(project(normalise(CNN(x))))[image_index] * question -> classifier, written out
    by hand as the model computed it before the forward path was split into three steps."""
    inputs = batch()
    with torch.no_grad():
        features = model.image_encoder.backbone(inputs["pixel_values"])  # (N, F) pooled
        normalised = F.normalize(features.float(), dim=-1) * features.shape[-1] ** 0.5
        image = torch.tanh(model.image_encoder.project(normalised))[inputs["image_index"]]
        question = model.question_encoder(inputs["input_ids"], inputs["lengths"])
        expected = model.classifier(image * question)
        logits = model(**inputs).logits
    assert torch.equal(logits, expected)
    # Checkpoints of the pooled model hold no attention weights: old checkpoints still load.
    assert not any("attention" in key for key in model.state_dict())


def test_forward_is_the_three_steps_chained(model):
    inputs = batch()
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"])
        questions = model.question_vectors(inputs["input_ids"], inputs["lengths"])
        steps = model.answer_logits(features, questions, inputs["image_index"])
        assert torch.equal(model(**inputs).logits, steps)
    assert features.shape == (3, model.config.image_feature_dim) and questions.shape == (7, 32)
    assert model.attention_maps(features, questions, inputs["image_index"]) is None
    assert model.pooled_features(features) is features


def test_forward_takes_only_its_named_inputs(model):
    inputs = batch()
    with pytest.raises(ValueError, match="needs pixel_values or image_features"):
        model(**{**inputs, "pixel_values": None})
    with pytest.raises(TypeError, match="question_index"):
        model(**inputs, question_index=torch.arange(7))  # no **kwargs swallowing stray batch keys


def test_question_vector_is_h_and_c_of_every_layer(model):
    """Each question run alone through the LSTM, unpadded: its final (h, c) of both layers,
    concatenated as [h_1, h_2, c_1, c_2], projected and squashed, is the question vector."""
    encoder = model.question_encoder
    inputs = batch()
    with torch.no_grad():
        vectors = model.question_vectors(inputs["input_ids"], inputs["lengths"])
        for row, (ids, length) in enumerate(zip(inputs["input_ids"], inputs["lengths"])):
            _, (h, c) = encoder.lstm(torch.tanh(encoder.embed(ids[None, :length])))  # each (layers, 1, H)
            state = torch.cat([h[0, 0], h[1, 0], c[0, 0], c[1, 0]])
            torch.testing.assert_close(vectors[row], torch.tanh(encoder.project(state)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which, layer", [("h", 0), ("h", 1), ("c", 0), ("c", 1)])
def test_changing_the_final_state_of_any_layer_changes_the_question_vector(model, which, layer):
    inputs = batch()
    with torch.no_grad():
        before = model.question_vectors(inputs["input_ids"], inputs["lengths"])

    def change(module, args, output):
        out, (h, c) = output
        state = (h, c)[which == "c"].clone()
        state[layer] += 0.5
        return out, (state, c) if which == "h" else (h, state)

    handle = model.question_encoder.lstm.register_forward_hook(change)
    try:
        with torch.no_grad():
            after = model.question_vectors(inputs["input_ids"], inputs["lengths"])
    finally:
        handle.remove()
    assert (after - before).abs().max(dim=1).values.min() > 1e-4, "every question's vector should move"


def test_each_image_runs_through_the_cnn_once(model):
    with ForwardCounter(model.image_encoder.backbone) as cnn:
        model(**batch(n_images=3, n_questions=12))
    assert cnn.batch_sizes == [3]


@pytest.mark.parametrize("glimpses", [0, 2])
def test_cached_features_give_the_same_logits(glimpses):
    model = make_model(image_size=64, attention_glimpses=glimpses, output_stride=8 if glimpses else None)
    inputs = batch(size=64)
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"])
        from_pixels = model(**inputs).logits
        from_features = model(**{**inputs, "pixel_values": None}, image_features=features).logits
    assert torch.equal(from_pixels, from_features)


def test_padding_does_not_change_the_answer(model):
    ids = torch.tensor([[4, 9, 13, 0, 0, 0]])
    common = {"image_index": torch.tensor([0]), "pixel_values": batch()["pixel_values"][:1]}
    with torch.no_grad():
        short = model(input_ids=ids[:, :3], lengths=torch.tensor([3]), **common).logits
        padded = model(input_ids=ids, lengths=torch.tensor([3]), **common).logits
    assert torch.allclose(short, padded, atol=1e-6)


# Question-guided attention.

def test_attention_maps_are_one_distribution_per_glimpse(attention_model):
    inputs = batch(size=64)
    with torch.no_grad():
        features = attention_model.image_features(inputs["pixel_values"])
        questions = attention_model.question_vectors(inputs["input_ids"], inputs["lengths"])
        maps = attention_model.attention_maps(features, questions, inputs["image_index"])
    assert features.dim() == 4 and features.shape[:2] == (3, attention_model.config.image_feature_dim)
    b, g, h, w = maps.shape
    assert (b, g) == (7, 2) and h >= 8 and w >= 8 and (h, w) == features.shape[2:]
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(7, 2))
    # Questions 0 and 3 look at the same image (image_index 0): their maps differ by question alone.
    assert inputs["image_index"][0] == inputs["image_index"][3]
    assert not torch.allclose(maps[0], maps[3])
    torch.testing.assert_close(attention_model.pooled_features(features), features.mean(dim=(2, 3)))


def test_the_attention_maps_are_the_weights_the_answer_uses(attention_model):
    """Answer logits written out from the maps: each glimpse's weighted sum of the normalised
    location features, concatenated, projected, fused with the question, classified."""
    inputs = batch(size=64)
    model = attention_model
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"])
        questions = model.question_vectors(inputs["input_ids"], inputs["lengths"])
        maps = model.attention_maps(features, questions, inputs["image_index"])  # (B, G, h, w)
        grid = features.flatten(2).transpose(1, 2)  # (N, L, F)
        grid = F.normalize(grid, dim=-1) * grid.shape[-1] ** 0.5
        attended = maps.flatten(2) @ grid[inputs["image_index"]]  # (B, G, F)
        image = torch.tanh(model.image_encoder.project(attended.flatten(1)))
        expected = model.classifier(image * questions)
        logits = model.answer_logits(features, questions, inputs["image_index"])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_architecture_says_what_the_model_is(model, attention_model):
    assert architecture(model.config) == ("test_resnet CNN + 2-layer LSTM (24 units), "
                                          "fused by elementwise product in 32 dimensions")
    assert "2-glimpse question-guided attention" in architecture(attention_model.config)


# Saving and loading.

@pytest.mark.parametrize("options", [{}, {"image_size": 64, "attention_glimpses": 2, "output_stride": 8}],
                         ids=["pooled", "attention"])
def test_round_trip_gives_the_same_model(tmp_path, easy_vqa_tokenizer, options):
    """A model against a fresh save_checkpoint -> load_checkpoint of it: every tensor and every
    logit equal. The control, a model from another seed, differs in both: the comparison can fail."""
    def build(seed):
        torch.manual_seed(seed)
        return VQAModel(tiny_config(ANSWERS, len(easy_vqa_tokenizer), **{"image_size": 32, **options})).eval()

    original, other = build(0), build(1)
    loaded, tokenizer = load_checkpoint(save_checkpoint(original, easy_vqa_tokenizer, tmp_path / "model"))
    assert not loaded.training and len(tokenizer) == len(easy_vqa_tokenizer)
    assert loaded.config.answers == ANSWERS
    for key in ("attention_glimpses", "output_stride", "image_size", "image_feature_dim"):
        assert getattr(loaded.config, key) == getattr(original.config, key), key
    state, loaded_state = original.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(state)
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    assert not all(torch.equal(other.state_dict()[key], value) for key, value in state.items())

    inputs = batch(vocab=len(easy_vqa_tokenizer), size=original.config.image_size)
    with torch.no_grad():
        logits = original(**inputs).logits
        # The weights are equal bit for bit (above), but the loaded ones are memory-mapped from the
        # safetensors file at addresses 8 bytes past a 64-byte boundary, and with one thread the CPU
        # convolution sums in an order that depends on that alignment: the logits (about 0.1) then
        # differ by 1.5e-8, about one float32 step (copies of the loaded weights give equal logits). The
        # tolerance is 7 to 20 times that; the control, another seed's model, differs by about 0.1.
        torch.testing.assert_close(loaded(**inputs).logits, logits, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(other(**inputs).logits, logits)


def test_frozen_backbone_gets_no_gradient():
    model = VQAModel(tiny_config(ANSWERS, vocab_size=50, image_size=32, freeze_backbone=True))
    out = model(**batch(), labels=torch.full((7, len(ANSWERS)), 0.25))
    out.loss.backward()
    assert all(p.grad is None for p in model.image_encoder.backbone.parameters())
    assert model.image_encoder.project.weight.grad is not None


def test_transform_letterboxes_with_the_backbones_own_normalisation(model):
    transform = model.image_transform()
    assert isinstance(transform, ModelTransform)
    pixels = transform(Image.new("RGB", (100, 60), (255, 0, 0)))
    assert pixels.shape == (3, 32, 32)
    # Pure red normalised with the backbone's own mean/std from its timm pretrained config.
    timm_config = resolve_data_config({}, model=model.image_encoder.backbone)
    red = (1 - timm_config["mean"][0]) / timm_config["std"][0]
    green = (0 - timm_config["mean"][1]) / timm_config["std"][1]
    assert pixels[0, 16, 16].item() == pytest.approx(red, abs=1e-3)
    assert pixels[1, 16, 16].item() == pytest.approx(green, abs=1e-3)
    # 100 x 60 fits as 32 x 19, rows 6..24: the whole image, nothing cropped, padding 0.
    assert pixels[:, :6].abs().max() == 0 and pixels[:, 25:].abs().max() == 0
    assert pixels[0, 6:25].sub(red).abs().max() < 1e-3


def test_extending_answers_keeps_the_old_rows(model):
    old_weight = model.classifier[-1].weight.detach().clone()
    extend_answers(model, ["no", "blue", "yes", "square"])
    assert model.config.answers == ANSWERS + ["blue", "square"]
    assert model.config.label2id["square"] == 5
    assert torch.equal(model.classifier[-1].weight[: len(ANSWERS)], old_weight)
    assert model(**batch()).logits.shape == (7, 6)


# The backbone.

def cache_weights(hub_cache, state_dict) -> str:
    """Lay out `state_dict` as test_resnet's ImageNet weights in a Hugging Face hub cache folder."""
    from safetensors.torch import save_file

    repo = hub_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    path = repo / "snapshots" / "0123abcd" / "model.safetensors"
    save_file(state_dict, path)
    return str(path)


def test_pretrained_weights_offline_come_from_the_cache_or_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache and cannot be downloaded"):
        create_backbone("test_resnet", True)
    torch.manual_seed(5)
    cached = create_backbone("test_resnet").state_dict()
    cache_weights(hub_cache, cached)
    loaded = create_backbone("test_resnet", True)
    for key, value in cached.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pretrained_weights_online_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    """--pretrained online: huggingface_hub fetches model.safetensors (here from a local server that
    answers as the Hub's resolve endpoint does) into the cache; the second time, nothing is fetched."""
    import hashlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from safetensors.torch import save_file

    torch.manual_seed(7)
    weights = create_backbone("test_resnet").state_dict()
    save_file(weights, tmp_path / "served.safetensors")
    body = (tmp_path / "served.safetensors").read_bytes()
    requests = []

    class Hub(BaseHTTPRequestHandler):
        def _head(self):
            requests.append((self.command, self.path))
            if self.path != "/timm/test_resnet.r160_in1k/resolve/main/model.safetensors":
                self.send_error(404)
                return False
            self.send_response(200)
            self.send_header("X-Repo-Commit", "a" * 40)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return True

        def do_HEAD(self):
            self._head()

        def do_GET(self):
            if self._head():
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # A user behind a Hub mirror sets HF_ENDPOINT; huggingface_hub reads it when first imported.
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    code = ("import sys, torch; from vqa.model import create_backbone, pretrained_weights_file; "
            "print(pretrained_weights_file('test_resnet')); "
            "print(float(sum(t.double().sum() for t in create_backbone('test_resnet', True).state_dict().values())))")
    try:
        first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr[-2000:]
        path, total = first.stdout.split()
        assert Path(path).read_bytes() == body and Path(path).is_relative_to(tmp_path / "hub")
        assert float(total) == pytest.approx(float(sum(t.double().sum() for t in weights.values())))
        assert ("GET", "/timm/test_resnet.r160_in1k/resolve/main/model.safetensors") in requests
        requests.clear()
        again = subprocess.run([sys.executable, "-c", code], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                               text=True, timeout=120)
        assert again.returncode == 0 and again.stdout == first.stdout and requests == []  # the cache alone
    finally:
        server.shutdown()


def test_pretrained_weights_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("test_resnet", pretrained=str(tmp_path / "missing.safetensors"))
    pickle_file = tmp_path / "weights.pth"
    pickle_file.write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        create_backbone("test_resnet", pretrained=str(pickle_file))


def test_backbone_weights_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("test_resnet")
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    loaded = create_backbone("test_resnet", pretrained=str(tmp_path / "backbone.safetensors"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_output_stride_keeps_a_finer_map():
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        coarse = create_backbone("test_resnet").forward_features(pixels)
        fine = create_backbone("test_resnet", output_stride=8).forward_features(pixels)
    assert coarse.shape[2:] == (2, 2) and fine.shape[2:] == (8, 8)


# The levers of "models that learn their world": coordinates, hops, the word path, the side loss.

def test_levers_off_are_the_one_hop_model_bit_for_bit(attention_model):
    """Coordinates off, one hop, no word path and no side loss, said explicitly, build the same
    parameters and give the same logits, bit for bit, as the attention model without them;
    the one hop is the formula written out by hand, as the model computed it before hops."""
    explicit = make_model(image_size=64, attention_glimpses=2, output_stride=8, attention_coords=False,
                          attention_hops=1, question_word_path=False, side_loss_weight=0.0)
    assert list(explicit.state_dict()) == list(attention_model.state_dict())
    assert explicit.side_head is None
    inputs = batch(size=64)
    with torch.no_grad():
        assert torch.equal(explicit(**inputs).logits, attention_model(**inputs).logits)
        model = attention_model
        features = model.image_features(inputs["pixel_values"])
        questions = model.question_vectors(inputs["input_ids"], inputs["lengths"])
        grid = features.flatten(2).transpose(1, 2)
        grid = F.normalize(grid.float(), dim=-1) * grid.shape[-1] ** 0.5  # (N, L, F)
        attention = model.image_encoder.attention
        keys = torch.tanh(attention.locations(grid))
        weights = attention.scores(keys[inputs["image_index"]] * questions[:, None]).softmax(dim=1)
        image = torch.tanh(model.image_encoder.project((weights.transpose(1, 2) @ grid[inputs["image_index"]]).flatten(1)))
        assert torch.equal(model.answer_logits(features, questions, inputs["image_index"]),
                           model.classifier(image * questions))


def test_coordinates_are_appended_to_every_location():
    model = make_model(image_size=64, attention_glimpses=2, output_stride=8, attention_coords=True)
    features = torch.randn(2, model.config.image_feature_dim, 8, 8)
    grid = model.image_encoder.grid(features)  # (N, 64, F + 2)
    assert grid.shape == (2, 64, model.config.image_feature_dim + 2)
    xy = grid[0, :, -2:]
    assert xy[0].tolist() == pytest.approx([-7 / 8, -7 / 8]) and xy[7].tolist() == pytest.approx([7 / 8, -7 / 8])
    assert xy[63].tolist() == pytest.approx([7 / 8, 7 / 8])  # row by row: the last location is bottom right
    # A mirrored image is not the same image to the model any more: "left of" has something to read.
    mirrored = features.flip(-1)
    assert not torch.allclose(model.image_encoder.grid(mirrored)[0, :, -2:], xy.flip(0))


def test_each_hop_asks_with_the_question_times_the_last_hops_image_vector():
    model = make_model(image_size=64, attention_glimpses=2, output_stride=8, attention_hops=3)
    inputs = batch(size=64)
    encoder = model.image_encoder
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"])
        questions = model.question_vectors(inputs["input_ids"], inputs["lengths"])
        grid, index = encoder.grid(features), inputs["image_index"]
        query = questions
        for attention, project in [(encoder.attention, encoder.project),
                                   *zip(encoder.more_attention, encoder.more_project)]:
            weights = attention(grid, query, index)
            image = torch.tanh(project((weights.transpose(1, 2) @ grid[index]).flatten(1)))
            query = questions * image
        assert torch.equal(encoder(features, questions, index), image)
        maps = model.attention_maps(features, questions, index)
    assert maps.shape == (7, 3 * 2, 8, 8)  # every hop's glimpses, in order
    assert torch.equal(maps[:, 4:].flatten(2).transpose(1, 2), weights)
    assert "3 hops of 2-glimpse" in architecture(model.config)


def test_the_side_loss_trains_the_question_vector_and_changes_no_answer():
    targets = ["ref0.color=red", "fn=count", "fn=exist"]
    plain = make_model(seed=3)
    side = make_model(seed=3, side_loss_weight=0.5, side_targets=targets)
    inputs, labels = batch(), torch.full((7, len(ANSWERS)), 0.25)
    side_labels = torch.zeros(7, 3)
    side_labels[:, 1] = 1.0
    with torch.no_grad():
        out = side(**inputs, labels=labels, side_labels=side_labels)
        assert torch.equal(out.logits, plain(**inputs).logits)  # the head is not on the answer's path
        answer_loss = plain(**inputs, labels=labels).loss
        assert torch.equal(side(**inputs, labels=labels).loss, answer_loss)  # no side labels, no side loss
        questions = side.question_vectors(inputs["input_ids"], inputs["lengths"])
        bce = F.binary_cross_entropy_with_logits(side.side_head(questions), side_labels, reduction="sum") / 7
        torch.testing.assert_close(out.loss, answer_loss + 0.5 * bce)
    assert side.side_head.out_features == 3 and plain.side_head is None


def test_the_word_path_adds_the_mean_word_embedding_and_is_absent_when_off(model):
    assert model.question_encoder.words is None and not any(".words." in k for k in model.state_dict())
    worded = make_model(question_word_path=True)
    encoder = worded.question_encoder
    inputs = batch()
    ids, lengths = inputs["input_ids"], inputs["lengths"]
    with torch.no_grad():
        expected = []
        for row, n in zip(ids, lengths):
            _, (h, c) = encoder.lstm(torch.tanh(encoder.embed(row[None, :n])))
            state = torch.cat([h, c], dim=0).transpose(0, 1).flatten(1)
            expected.append(torch.tanh(encoder.project(state) + encoder.words(encoder.embed(row[:n]).mean(0))))
        torch.testing.assert_close(worded.question_vectors(ids, lengths), torch.cat(expected), rtol=1e-5, atol=1e-6)
        # Padding changes nothing: the mean is over the question's own pieces.
        padded = torch.cat([ids, torch.zeros(7, 5, dtype=torch.long)], dim=1)
        torch.testing.assert_close(worded.question_vectors(padded, lengths), worded.question_vectors(ids, lengths))
    assert "with a word-level path" in architecture(worded.config)
