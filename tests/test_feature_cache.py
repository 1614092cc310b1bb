"""vqa/feature_cache.py: the cache format, its metadata, the compatibility check, shard merging."""

import json

import numpy as np
import pytest
import torch
from fixtures import tiny_config

from vqa import feature_cache as feature_cache_module
from vqa.errors import DataError
from vqa.feature_cache import (CacheWriter, FeatureCache, INDEX_FILE, SHARDS_DIR, cache_meta, check_compatible, merge_shards, mismatch, shard_folder, weights_digest)
from vqa.model import VQAModel

IDS = [1000 + 7 * n for n in range(7)]


def tiny_model(seed: int = 0, **overrides) -> VQAModel:
    torch.manual_seed(seed)
    sizes = dict(image_size=32, freeze_backbone=True)
    sizes.update(overrides)
    return VQAModel(tiny_config(["yes", "no"], 50, **sizes)).eval()


def rows_for(image_ids, shape=(6,)) -> dict[int, np.ndarray]:
    """Made-up feature rows, float16-exact so that a round trip must return them bit for bit."""
    return {i: np.random.default_rng(i).standard_normal(shape).astype(np.float16).astype(np.float32)
            for i in image_ids}


def write_cache(folder, rows: dict[int, np.ndarray], meta: dict | None = None, batch: int = 3) -> None:
    shape = next(iter(rows.values())).shape
    meta = meta or {"backbone": "made-up", "feature_shape": list(shape)}
    ids = list(rows)
    with CacheWriter(folder, meta, len(ids)) as writer:
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            writer.append(part, np.stack([rows[i] for i in part]))


def test_rows_of_any_shape_round_trip_as_float16(tmp_path):
    for shape in [(6,), (5, 3, 2)]:  # pooled features, spatial maps
        rows = rows_for(IDS, shape)
        write_cache(tmp_path / str(len(shape)), rows)
        cache = FeatureCache(tmp_path / str(len(shape)))
        assert cache.features.dtype == np.float16 and cache.feature_shape == shape and cache.feature_dim == shape[0]
        got = cache.get(IDS)
        assert got.dtype == torch.float32 and got.shape == (7, *shape)
        assert torch.equal(got, torch.from_numpy(np.stack([rows[i] for i in IDS])))


def test_get_follows_the_requested_order_with_repeats(tmp_path):
    write_cache(tmp_path / "cache", rows_for(IDS))
    cache = FeatureCache(tmp_path / "cache")
    a, b, c = IDS[:3]
    one_by_one = torch.cat([cache.get([i]) for i in (b, a, b, c)])
    assert torch.equal(cache.get([b, a, b, c]), one_by_one)
    assert cache.get([]).shape == (0, 6)
    assert b in cache and 999_999 not in cache and len(cache) == 7
    with pytest.raises(DataError, match="no features for image 999999"):
        cache.get([a, 999_999])


def test_the_index_names_only_rows_that_were_written(tmp_path):
    rows = rows_for(IDS)
    writer = CacheWriter(tmp_path / "cache", {"feature_shape": [6]}, new_rows=7)
    writer.append(IDS[:2], np.stack([rows[i] for i in IDS[:2]]))
    # killed here: the array has room for 7 rows, the index names the 2 written
    assert sorted(int(k) for k in json.loads((tmp_path / "cache" / INDEX_FILE).read_text())) == IDS[:2]
    cache = FeatureCache(tmp_path / "cache")
    assert cache.features.shape[0] == 7 and len(cache) == 2
    with pytest.raises(DataError, match="rows of shape \\[5\\] given, the cache holds \\[6\\]"):
        writer.append(IDS[2:3], np.zeros((1, 5)))


def test_an_incomplete_cache_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="features.npy is missing"):
        FeatureCache(tmp_path)


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


def count_digests(monkeypatch) -> list:
    calls = []
    real = feature_cache_module.weights_digest
    monkeypatch.setattr(feature_cache_module, "weights_digest", lambda module: calls.append(1) or real(module))
    return calls


def test_cache_meta_hashes_the_weights_once_per_model_and_weights(monkeypatch):
    calls = count_digests(monkeypatch)
    model = tiny_model()
    first = cache_meta(model)
    assert cache_meta(model) == first and len(calls) == 1
    model.train()  # modes change no weight
    assert cache_meta(model) == first and len(calls) == 1 and model.training
    with torch.no_grad():  # an in-place change (an optimizer step, load_state_dict) is seen
        next(model.image_encoder.backbone.parameters()).view(-1)[0] += 1e-2
    assert cache_meta(model)["weights"] != first["weights"] and len(calls) == 2
    model.config.image_size = 48  # so is another preprocessing, with no new hash
    assert cache_meta(model)["transform"] != first["transform"]
    assert cache_meta(tiny_model())["weights"] == first["weights"] and len(calls) == 3  # another model: its own


def test_cache_meta_records_the_feature_shape():
    pooled, maps = tiny_model(), tiny_model(attention_glimpses=2, output_stride=8)
    assert cache_meta(pooled)["feature_shape"] == [pooled.config.image_feature_dim]
    # test_resnet at 32 px, output stride 8: a 4 x 4 map
    assert cache_meta(maps)["feature_shape"] == [maps.config.image_feature_dim, 4, 4]
    assert cache_meta(maps)["attention_glimpses"] == 2 and cache_meta(maps)["output_stride"] == 8


