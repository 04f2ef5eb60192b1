"""Region of interest: defects outside it are not inspected, defects inside still are; the region scales to
each image's size, travels in the artifact, and bad regions are refused with a clear message."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from common.engine.artifact import ArtifactError
from common.engine.config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from common.engine.roi import RegionOfInterest
from tests.synthetic import blob_mask, plant, png_bytes, texture

CFG = PatchCoreConfig(image_size=96, coreset_ratio=0.25, coreset_min_size=0, batch_size=4)
SIDE = 128


def left_half(h: int = SIDE, w: int = SIDE) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[:, : w // 2] = True
    return mask


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [texture(rng) for _ in range(10)]


@pytest.fixture(scope="module")
def models(train) -> dict[str, PatchCore]:
    """The same fit without a region, with the left half at the images' size, and with it drawn at 32 px."""
    out = {}
    for name, roi in (("plain", None), ("roi", RegionOfInterest(left_half())),
                      ("roi_small", RegionOfInterest(left_half(32, 32)))):
        out[name] = PatchCore(CFG, roi=roi)
        out[name].fit(train)
    return out


@pytest.fixture(scope="module")
def defects() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    out = {}
    for name, center in (("inside", (64, 30)), ("outside", (64, 100))):
        mask = blob_mask(SIDE, SIDE, center, 7)
        out[name] = (plant(texture(rng), mask, 10), mask)
    return out


def test_a_defect_outside_the_region_is_not_inspected(models, defects) -> None:
    plain = models["plain"].predict([image for image, _ in defects.values()])
    assert all(r.is_anomalous for r in plain)  # both are defects to a model without a region
    for name in ("roi", "roi_small"):
        inside, outside = models[name].predict([defects["inside"][0], defects["outside"][0]])
        assert inside.is_anomalous and defects["inside"][1][inside.max_location]  # found where it is
        assert not outside.is_anomalous and not outside.mask.any(), name
        assert outside.score < 0.8 * plain[1].score
        assert not inside.anomaly_map[:, SIDE // 2:].any() and not outside.anomaly_map[:, SIDE // 2:].any()
        assert models[name].stats["roi_fraction"] == 0.5


def test_the_image_score_averages_the_top_fraction_of_the_region_s_patches(models, defects) -> None:
    """s* is the mean of the highest `image_score_top` of the patches inside the region, not of the whole
    grid (whose outside patches are 0): a fraction of all 144 would average 3, of the 72 inside only 1."""
    image = defects["inside"][0]
    for top in (0.02, 0.25):
        model = PatchCore(replace(CFG, num_neighbors=0, image_score_top=top), roi=models["roi"].roi)
        model.set_bank(models["roi"].index.bank)
        batch = next(model._batches([image]))
        dist, scores = model.patch_scores(batch)
        inside = np.sort(dist[0][model.roi.on_grid(dist.shape[1:])])[::-1]
        assert len(inside) == dist[0].size // 2
        k = max(1, round(top * len(inside)))
        assert scores[0] == pytest.approx(inside[:k].mean(), rel=1e-6)


def test_the_region_travels_in_the_artifact(models, defects, tmp_path) -> None:
    model = models["roi"]
    images = [image for image, _ in defects.values()]
    sha = model.save(tmp_path / "art")
    loaded = PatchCore.load(tmp_path / "art", expected_sha256=sha)
    assert np.array_equal(loaded.roi.mask, model.roi.mask)
    for a, b in zip(model.predict(images), loaded.predict(images), strict=True):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)

    meta_path = tmp_path / "art" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["roi_shape"] = [64, 64]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="region of interest"):
        PatchCore.load(tmp_path / "art")
    del meta["roi_shape"]  # a model.json that forgets the region: refused, not loaded without it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="region of interest"):
        PatchCore.load(tmp_path / "art")


@pytest.fixture(scope="module")
def unaligned() -> PatchCore:
    """A 100 px square input (13 stride-8 cells covering 104 px) inspected left of column 90, with a bank of
    one zero feature (every patch's distance is its feature's norm, above 0)."""
    region = np.zeros((100, 100), dtype=bool)
    region[:, :90] = True
    model = PatchCore(PatchCoreConfig(image_size=100, resize="square"), device="cpu", roi=RegionOfInterest(region))
    model.set_bank(np.zeros((1, model.features.dim), dtype=np.float32))
    return model


