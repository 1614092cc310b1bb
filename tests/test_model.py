import pytest
import torch

from conftest import tiny_config
from vqa.errors import CheckpointError
from vqa.model import VQAModel, create_backbone
from vqa.training import extend_answers

ANSWERS = ["yes", "no", "red", "circle"]


def batch(n_images=3, n_questions=7, vocab=50, size=32):
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(1, vocab, (n_questions, 6)),
        "lengths": torch.randint(1, 7, (n_questions,)),
        "image_index": torch.arange(n_questions) % n_images,
        "pixel_values": torch.randn(n_images, 3, size, size),
    }


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VQAModel(tiny_config(ANSWERS, vocab_size=50, image_size=32)).eval()


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


def test_question_vector_uses_h_and_c_of_every_layer(model):
    config = model.config
    assert model.question_encoder.project.in_features == 2 * config.lstm_layers * config.lstm_hidden
    assert config.image_feature_dim == model.image_encoder.backbone.num_features


def test_each_image_runs_through_the_cnn_once(model):
    calls = []
    model.image_encoder.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model(**batch(n_images=3, n_questions=12))
    assert calls == [3]


def test_cached_features_give_the_same_logits(model):
    inputs = batch()
    with torch.no_grad():
        features = model.image_encoder.features(inputs["pixel_values"])
        from_pixels = model(**inputs).logits
        from_features = model(**{**inputs, "pixel_values": None}, image_features=features).logits
    assert torch.allclose(from_pixels, from_features, atol=1e-5)


def test_padding_does_not_change_the_answer(model):
    ids = torch.tensor([[4, 9, 13, 0, 0, 0]])
    common = {"image_index": torch.tensor([0]), "pixel_values": batch()["pixel_values"][:1]}
    with torch.no_grad():
        short = model(input_ids=ids[:, :3], lengths=torch.tensor([3]), **common).logits
        padded = model(input_ids=ids, lengths=torch.tensor([3]), **common).logits
    assert torch.allclose(short, padded, atol=1e-6)


def test_save_load_gives_identical_logits(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(tmp_path).eval()
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert loaded.config.answers == ANSWERS


def test_frozen_backbone_gets_no_gradient():
    model = VQAModel(tiny_config(ANSWERS, vocab_size=50, image_size=32, freeze_backbone=True))
    out = model(**batch(), labels=torch.full((7, len(ANSWERS)), 0.25))
    out.loss.backward()
    assert all(p.grad is None for p in model.image_encoder.backbone.parameters())
    assert model.image_encoder.project.weight.grad is not None


def test_transform_comes_from_timm_at_the_configured_size(model):
    from PIL import Image

    from timm.data import resolve_data_config

    pixels = model.image_transform()(Image.new("RGB", (100, 60), (255, 0, 0)))
    assert pixels.shape == (3, 32, 32)
    # Pure red normalised with the backbone's own mean/std from its timm pretrained config.
    timm_config = resolve_data_config({}, model=model.image_encoder.backbone)
    red = (1 - timm_config["mean"][0]) / timm_config["std"][0]
    green = (0 - timm_config["mean"][1]) / timm_config["std"][1]
    assert pixels[0, 10, 10].item() == pytest.approx(red, abs=1e-3)
    assert pixels[1, 10, 10].item() == pytest.approx(green, abs=1e-3)


def test_extending_answers_keeps_the_old_rows(model):
    old_weight = model.classifier[-1].weight.detach().clone()
    extend_answers(model, ["no", "blue", "yes", "square"])
    assert model.config.answers == ANSWERS + ["blue", "square"]
    assert model.config.label2id["square"] == 5
    assert torch.equal(model.classifier[-1].weight[: len(ANSWERS)], old_weight)
    assert model(**batch()).logits.shape == (7, 6)


def test_pretrained_weights_are_never_downloaded(tmp_path):
    # Asking for ImageNet weights looks only in the local cache (offline), never on the hub:
    # with an empty cache the answer is a clear error, at once.
    with pytest.raises(CheckpointError, match="local timm/Hugging Face cache"):
        create_backbone("test_resnet", True)
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