def made_by(model, folder) -> FeatureCache:
    """An empty cache with `model`'s meta."""
    CacheWriter(folder, cache_meta(model), 0).close()
    return FeatureCache(folder)


def test_check_compatible_names_the_fields_that_differ(tmp_path):
    cache = made_by(tiny_model(), tmp_path / "pooled")
    check_compatible(cache, tiny_model())
    for model, fields in [(tiny_model(seed=1), "weights"), (tiny_model(image_size=48), "transform"),
                          (tiny_model(output_stride=8), "output_stride"),
                          (tiny_model(seed=1, image_size=48), "transform, weights")]:
        with pytest.raises(DataError, match=f"{cache.folder} was made with another {fields} than this model's"):
            check_compatible(cache, model)
    why = mismatch(tmp_path / "pooled", cache_meta(tiny_model(output_stride=8)))
    assert "output_stride: None there, 8 now" in why


def test_pooled_features_and_maps_are_told_apart(tmp_path):
    pooled = made_by(tiny_model(), tmp_path / "pooled")
    maps = made_by(tiny_model(attention_glimpses=2, output_stride=8), tmp_path / "maps")
    with pytest.raises(DataError, match="another feature_shape.*holds pooled features, this model reads spatial "
                                        "maps \\(attention_glimpses > 0 reads maps\\)"):
        check_compatible(pooled, tiny_model(attention_glimpses=2))
    with pytest.raises(DataError, match="another output_stride, feature_shape.*holds spatial maps"):
        check_compatible(maps, tiny_model())
    with pytest.raises(DataError, match="another output_stride, feature_shape"):
        check_compatible(maps, tiny_model(attention_glimpses=2, output_stride=16))
    # Every attention model reads the same map, whatever its number of glimpses.
    check_compatible(maps, tiny_model(attention_glimpses=1, output_stride=8))


def test_a_folder_without_meta_fits_anything(tmp_path):
    assert mismatch(tmp_path, cache_meta(tiny_model())) is None


def write_shards(folder, parts: list[list[int]], rows: dict) -> None:
    """What a torchrun extraction leaves: each part in shards/rank-K."""
    for rank, part in enumerate(parts):
        write_cache(shard_folder(folder, rank), {i: rows[i] for i in part}, batch=2)


def test_merge_folds_shards_into_the_cache_and_removes_them(tmp_path):
    rows = rows_for(IDS)
    write_cache(tmp_path / "cache", {i: rows[i] for i in IDS[:2]})
    write_shards(tmp_path / "cache", [IDS[2::2], IDS[3::2] + IDS[:1]], rows)  # IDS[0] twice: kept once
    merge_shards(tmp_path / "cache", {"backbone": "made-up", "feature_shape": [6]})
    assert not (tmp_path / "cache" / SHARDS_DIR).exists()
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 7 and cache.features.shape[0] == 7
    assert torch.equal(cache.get(IDS), torch.from_numpy(np.stack([rows[i] for i in IDS])))


def test_merge_copies_maps_in_steps_of_bounded_size(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache_module, "_COPY_BYTES", 3 * 5 * 3 * 2 * 2)  # two map rows a step
    rows = rows_for(IDS, (5, 3, 2))
    write_cache(tmp_path / "cache", {i: rows[i] for i in IDS[:3]})
    write_shards(tmp_path / "cache", [IDS[3:5], IDS[5:]], rows)
    merge_shards(tmp_path / "cache")  # the shards' own meta
    cache = FeatureCache(tmp_path / "cache")
    assert torch.equal(cache.get(IDS), torch.from_numpy(np.stack([rows[i] for i in IDS])))


def test_shards_made_otherwise_are_refused(tmp_path):
    rows = rows_for(IDS)
    write_cache(tmp_path / "cache", {i: rows[i] for i in IDS[:2]})
    other = {"backbone": "other", "feature_shape": [6]}
    write_cache(shard_folder(tmp_path / "cache", 0), {IDS[3]: rows[IDS[3]]}, other)
    with pytest.raises(DataError, match="rank-0 was made with another backbone"):
        merge_shards(tmp_path / "cache", {"backbone": "made-up", "feature_shape": [6]})


def test_a_merge_killed_before_its_index_is_written_completes_when_run_again(tmp_path, monkeypatch):
    rows = rows_for(IDS)
    meta = {"backbone": "made-up", "feature_shape": [6]}
    write_cache(tmp_path / "cache", {i: rows[i] for i in IDS[:3]})
    write_shards(tmp_path / "cache", [IDS[3::2], IDS[4::2]], rows)
    real_write = feature_cache_module.atomic_write_text

    def killed_at_the_index(path, text):
        if path == tmp_path / "cache" / INDEX_FILE:
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(feature_cache_module, "atomic_write_text", killed_at_the_index)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(tmp_path / "cache", meta)
    monkeypatch.setattr(feature_cache_module, "atomic_write_text", real_write)
    # The new array is in place but the old index still names the old rows, which kept their places.
    old = FeatureCache(tmp_path / "cache")
    assert len(old) == 3 and old.features.shape[0] == 7
    assert torch.equal(old.get(IDS[:3]), torch.from_numpy(np.stack([rows[i] for i in IDS[:3]])))
    merge_shards(tmp_path / "cache", meta)
    done = FeatureCache(tmp_path / "cache")
    assert len(done) == 7 and not (tmp_path / "cache" / SHARDS_DIR).exists()
    assert torch.equal(done.get(IDS), torch.from_numpy(np.stack([rows[i] for i in IDS])))
