"""vqa/reliability/ood.py (the feature-space OOD detector) and benchmarks/ood_sets.py (the OOD image sets)."""

import json
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.numpy import load_file, save_file

from benchmarks import ood_sets
from vqa.errors import CheckpointError
from vqa.reliability.ood import META_FILE, TENSORS_FILE, FeatureDensity
from vqa.reliability.rates import auroc

DIM = 128  # at 64 dimensions a 0.75-sigma shift of the centres is harder: AUROC 0.982


def clusters(rng, dim=DIM, n_clusters=6, rank=8, dead=0.25):
    """A sampler of CNN-like features: ReLU of cluster centres + low-rank + isotropic noise,
    with a quarter of the channels dead (always 0)."""
    centres = rng.normal(0, 1, (n_clusters, dim))
    mixing = rng.normal(0, 1, (dim, rank)) / np.sqrt(rank) * 0.6
    alive = rng.random(dim) > dead

    def sample(n, centres=centres):
        which = rng.integers(0, len(centres), n)
        x = centres[which] + rng.normal(0, 1, (n, rank)) @ mixing.T + rng.normal(0, 0.3, (n, dim))
        return (np.maximum(x, 0) * alive).astype(np.float32)

    return sample, centres, alive


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    sample, centres, alive = clusters(rng)
    train, heldout, test = sample(2000), sample(1000), sample(2000)
    density = FeatureDensity().fit(train, heldout, false_alarm_rate=0.01)
    ood = {
        "new clusters": sample(500, centres=rng.normal(0, 1, centres.shape)),
        "centres shifted by 0.75 sigma": sample(500, centres=centres + 0.75 * rng.normal(0, 1, centres.shape)),
        "noise": np.maximum(rng.normal(0, 1, (500, len(alive))), 0).astype(np.float32),
    }
    return density, heldout, test, ood


def sklearn_ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """scikit-learn's ledoit_wolf_shrinkage, written out as its source computes it (F x F products)."""
    x = x - x.mean(axis=0)
    n, p = x.shape
    x2 = x**2
    trace = x2.sum(axis=0) / n
    mu = trace.sum() / p
    beta_ = (x2.T @ x2).sum()
    delta_ = ((x.T @ x) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum() + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def normalised(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_separates_out_of_distribution_features(fitted):
    density, _, test, ood = fitted
    in_scores = density.score(test)
    for name, features in ood.items():
        assert auroc(in_scores, density.score(features)) > 0.99, name
    # New in-distribution features: ~1 % flagged (the threshold is an estimate from 1000 images).
    assert density.flag(test).mean() <= 0.02
    assert density.flag(ood["noise"]).mean() > 0.95


def test_threshold_is_the_heldout_quantile(fitted):
    density, heldout, _, _ = fitted
    scores = density.score(heldout)
    assert density.threshold == np.quantile(scores, 0.99, method="higher")
    assert density.flag(heldout).sum() <= 10  # at most 1 % of 1000
    train = np.random.default_rng(1).random((300, 16))
    loose = FeatureDensity().fit(train[:200], train[200:], false_alarm_rate=0.1)
    assert loose.flag(train[200:]).sum() <= 10  # at most 10 % of 100
    assert loose.false_alarm_rate == 0.1 and loose.heldout_images == 100 and loose.train_images == 200


def test_score_is_the_mahalanobis_distance_under_ledoit_wolf():
    rng = np.random.default_rng(2)
    for n, p in ((400, 24), (30, 50)):  # more images than dimensions, and fewer
        train = np.abs(rng.normal(size=(n, p))) * rng.random(p)
        query = np.abs(rng.normal(size=(5, p)))
        density = FeatureDensity().fit(train, train[:10])
        x = normalised(train)
        shrinkage = sklearn_ledoit_wolf_shrinkage(x)
        assert density.shrinkage == pytest.approx(shrinkage, rel=1e-9)
        mean = x.mean(axis=0)
        covariance = np.cov(x.T, bias=True)
        shrunk = (1 - shrinkage) * covariance + shrinkage * np.trace(covariance) / p * np.eye(p)
        centred = normalised(query) - mean
        expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, np.linalg.inv(shrunk), centred))
        np.testing.assert_allclose(density.score(query), expected, rtol=1e-4)  # parameters are float32


