"""vqa/features.py: the feature cache, its extraction, resumption and shard merging."""

import json

import numpy as np
import pytest
import torch
from conftest import make_vqa_v2_files, tiny_config

from vqa import features as features_module
from vqa.data import index_image_folder
from vqa.errors import DataError
from vqa.features import (INDEX_FILE, SHARDS_DIR, FeatureCache, cache_meta, extract_features, merge_shards,
                          weights_digest)
from vqa.images import open_image
from vqa.model import VQAModel


def tiny_model(seed: int = 0, **overrides) -> VQAModel:
    torch.manual_seed(seed)
    sizes = dict(image_size=32, freeze_backbone=True)
    sizes.update(overrides)
    return VQAModel(tiny_config(["yes", "no"], 50, **sizes)).eval()


def true_features(model, paths) -> np.ndarray:
    """What the cache should hold: the backbone on timm's preprocessing, one image at a time."""
    transform = model.image_transform()
    with torch.no_grad():
        return np.stack([model.image_encoder.features(transform(open_image(p))[None])[0].numpy() for p in paths])


def count_forward_images(model) -> list[int]:
    seen = []
    model.image_encoder.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[int, object]:
    folder = tmp_path_factory.mktemp("images")
    return index_image_folder(make_vqa_v2_files(folder, n_images=7)["images"])


def test_cache_holds_backbone_features_in_fp16(tmp_path, images):
    model = tiny_model()
    cache = extract_features(model, images, tmp_path / "cache", batch_size=3, progress=False, num_workers=0)
    ids = sorted(images)
    expected = true_features(model, [images[i] for i in ids])
    assert cache.features.dtype == np.float16
    assert len(cache) == 7 and cache.feature_dim == model.config.image_feature_dim
    got = cache.get(ids)
    assert got.dtype == torch.float32 and got.shape == (7, model.config.image_feature_dim)
    # fp16 keeps 11 significant bits: relative error <= 2**-11, plus batch-size reassociation.
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-3, atol=1e-4)


def test_get_follows_the_requested_order_with_repeats(tmp_path, images):
    cache = extract_features(tiny_model(), images, tmp_path / "cache", batch_size=4, progress=False, num_workers=0)
    a, b, c = sorted(images)[:3]
    one_by_one = torch.cat([cache.get([i]) for i in (b, a, b, c)])
    assert torch.equal(cache.get([b, a, b, c]), one_by_one)
    assert cache.get([]).shape == (0, cache.feature_dim)
    assert b in cache and 999_999 not in cache
    with pytest.raises(DataError, match="no features for image 999999"):
        cache.get([a, 999_999])


def test_a_second_extraction_runs_the_cnn_only_on_new_images(tmp_path, images):
    model = tiny_model()
    ids = sorted(images)
    first = {i: images[i] for i in ids[:4]}
    extract_features(model, first, tmp_path / "cache", batch_size=2, progress=False, num_workers=0)
    seen = count_forward_images(model)
    again = extract_features(model, first, tmp_path / "cache", progress=False, num_workers=0)
    assert seen == [] and len(again) == 4
    grown = extract_features(model, images, tmp_path / "cache", batch_size=2, progress=False, num_workers=0)
    assert sum(seen) == 3 and len(grown) == 7
    np.testing.assert_allclose(grown.get(ids).numpy(), true_features(model, [images[i] for i in ids]),
                               rtol=2e-3, atol=1e-4)


def test_decoding_workers_give_the_same_cache(tmp_path, images):
    model = tiny_model()
    ids = sorted(images)
    inline = extract_features(model, images, tmp_path / "inline", batch_size=3, progress=False, num_workers=0)
    workers = extract_features(model, images, tmp_path / "workers", batch_size=3, progress=False, num_workers=2)
    assert torch.equal(inline.get(ids), workers.get(ids))


def test_an_interrupted_extraction_keeps_its_finished_batches_and_resumes(tmp_path, images):
    model = tiny_model()
    ids = sorted(images)
    broken = dict(images)
    broken[ids[5]] = tmp_path / "missing.jpg"  # the third batch of two fails
    with pytest.raises(DataError, match="missing.jpg"):
        extract_features(model, broken, tmp_path / "cache", batch_size=2, progress=False, num_workers=0)
    index = json.loads((tmp_path / "cache" / INDEX_FILE).read_text())
    assert sorted(int(k) for k in index) == ids[:4]  # the index names only rows that were written
    partial = FeatureCache(tmp_path / "cache")
    expected = true_features(model, [images[i] for i in ids])
    np.testing.assert_allclose(partial.get(ids[:4]).numpy(), expected[:4], rtol=2e-3, atol=1e-4)

    seen = count_forward_images(model)
    done = extract_features(model, images, tmp_path / "cache", batch_size=2, progress=False, num_workers=0)
    assert sum(seen) == 3
    np.testing.assert_allclose(done.get(ids).numpy(), expected, rtol=2e-3, atol=1e-4)


