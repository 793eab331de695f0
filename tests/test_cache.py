"""Frozen-feature cache: hits, misses, keys that never go stale, budget, concurrency, and the
equivalence of cached and uncached training."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from larp import FrozenBackbone, LaRPConfig
from larp.cache import FeatureCache
from larp.data import ImageRecord, read_records
from larp.errors import ConfigError
from larp.trainer import TrainConfig, Trainer

SMALL = "synthetic:source?n=2&n_train=1"


@pytest.fixture(scope="module")
def backbone() -> FrozenBackbone:
    return FrozenBackbone(LaRPConfig.tiny_random())


@pytest.fixture()
def images(tmp_path) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(path, None, 0, "c", "good"))
    return records


def test_fill_misses_then_hits_and_matches_backbone(tmp_path, backbone, images):
    cache = FeatureCache(backbone, tmp_path / "cache")
    keys, stats = cache.fill(images, batch_size=2, progress=False)
    assert (stats.hits, stats.misses) == (0, 3)
    keys2, stats2 = cache.fill(images, batch_size=2, progress=False)
    assert keys2 == keys and (stats2.hits, stats2.misses) == (3, 0)
    from larp.data import load_image

    direct = backbone.extract(load_image(images[1].image_path, 112).unsqueeze(0))
    entry = cache.load(keys[1])
    assert entry.patch_tokens.dtype == torch.float16
    torch.testing.assert_close(
        entry.patch_tokens.float(), direct.patch_tokens[0], atol=2e-2, rtol=1e-2
    )
    torch.testing.assert_close(
        entry.global_feature.float(), direct.global_feature[0], atol=2e-2, rtol=1e-2
    )


def test_changed_file_misses(tmp_path, backbone, images):
    cache = FeatureCache(backbone, tmp_path / "cache")
    keys, _ = cache.fill(images, progress=False)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images[0].image_path)
    keys2, stats = cache.fill(images, progress=False)
    assert keys2[0] != keys[0] and keys2[1:] == keys[1:]
    assert (stats.hits, stats.misses) == (2, 1)


def test_same_content_elsewhere_hits(tmp_path, backbone, images):
    cache = FeatureCache(backbone, tmp_path / "cache")
    cache.fill(images[:1], progress=False)
    copy = tmp_path / "copy.png"
    shutil.copy(images[0].image_path, copy)
    _, stats = cache.fill([ImageRecord(copy, None, 0, "c", "good")], progress=False)
    assert stats.hits == 1


@pytest.mark.parametrize(
    "change",
    [
        {"vv_from_layer": None},
        {"feature_layers": (2, 3, 4), "shallow_layers": (2,)},
        {"backbone_seed": 1},
        {"image_size": 96},
    ],
)
def test_backbone_settings_change_the_namespace(tmp_path, backbone, images, change):
    cache = FeatureCache(backbone, tmp_path / "cache")
    keys, _ = cache.fill(images[:1], progress=False)
    other = FeatureCache(FrozenBackbone(LaRPConfig.tiny_random(**change)), tmp_path / "cache")
    assert other.namespace != cache.namespace
    other_keys, stats = other.fill(images[:1], progress=False)
    assert other_keys != keys and stats.misses == 1
    # settings that do not touch the backbone share entries
    same = FeatureCache(
        FrozenBackbone(LaRPConfig.tiny_random(lam=3.0, top_k=2)), tmp_path / "cache"
    )
    assert same.namespace == cache.namespace


def test_budget_evicts_least_recently_used(tmp_path, backbone, images):
    cache = FeatureCache(backbone, tmp_path / "cache")
    keys, _ = cache.fill(images, progress=False)
    entry_size = cache.path(keys[0]).stat().st_size
    small = FeatureCache(backbone, tmp_path / "cache", budget_bytes=int(entry_size * 2.5))
    evicted = small.enforce_budget(keep={keys[2]})
    assert evicted == 1
    assert cache.path(keys[2]).is_file()
    remaining = [k for k in keys if cache.path(k).is_file()]
    assert len(remaining) == 2


def test_budget_smaller_than_dataset_is_a_clear_error(tmp_path, backbone, images):
    cache = FeatureCache(backbone, tmp_path / "cache", budget_bytes=1000)
    with pytest.raises(ConfigError, match="budget"):
        cache.fill(images, progress=False)


def test_concurrent_writers_leave_valid_entries(tmp_path, backbone, images):
    caches = [FeatureCache(backbone, tmp_path / "cache") for _ in range(3)]
    errors = []

    def work(cache):
        try:
            cache.fill(images, batch_size=1, progress=False)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    keys, stats = caches[0].fill(images, progress=False)
    assert stats.hits == 3
    assert all(caches[0].load(k) is not None for k in keys)
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_cached_training_matches_uncached(tmp_path):
    read_records(SMALL)  # generate once
    losses = {}
    for use_cache in (True, False):
        cfg = TrainConfig(
            train_data=SMALL,
            eval_data=None,
            epochs=2,
            use_cache=use_cache,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
        trainer = Trainer(LaRPConfig.tiny_random(), cfg)
        losses[use_cache] = [trainer.train_epoch(e)["loss"] for e in range(2)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)
    assert losses[True][1] != losses[True][0]