def test_fewer_images_than_dimensions():
    rng = np.random.default_rng(3)
    sample, _, alive = clusters(rng, dim=512, rank=16)
    train, heldout, test = sample(150), sample(100), sample(300)
    density = FeatureDensity().fit(train, heldout)
    assert density.components.shape == (512, 150)  # only the N directions the data spans
    noise = np.maximum(rng.normal(size=(300, 512)), 0)
    scores = density.score(test)
    assert np.isfinite(scores).all()
    assert auroc(scores, density.score(noise)) > 0.99


def test_constant_and_dead_dimensions():
    rng = np.random.default_rng(4)
    train = rng.random((500, 32)).astype(np.float32)
    train[:, :12] = 0.0  # dead ReLU channels
    train[:, 12:16] = 0.5  # constant channels
    density = FeatureDensity().fit(train[:400], train[400:])
    assert np.isfinite(density.score(train)).all()
    assert (density.variances > 0).all() and density.residual_variance > 0
    lit = train[400:].copy()
    lit[:, 0] = 0.5  # a dead channel firing: unlike anything in training
    assert density.flag(lit).all()


def test_half_precision_and_torch_inputs(fitted):
    density, heldout, _, _ = fitted
    half = heldout[:50].astype(np.float16)
    expected = density.score(half.astype(np.float32))
    np.testing.assert_array_equal(density.score(half), expected)
    np.testing.assert_array_equal(density.score(torch.from_numpy(half)), expected)
    assert density.score(half[0]).shape == (1,)  # one feature vector