def test_a_cache_of_other_weights_or_preprocessing_is_refused(tmp_path, images):
    extract_features(tiny_model(seed=0), images, tmp_path / "cache", progress=False, num_workers=0)
    with pytest.raises(DataError, match="weights"):
        extract_features(tiny_model(seed=1), images, tmp_path / "cache", progress=False, num_workers=0)
    with pytest.raises(DataError, match="transform"):
        extract_features(tiny_model(seed=0, image_size=48), images, tmp_path / "cache", progress=False, num_workers=0)


def test_the_backbone_default_size_given_explicitly_reuses_the_cache(tmp_path, images):
    implicit = tiny_model(image_size=None, crop_pct=None)
    extract_features(implicit, images, tmp_path / "cache", progress=False, num_workers=0)
    default = implicit.image_encoder.backbone.pretrained_cfg
    explicit = tiny_model(image_size=default["input_size"][-1], crop_pct=default["crop_pct"])
    assert cache_meta(explicit)["transform"] == cache_meta(implicit)["transform"]
    seen = count_forward_images(explicit)
    extract_features(explicit, images, tmp_path / "cache", progress=False, num_workers=0)
    assert seen == []


def test_weights_digest_sees_changes_beyond_float16_rounding():
    model = tiny_model()
    before = weights_digest(model.image_encoder.backbone)
    assert weights_digest(tiny_model().image_encoder.backbone) == before
    with torch.no_grad():
        for parameter in model.image_encoder.backbone.parameters():  # as a float16 checkpoint loads
            parameter.copy_(parameter.half().float())
        assert weights_digest(model.image_encoder.backbone) == before
        next(model.image_encoder.backbone.parameters()).view(-1)[0] += 1e-2
    assert weights_digest(model.image_encoder.backbone) != before


def shards_of(model, images, folder, parts) -> None:
    """A torchrun extraction's shards: each part extracted into shards/rank-K."""
    for rank, part in enumerate(parts):
        extract_features(model, {i: images[i] for i in part}, folder / SHARDS_DIR / f"rank-{rank}",
                         batch_size=2, progress=False, num_workers=0)


def test_merge_folds_shards_into_the_cache_and_removes_them(tmp_path, images):
    model = tiny_model()
    ids = sorted(images)
    extract_features(model, {i: images[i] for i in ids[:2]}, tmp_path / "cache", progress=False, num_workers=0)
    shards_of(model, images, tmp_path / "cache", [ids[2::2], ids[3::2] + ids[:1]])  # ids[0] twice: kept once
    merge_shards(tmp_path / "cache", cache_meta(model))
    assert not (tmp_path / "cache" / SHARDS_DIR).exists()
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 7 and cache.features.shape[0] == 7
    np.testing.assert_allclose(cache.get(ids).numpy(), true_features(model, [images[i] for i in ids]),
                               rtol=2e-3, atol=1e-4)


def test_a_merge_killed_before_its_index_is_written_completes_on_the_next_run(tmp_path, images, monkeypatch):
    model = tiny_model()
    ids = sorted(images)
    extract_features(model, {i: images[i] for i in ids[:3]}, tmp_path / "cache", progress=False, num_workers=0)
    shards_of(model, images, tmp_path / "cache", [ids[3::2], ids[4::2]])
    real_write = features_module._atomic_write_text

    def killed_at_the_index(path, text):
        if path == tmp_path / "cache" / INDEX_FILE:
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(features_module, "_atomic_write_text", killed_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(tmp_path / "cache", cache_meta(model))
    monkeypatch.setattr(features_module, "_atomic_write_text", real_write)
    # The new array is in place but the old index still names the old rows, which kept their places.
    old = FeatureCache(tmp_path / "cache")
    assert len(old) == 3 and old.features.shape[0] == 7
    expected = true_features(model, [images[i] for i in ids])
    np.testing.assert_allclose(old.get(ids[:3]).numpy(), expected[:3], rtol=2e-3, atol=1e-4)

    seen = count_forward_images(model)
    cache = extract_features(model, images, tmp_path / "cache", progress=False, num_workers=0)
    assert seen == []  # the leftover shards are merged, not recomputed
    np.testing.assert_allclose(cache.get(ids).numpy(), expected, rtol=2e-3, atol=1e-4)


def test_an_incomplete_cache_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="features.npy is missing"):
        FeatureCache(tmp_path)
