"""kNN search: approximate (IVF) index recall against exact search, deterministic training, choice by
bank size, the round trip through the model artifact; the torch search of faiss builds without GPU."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from common.engine.artifact import BANK_FILE, META_FILE, ArtifactError, load_artifact
from common.engine.config import PatchCoreConfig
from common.engine.knn import IndexSpec, NearestNeighbors, TorchFlatL2, auto_nlist, auto_pq_m, flat_search
from common.engine.patchcore import PatchCore


def _clustered(n: int, d: int, seed: int, clusters: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-5, 5, size=(clusters, d))
    return (centres[rng.integers(clusters, size=n)] + rng.standard_normal((n, d))).astype(np.float32)


BANK = _clustered(6_000, 32, seed=0)
QUERIES = _clustered(1_000, 32, seed=1)


@pytest.mark.parametrize(("kind", "min_recall"), [("ivf_flat", 0.97), ("ivf_pq", 0.95)])
def test_ivf_recall_is_close_to_exact(kind: str, min_recall: float) -> None:
    exact = NearestNeighbors(BANK, use_gpu=False)
    spec = IndexSpec(kind, nlist=64, nprobe=8, pq_m=16 if kind == "ivf_pq" else 0, seed=0)
    approx = NearestNeighbors(BANK, use_gpu=False, spec=spec)
    de, ie = exact.search(QUERIES, 1)
    da, ia = approx.search(QUERIES, 1)
    same = ie[:, 0] == ia[:, 0]
    assert same.mean() >= min_recall
    # found the true neighbour: the same distance (exact vectors, or PQ candidates re-ranked exactly)
    np.testing.assert_allclose(da[same], de[same], rtol=1e-4, atol=1e-4)
    assert (da >= de - 1e-4).all()  # an approximate neighbour is never nearer than the true one
    d9, i9 = approx.search(QUERIES[:50], 9)
    assert (np.diff(d9, axis=1) >= -1e-5).all() and (i9 >= 0).all()


def test_ivf_training_is_deterministic_and_rebuilds_exactly() -> None:
    spec = IndexSpec("ivf_pq", nlist=32, nprobe=4, pq_m=4, seed=3)
    a = NearestNeighbors(BANK, use_gpu=False, spec=spec)
    b = NearestNeighbors(BANK, use_gpu=False, spec=spec)
    assert np.array_equal(a.state.trained, b.state.trained) and np.array_equal(a.state.lists, b.state.lists)
    other_seed = NearestNeighbors(BANK, use_gpu=False, spec=IndexSpec("ivf_pq", 32, 4, 4, seed=4))
    assert not np.array_equal(a.state.trained, other_seed.state.trained)
    assert faiss.deserialize_index(a.state.trained).ntotal == 0  # centroids and codebooks only
    rebuilt = NearestNeighbors(BANK, use_gpu=False, spec=spec, state=a.state)
    for x, y in zip(a.search(QUERIES, 3), rebuilt.search(QUERIES, 3), strict=True):
        assert np.array_equal(x, y)


def test_ivf_search_falls_back_to_exact_when_its_lists_hold_too_few_rows() -> None:
    bank = _clustered(200, 8, seed=2, clusters=20)
    approx = NearestNeighbors(bank, use_gpu=False, spec=IndexSpec("ivf_flat", nlist=50, nprobe=1))
    exact = NearestNeighbors(bank, use_gpu=False)
    _, raw = approx.index.search(bank[:40], 9)
    short = (raw < 0).any(axis=1)  # one list of about 4 rows cannot give 9 neighbours
    assert short.any()
    d, i = approx.search(bank[:40], 9)
    de, ie = exact.search(bank[:40], 9)
    assert (i >= 0).all()
    assert np.array_equal(i[short], ie[short]) and np.array_equal(i[~short], raw[~short])
    np.testing.assert_allclose(d[short], de[short], rtol=1e-6)


def test_index_spec_follows_the_config_and_the_bank_size() -> None:
    assert IndexSpec.for_bank(PatchCoreConfig(), 10**7, 152) == IndexSpec()  # default: exact
    cfg = PatchCoreConfig(index="ivf_pq", index_min_bank=5000, index_nprobe=8)
    assert IndexSpec.for_bank(cfg, 4999, 152) == IndexSpec()  # small bank: exact
    spec = IndexSpec.for_bank(cfg, 1_000_000, 152)
    assert spec == IndexSpec("ivf_pq", nlist=4096, nprobe=8, pq_m=38, seed=0)
    assert auto_nlist(1_000_000) == 4096 and auto_pq_m(152) == 38 and auto_pq_m(1024) == 256
    with pytest.raises(ValueError, match="divide"):
        IndexSpec.for_bank(PatchCoreConfig(index="ivf_pq", index_min_bank=0, index_pq_m=7), 1000, 152)
    with pytest.raises(ValueError):
        PatchCoreConfig(index="hnsw")
    with pytest.raises(ValueError):
        PatchCoreConfig(index_nprobe=0)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_model_round_trip_through_the_artifact(kind: str, tmp_path) -> None:
    cfg = PatchCoreConfig(image_size=64, index=kind, index_min_bank=1000, index_nlist=16, index_nprobe=4,
                          index_pq_m=8)
    model = PatchCore(cfg, device="cpu")
    bank = _clustered(3000, model.features.dim, seed=5)
    model.set_bank(bank)
    model.image_threshold = model.pixel_threshold = 1.0
    sha = model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["format_version"] == 2 and meta["index"]["kind"] == kind and meta["index"]["nlist"] == 16
    assert set(meta["index"]["tensor_sha256"]) == {"index", "index_lists"}
    loaded = PatchCore.load(tmp_path / "m", sha, device="cpu")
    assert loaded.index.spec == model.index.spec
    assert np.array_equal(loaded.index.state.trained, model.index.state.trained)
    queries = _clustered(500, model.features.dim, seed=6)
    for x, y in zip(model.index.search(queries, 9), loaded.index.search(queries, 9), strict=True):
        assert np.array_equal(x, y)
    image = np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    assert model.predict([image])[0].score == loaded.predict([image])[0].score

    # a small bank keeps the exact index and the version-1 artifact
    model.set_bank(bank[:999])
    model.save(tmp_path / "small")
    assert json.loads((tmp_path / "small" / META_FILE).read_text())["format_version"] == 1
    assert load_artifact(tmp_path / "small").index is None


def test_a_tampered_or_missing_index_is_refused(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    from common.engine.artifact import sha256_file

    cfg = PatchCoreConfig(image_size=64, index="ivf_flat", index_min_bank=100, index_nlist=8)
    model = PatchCore(cfg, device="cpu")
    model.set_bank(_clustered(500, model.features.dim, seed=7))
    folder = tmp_path / "m"
    model.save(folder)
    tensors = load_file(str(folder / BANK_FILE))
    meta = json.loads((folder / META_FILE).read_text())

    def rewrite(new_tensors: dict, new_meta: dict) -> None:  # consistent file hash: only the inner checks
        save_file(new_tensors, str(folder / BANK_FILE))
        new_meta["bank_sha256"] = sha256_file(folder / BANK_FILE)
        (folder / META_FILE).write_text(json.dumps(new_meta))

    lists = tensors["index_lists"].copy()
    lists[0] = (lists[0] + 1) % 8
    rewrite({**tensors, "index_lists": lists}, dict(meta))
    with pytest.raises(ArtifactError, match="index_lists"):
        PatchCore.load(folder, device="cpu")
    rewrite({"bank": tensors["bank"]}, dict(meta))
    with pytest.raises(ArtifactError, match="needs tensors"):
        PatchCore.load(folder, device="cpu")
    no_index = {k: v for k, v in meta.items() if k != "index"}
    rewrite({"bank": tensors["bank"]}, {**no_index, "format_version": 1})
    with pytest.raises(ArtifactError, match="lacks a stored approximate index"):
        PatchCore.load(folder, device="cpu")


def test_torch_flat_search_finds_the_exact_neighbours_in_any_block_size(monkeypatch) -> None:
    """TorchFlatL2 is what a CUDA worker with faiss-cpu searches with; here it runs on the CPU."""
    exact_d2, exact_ids = faiss.knn(QUERIES, BANK, 9)
    search = TorchFlatL2(BANK, torch.device("cpu"))
    d2, ids = search.search(QUERIES, 9)
    assert ids.dtype == np.int64 and (ids == exact_ids).mean() > 0.999  # float32 near-ties may swap
    full = d2 + (QUERIES * QUERIES).sum(1, keepdims=True)  # its order key lacks the query's own |q|^2
    np.testing.assert_allclose(full, exact_d2, rtol=1e-4, atol=1e-2)
    monkeypatch.setattr(TorchFlatL2, "BLOCK", len(BANK) * 7)  # blocks of 7 queries, the last one short
    assert np.array_equal(search.search(QUERIES, 9)[1], ids)
    assert search.search(QUERIES[:0], 1)[1].shape == (0, 1)
    nn = NearestNeighbors(BANK, use_gpu=False)
    de, ie = nn.search(QUERIES, 1)
    nn.index = search  # the same search through NearestNeighbors: candidates refined to exact distances
    dt, it = nn.search(QUERIES, 1)
    assert np.array_equal(it, ie) and np.array_equal(dt, de)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine: bench/gpu_check.py fails on a CPU search")
def test_flat_search_on_a_machine_without_cuda_is_faiss_on_the_cpu() -> None:
    assert flat_search(True) == flat_search(None) == flat_search(False) == "faiss-cpu"
    assert NearestNeighbors(BANK, use_gpu=True).index is None  # faiss.knn over the bank


@pytest.mark.parametrize(("faiss_gpu", "cuda", "expected"), [
    (True, True, {True: "faiss-gpu", None: "faiss-gpu", False: "faiss-cpu"}),
    (False, True, {True: "torch-gpu", None: "faiss-cpu", False: "faiss-cpu"}),  # faiss-cpu on a CUDA machine
    (False, False, {True: "faiss-cpu", None: "faiss-cpu", False: "faiss-cpu"}),
])
def test_flat_search_follows_the_faiss_build_and_the_model_device(monkeypatch, faiss_gpu: bool, cuda: bool,
                                                                   expected: dict) -> None:
    """The decision alone (the machine's probes set as on each kind of machine); the searches themselves
    ran on an H200 (docs/benchmarks.md section 11)."""
    from common.engine import knn

    monkeypatch.setattr(knn, "gpu_available", lambda: faiss_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert {use_gpu: flat_search(use_gpu) for use_gpu in expected} == expected


def test_an_ivf_pq_size_that_does_not_divide_the_features_fails_before_any_image_is_read() -> None:
    """Not after hours of extraction and coreset: the feature dimension (152) is known from the backbone."""
    read: list[int] = []

    def loader(i: int):
        return lambda: read.append(i)

    model = PatchCore(PatchCoreConfig(image_size=64, index="ivf_pq", index_pq_m=7), device="cpu")
    with pytest.raises(ValueError, match="index_pq_m=7 must divide the feature dimension 152"):
        model.fit([loader(i) for i in range(4)])
    assert read == []