def test_bad_inputs_are_refused(fitted):
    density = fitted[0]
    with pytest.raises(ValueError, match=str(DIM)):
        density.score(np.zeros((2, DIM - 1)))
    bad = np.ones((3, DIM))
    bad[1, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        density.score(bad)
    with pytest.raises(ValueError, match="identical"):
        FeatureDensity().fit(np.ones((10, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="false_alarm_rate"):
        FeatureDensity().fit(np.eye(4), np.eye(4), false_alarm_rate=1.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureDensity().score(np.ones((1, 4)))


def test_save_load_round_trip(fitted, tmp_path):
    density, heldout, test, ood = fitted
    density.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["threshold"] == density.threshold and meta["feature_dim"] == DIM
    assert meta["train_images"] == 2000 and meta["heldout_images"] == 1000 and meta["false_alarm_rate"] == 0.01
    loaded = FeatureDensity.load(tmp_path)
    for features in (test, ood["noise"]):
        np.testing.assert_array_equal(loaded.score(features), density.score(features))
    assert loaded.threshold == density.threshold
    np.testing.assert_array_equal(loaded.flag(test), density.flag(test))


def _save_repeatedly(density, folder, times):
    for _ in range(times):
        density.save(folder)


def test_processes_saving_into_one_folder_never_share_a_temporary_file(fitted, tmp_path):
    """torchrun's two ranks once saved the detector at once through one `ood.safetensors.tmp`, and
    one renamed the file away under the other: with that name this test failed 4 runs in 4."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_save_repeatedly, args=(fitted[0], tmp_path, 300)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_FILE, TENSORS_FILE]  # no temporary file left
    assert FeatureDensity.load(tmp_path).threshold == fitted[0].threshold


def test_load_absent_and_half_present(fitted, tmp_path):
    assert FeatureDensity.load(tmp_path) is None
    fitted[0].save(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="ood.json"):
        FeatureDensity.load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage tensors", "NaN tensor", "wrong shape", "bad JSON", "NaN threshold",
                                    "other version", "missing tensor"])
def test_damaged_files_are_named(fitted, tmp_path, damage):
    fitted[0].save(tmp_path)
    tensors_path, meta_path = tmp_path / TENSORS_FILE, tmp_path / META_FILE
    tensors, meta = load_file(str(tensors_path)), json.loads(meta_path.read_text())
    named = TENSORS_FILE
    if damage == "garbage tensors":
        tensors_path.write_bytes(b"\x00\x01 not safetensors at all")
    elif damage == "NaN tensor":
        tensors["mean"][3] = np.nan
        save_file(tensors, str(tensors_path))
    elif damage == "wrong shape":
        tensors["variances"] = tensors["variances"][:-1]
        save_file(tensors, str(tensors_path))
    elif damage == "missing tensor":
        del tensors["components"]
        save_file(tensors, str(tensors_path))
    else:
        named = META_FILE
        if damage == "bad JSON":
            meta_path.write_text('{"threshold": 3.0,')
        else:
            meta.update({"NaN threshold": {"threshold": float("nan")}, "other version": {"version": 2}}[damage])
            meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        FeatureDensity.load(tmp_path)


def test_auroc_by_hand():
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    # Pairs (in, out): (1,2) (1,3) (2,3) are ordered, (2,2) is a tie counted half: 3.5 / 4.
    assert auroc([1, 2], [2, 3]) == 0.875
    assert auroc([7, 7, 7], [7, 7]) == 0.5
    # (0,1)=1, (0,0)=0.5, (2,1)=0, (2,0)=0: 1.5 / 4
    assert auroc([0, 2], [1, 0]) == 0.375
    with pytest.raises(ValueError, match="both sides"):
        auroc([], [1.0])


@pytest.mark.parametrize("name", sorted(ood_sets.ALL_SETS))
def test_ood_sets_give_the_asked_images(name):
    make = ood_sets.ALL_SETS[name]
    if name == "package_photos" and not ood_sets._photo_paths():
        pytest.skip("none of the packages' photos is installed here")
    if name in ("tuning_photos", "heldout_photos") and not ood_sets._photo_paths(name.split("_")[0]):
        pytest.skip(f"none of the {name.split('_')[0]} photos is installed here")
    images = make(5, (40, 30))
    assert len(images) == 5
    assert all(im.mode == "RGB" and im.size == (40, 30) for im in images)
    again = make(5, (40, 30))
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]
    assert [im.tobytes() for im in make(3, (40, 30))] == [im.tobytes() for im in images[:3]]  # prefix-stable
    assert [im.tobytes() for im in make(5, (40, 30), seed=1)] != [im.tobytes() for im in images]
    assert len({im.tobytes() for im in images}) == 5  # no two alike
    assert make(2, 24)[0].size == (24, 24)


def test_package_photos_default_count():
    paths = ood_sets._photo_paths()
    if not paths:
        pytest.skip("none of the packages' photos is installed here")
    assert len(ood_sets.package_photos(size=32)) == ood_sets.PHOTO_VIEWS * len(paths)


# The second detector: a density of image statistics of the model input (vqa/reliability/image_stats.py).

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shape_scenes(rng, n, side=32):
    """(n, 3, side, side) normalised model inputs of a little world: one flat-coloured square or
    disc on white, of random size and place."""
    y, x = np.mgrid[0:side, 0:side]
    images = np.ones((n, side, side, 3))
    for image in images:
        r = rng.uniform(0.15, 0.35) * side
        cx, cy = rng.uniform(r, side - r, 2)
        inside = (np.hypot(x - cx, y - cy) < r) if rng.random() < 0.5 else (
            (abs(x - cx) < r) & (abs(y - cy) < r))
        image[inside] = rng.uniform(0, 1, 3)
    return normalise(images)


def normalise(images):
    """(n, H, W, 3) RGB in [0, 1] -> (n, 3, H, W) normalised as the model's transform does."""
    return (torch.from_numpy(images).float().permute(0, 3, 1, 2) - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)


def rgb(pixels):
    return (pixels * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def two_detectors():
    """A detector fitted on CNN-like features and on the scenes' statistics; the features carry no
    sign of the edits below (they come from the same sampler), as with a CNN blind to them."""
    from vqa.reliability.image_stats import image_statistics

    rng = np.random.default_rng(1)
    sample, _, _ = clusters(rng)
    train, heldout = shape_scenes(rng, 1000), shape_scenes(rng, 400)
    density = FeatureDensity().fit(sample(1000), sample(400), 0.01,
                                   train_statistics=image_statistics(train, MEAN, STD),
                                   heldout_statistics=image_statistics(heldout, MEAN, STD),
                                   pixel_mean=MEAN, pixel_std=STD)
    return density, sample, rng


def edits(rng, n=100):
    """The scenes inverted, framed in a colour, and rotated by 45 degrees (black corners); and photo-like noise."""
    scenes = rgb(shape_scenes(rng, n))
    framed = scenes.copy()
    framed[:, :4], framed[:, -4:], framed[:, :, :4], framed[:, :, -4:] = 0.2, 0.2, 0.2, 0.2
    rotated = [np.asarray(Image.fromarray((s * 255).astype(np.uint8)).rotate(45), dtype=np.float64) / 255
               for s in scenes]
    blurred = np.stack([np.asarray(Image.fromarray((rng.uniform(0, 1, (32, 32, 3)) * 255).astype(np.uint8))
                                   .filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64) / 255 for _ in range(n)])
    return {"inverted": normalise(1 - scenes), "framed": normalise(framed),
            "rotated": normalise(np.stack(rotated)), "photo-like": normalise(blurred)}


def test_image_statistics_flag_edits_the_features_alone_pass(two_detectors):
    density, sample, rng = two_detectors
    assert density.statistics is not None and density.cross_fitted_images == 1000
    for name, pixels in edits(rng).items():
        features = sample(len(pixels))
        assert density.flag(features).mean() <= 0.05, name  # the CNN density alone passes them
        assert density.flag_images(features, pixels).mean() >= 0.95, name


def test_false_alarms_of_both_detectors_together_stay_at_the_target(two_detectors):
    density, sample, rng = two_detectors
    pixels = shape_scenes(rng, 1000)  # new in-distribution images, fitted on by neither
    flagged = density.flag_images(sample(1000), pixels)
    assert flagged.mean() <= 0.02  # target 1 %; 2 % leaves room for chance on 1,000 images
    # score_images > threshold exactly when either density is past its own threshold.
    features = sample(200)
    pixels = shape_scenes(rng, 200)
    from vqa.reliability.image_stats import image_statistics
    either = density.flag(features) | density.statistics.flag(image_statistics(pixels, MEAN, STD))
    np.testing.assert_array_equal(density.flag_images(features, pixels), either)


def test_joint_thresholds_keep_the_union_at_the_rate():
    from vqa.reliability.rates import joint_thresholds

    rng = np.random.default_rng(3)
    first, second = rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)
    t1, t2 = joint_thresholds(first, second, 500, 0.01)
    flagged = (first > t1) | (second > t2)
    assert flagged.mean() <= 0.01 and flagged[-500:].mean() <= 0.01
    assert flagged.mean() >= 0.008  # not far under: each detector gets about half the rate
    t1, t2 = joint_thresholds(first, first, 500, 0.01)  # the same scores twice: each at the full 1 %
    assert (first > t1).mean() == pytest.approx(0.01, abs=0.001)
    # Held-out images with a heavier tail than the out-of-fold ones: the held-out share binds.
    first[-500:] += 1.0
    t1, t2 = joint_thresholds(first, second, 500, 0.01)
    flagged = (first > t1) | (second > t2)
    assert flagged[-500:].mean() <= 0.01 and flagged.mean() < 0.008


def test_save_load_round_trip_with_image_statistics(two_detectors, tmp_path):
    density, sample, rng = two_detectors
    density.save(tmp_path)
    loaded = FeatureDensity.load(tmp_path)
    assert loaded.statistics is not None and loaded.threshold == density.threshold
    assert loaded.statistics.threshold == density.statistics.threshold
    assert loaded.statistics.pixel_mean == MEAN and loaded.statistics.pixel_std == STD
    features, pixels = sample(50), torch.cat(list(edits(rng, 10).values()) + [shape_scenes(rng, 10)])
    np.testing.assert_array_equal(loaded.score_images(features, pixels), density.score_images(features, pixels))
    np.testing.assert_array_equal(loaded.score(features), density.score(features))


def test_an_old_folder_with_the_cnn_density_only_loads_and_scores_as_before(fitted, tmp_path):
    density, heldout, test, ood = fitted
    density.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert "statistics" not in meta and set(load_file(str(tmp_path / TENSORS_FILE))) == {
        "mean", "components", "variances", "residual_variance"}  # the format of the files shipped before
    loaded = FeatureDensity.load(tmp_path)
    assert loaded.statistics is None
    pixels = torch.zeros(len(test), 3, 8, 8)  # whatever the pixels, only the CNN features count
    np.testing.assert_array_equal(loaded.score_images(test, pixels), density.score(test))
    assert loaded.threshold == density.threshold


@pytest.mark.parametrize("damage", ["tensor missing", "wrong method", "bad pixel_std", "nan", "wrong shape",
                                    "not an object", "threshold 0"])
def test_damaged_image_statistics_are_named(two_detectors, tmp_path, damage):
    density, _, _ = two_detectors
    density.save(tmp_path)
    meta_path, tensors_path = tmp_path / META_FILE, tmp_path / TENSORS_FILE
    meta, tensors = json.loads(meta_path.read_text()), load_file(str(tensors_path))
    if damage == "tensor missing":
        del tensors["statistics.variances"]
    elif damage == "wrong method":
        meta["statistics"]["method"] = "image-statistics-99"
    elif damage == "bad pixel_std":
        meta["statistics"]["pixel_std"] = [0.2, 0.0, 0.2]
    elif damage == "nan":
        tensors["statistics.mean"][0] = np.nan
    elif damage == "wrong shape":
        tensors["statistics.mean"] = tensors["statistics.mean"][:-1]
    elif damage == "threshold 0":  # the score is rescaled by it: a division by zero
        meta["statistics"]["threshold"] = 0
    else:
        meta["statistics"] = [1, 2]
    meta_path.write_text(json.dumps(meta))
    save_file(tensors, str(tensors_path))
    named = str(tensors_path) if damage in ("tensor missing", "nan", "wrong shape") else str(meta_path)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        FeatureDensity.load(tmp_path)


def test_image_statistics_are_histograms_of_unit_length():
    from vqa.reliability import image_stats

    rng = np.random.default_rng(4)
    pixels = shape_scenes(rng, 3, side=20)
    stats = image_stats.image_statistics(pixels, MEAN, STD)
    assert stats.shape == (3, image_stats.DIM) and stats.dtype == np.float32
    blocks = np.split(stats, np.cumsum([16, 16, 16, 64, 12, 12]), axis=1)
    for block in blocks[:-1]:  # square roots of shares: unit length
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1, rtol=1e-5)
    assert (np.linalg.norm(blocks[-1], axis=1) <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="3, H, W"):
        image_stats.image_statistics(pixels[:, :1], MEAN, STD)


@pytest.mark.parametrize("name", sorted(ood_sets.NEAR_WORLD_EDITS))
def test_near_world_edits_keep_size_and_change_the_image(name):
    images = ood_sets.textures(4, (40, 30))
    edited = ood_sets.NEAR_WORLD_EDITS[name](images)
    assert [im.size for im in edited] == [(40, 30)] * 4 and all(im.mode == "RGB" for im in edited)
    assert [im.tobytes() for im in ood_sets.NEAR_WORLD_EDITS[name](images)] == [im.tobytes() for im in edited]
    assert all(a.tobytes() != b.tobytes() for a, b in zip(images, edited))


def test_photos_split_by_file_into_tuning_and_heldout():
    tuning, heldout = ood_sets._photo_paths("tuning"), ood_sets._photo_paths("heldout")
    assert not {p.name for p in tuning} & {p.name for p in heldout}
    assert sorted(tuning + heldout) == sorted(ood_sets._photo_paths())
    assert all(p.name in ood_sets.HELDOUT_PHOTOS for p in heldout)
