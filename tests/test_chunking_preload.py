"""Chunk plans of score jobs and backbone preloading in worker processes."""

from __future__ import annotations

import pytest

from common.settings import Settings
from scheduler.jobs import chunk_sizes, chunked


@pytest.mark.parametrize("n", [0, 1, 63, 64, 255, 256, 257, 1000, 4099])
def test_chunks_cover_every_image_once_in_order(n: int) -> None:
    uris = [f"s3://b/{i}.png" for i in range(n)]
    chunks = chunked(uris, 64)
    assert [u for c in chunks for u in c] == uris
    assert all(0 < len(c) <= 64 for c in chunks)


def test_large_jobs_ramp_up_and_down_small_jobs_are_even() -> None:
    sizes = chunk_sizes(1000, 64)
    assert sizes[:3] == [8, 16, 32] and sizes[-3:] == [32, 16, 8]  # first result after 8 images
    assert max(sizes) == 64 and sum(sizes) == 1000
    assert chunk_sizes(200, 64) == [64, 64, 64, 8]  # under 4 full chunks: no ramp
    assert chunk_sizes(30, 8) == [8, 8, 8, 6]  # chunks of 8 or less: nothing to ramp


def test_preload_setting_parses_lists_and_none() -> None:
    assert Settings.from_env({}).preload_backbones == ("efficientnet_lite0",)
    env = {"TOTALRECALL_PRELOAD_BACKBONES": "efficientnet_lite0, efficientnet_lite1"}
    assert Settings.from_env(env).preload_backbones == ("efficientnet_lite0", "efficientnet_lite1")
    assert Settings.from_env({"TOTALRECALL_PRELOAD_BACKBONES": "none"}).preload_backbones == ()


def test_preloaded_backbone_is_reused_by_models_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import torch

    from common.engine import backbone_cache
    from common.engine.config import PatchCoreConfig
    from common.engine.patchcore import PatchCore
    from workers.tasks import preload_backbones

    monkeypatch.setattr(backbone_cache, "_pinned", [])
    monkeypatch.setenv("TOTALRECALL_PRELOAD_BACKBONES", "efficientnet_lite0,no_such_backbone")
    from common.settings import reset_settings_cache
    reset_settings_cache()
    try:
        preload_backbones()  # the unknown name is logged, not raised
    finally:
        reset_settings_cache()
    [pinned] = backbone_cache._pinned
    gc.collect()  # no model holds it: only the pin keeps it alive
    explicit = PatchCoreConfig(layers=("blocks.2", "blocks.4"))  # the default stages, spelled out
    for config in (PatchCoreConfig(), explicit):
        assert PatchCore(config, device="cpu")._backbone is pinned
    assert pinned.extractor is backbone_cache.shared_backbone("efficientnet_lite0", None, None,
                                                              torch.device("cpu")).extractor
