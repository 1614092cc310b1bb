"""training/fit_reliability.py: an existing checkpoint's reliability files, fitted in-process on tiny data."""

import importlib.util
import shutil

import pytest
from fixtures import ROOT, make_vqa_v2_files

from vqa.checkpoint import update_card
from vqa.reliability.words import WordVocabulary


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("fit_reliability", ROOT / "training" / "fit_reliability.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    files = make_vqa_v2_files(tmp_path_factory.mktemp("data"), n_images=20, subtype="train2014")
    return ["--dataset", "files", "--train-questions", str(files["questions"]),
            "--train-annotations", str(files["annotations"]), "--train-images", str(files["images"]),
            "--val-fraction", "0.25"]


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "model")  # its card: trained on easy-vqa


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_other_data_than_the_cards_is_refused_unless_forced(checkpoint, data, script, capsys):
    before = snapshot(checkpoint)
    assert script.main(["--checkpoint", str(checkpoint), *data]) == 2
    assert "trained on easy-vqa, not train2014-train: pass --force" in capsys.readouterr().err
    assert script.main(["--checkpoint", str(checkpoint), "--dataset", "shapes-world"]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {checkpoint} was trained on easy-vqa, not shapes-world: "
                                       "pass --force to fit its reliability files on other data\n")
    assert snapshot(checkpoint) == before
    assert script.main(["--checkpoint", str(checkpoint), *data, "--force"]) == 0
    assert {"ood.json", "ood.safetensors", "words.json"} <= set(snapshot(checkpoint))


@pytest.mark.parametrize("value, shown", [("1.5", "1.5"), ("0", "0.0")])
def test_val_fraction_is_checked_before_anything_is_read(tmp_path, script, capsys, value, shown):
    # The checkpoint does not exist: a check made after loading it would complain about that instead.
    code = script.main(["--checkpoint", str(tmp_path / "missing"), "--dataset", "easy-vqa", "--val-fraction", value])
    assert code == 2
    assert capsys.readouterr().err == f"error: --val-fraction must be more than 0 and at most 0.9, not {shown}\n"


def test_a_fit_that_fails_midway_leaves_the_old_files_whole(checkpoint, data, script, monkeypatch):
    update_card(checkpoint, {"dataset": "train2014-train"})
    assert script.main(["--checkpoint", str(checkpoint), *data]) == 0
    before = snapshot(checkpoint)

    def disk_full(self, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WordVocabulary, "save", disk_full)  # words.json is written after the detector
    with pytest.raises(OSError, match="No space left"):
        script.main(["--checkpoint", str(checkpoint), *data, "--seed", "1"])  # another split: other files
    assert snapshot(checkpoint) == before  # the old set, and no temporary file


def test_the_fitted_detector_has_both_densities_and_the_predictor_uses_them(checkpoint, data, script):
    from vqa.predict import Predictor
    from vqa.reliability.ood import FeatureDensity

    update_card(checkpoint, {"dataset": "train2014-train"})
    assert script.main(["--checkpoint", str(checkpoint), *data]) == 0
    density = FeatureDensity.load(checkpoint)
    assert density.statistics is not None and density.statistics.pixel_std is not None
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.density.statistics is not None
    white = predictor.transform.mean  # a flat grey-blue square: nothing like the tiny data's images
    from PIL import Image
    image = Image.new("RGB", (40, 40), tuple(int(255 * v) for v in white))
    answer = predictor.assess(image, "what color is the shape?")
    pixels = predictor.image_pixels(image)[None]
    features = predictor.model.pooled_features(predictor.model.image_features(pixels)).detach().numpy()
    assert answer.image_score == pytest.approx(float(density.score_images(features, pixels)[0]), rel=1e-6)
    assert answer.image_threshold == density.threshold