def test_the_grid_of_an_input_not_a_multiple_of_the_stride_is_not_stretched(unaligned, monkeypatch) -> None:
    """Cell i is input pixels 8i..8i+7 (the last cell reaches past the input): cell 11 (88..95) is a
    quarter inside the region and left out; stretched over 100 px it was 85..92, mostly inside. A hot
    cell's map is centred on its own pixels."""
    image = texture(np.random.default_rng(0), 100, 100)
    _, dist, _, counted, grid = unaligned.nearest(next(unaligned._batches([image])))
    assert grid == (13, 13) and counted == 13 * 11
    assert np.array_equal(np.flatnonzero(dist.reshape(grid)[0]), np.arange(11))

    hot = np.zeros((1, *grid), dtype=np.float32)
    hot[0, 6, 3] = 1.0  # input pixels 48..55 x 24..31: its tent and blur stay inside the image and the region
    monkeypatch.setattr(unaligned, "patch_scores", lambda batch: (hot, np.ones(1)))
    amap = unaligned.predict([image])[0].anomaly_map
    centroid = [(np.arange(100) * amap.sum(axis=axis)).sum() / amap.sum() for axis in (1, 0)]
    assert centroid == pytest.approx([51.5, 27.5], abs=1e-3)


def test_bad_regions_are_refused() -> None:
    with pytest.raises(ValueError, match="no pixel to inspect"):
        RegionOfInterest(np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match="2-d boolean"):
        RegionOfInterest(np.ones((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no pixel to inspect"):
        RegionOfInterest.from_image(png_bytes(np.full((8, 8, 3), 40, dtype=np.uint8)))
    with pytest.raises(ValueError, match="does not combine with center_crop"):
        PatchCore(PatchCoreConfig(resize="square", image_size=128, center_crop=96),
                  roi=RegionOfInterest(left_half()))


def test_region_from_an_image_and_a_thin_region_on_a_coarse_grid() -> None:
    drawn = np.zeros((40, 60, 3), dtype=np.uint8)
    drawn[10:30, 5:25] = 255
    roi = RegionOfInterest.from_image(png_bytes(drawn))
    assert roi.mask.shape == (40, 60) and roi.mask.sum() == 400
    assert roi.over_image((80, 120)).sum() == 1600  # scaled to an image twice the size
    line = np.zeros((200, 200), dtype=bool)
    line[100, 20:180] = True  # one pixel high: a share of 1/20 of any cell it crosses on a 10 x 10 grid
    grid = RegionOfInterest(line).on_grid((10, 10))
    assert grid.any() and not grid[:, 0].any() and grid[5, 1:9].all()
    for left in (449, 450, 451):  # a seam two pixels wide; at 449 nearest-neighbour scaling to 288 px drops it
        seam = np.zeros((900, 900), dtype=bool)
        seam[:, left: left + 2] = True
        model_input = RegionOfInterest(seam).over_image((288, 288))
        columns = np.flatnonzero(model_input.any(axis=0))  # the one or two cells it straddles, whole
        assert 1 <= len(columns) <= 2 and model_input[:, columns].all() and model_input.sum() == 288 * len(columns)


def test_evaluate_with_a_region_judges_the_inspection_as_configured(tmp_path) -> None:
    from tests.synthetic import make_mvtec
    from totalrecall.cli import main

    data = make_mvtec(tmp_path / "mvtec")
    region = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    region[:, : SIDE // 2] = 255
    (tmp_path / "roi.png").write_bytes(png_bytes(region))
    reports = {}
    for name, extra in (("plain", []), ("roi", ["--roi", str(tmp_path / "roi.png")])):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--data", str(data["root"]), "--category", data["category"], "--image-size", "96",
                     "--coreset-ratio", "0.25", "--quiet", "--json", str(out), *extra]) == 0
        reports[name] = json.loads(out.read_text())
    assert reports["plain"]["roi_fraction"] is None and reports["roi"]["roi_fraction"] == 0.5
    # the scratches run into the right half: their pixels there are missed, by design
    assert reports["roi"]["pixel_auroc"] < reports["plain"]["pixel_auroc"] - 0.05
