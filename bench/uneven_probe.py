"""Do the default patch features tell MTD's "uneven" bands from nominal texture, and which patch scores see it?

    python bench/uneven_probe.py --data ../shared/datasets/mtd --category magnetic_tile

Fits the default model, then takes the patch features of the good and the uneven test tiles: patches whose
cell lies at least 75 % inside an uneven mask ("band"), patches of good tiles ("good"), and patches of
uneven tiles wholly outside the mask ("rest"); cells reaching into the padding are left out. For each
score, the AUROC of band against good and against rest (patch level, no smoothing):

- `nearest_bank`: the model's own patch score (distance to the nearest feature of its 1 % coreset);
- `linear_probe`: a supervised logistic regression on the standardised features, 5-fold cross-validated
  by tile (no tile in its own training fold). Not a method for the product (it needs the labels); it
  shows whether the information is in the features at all;
- label-free alternatives from the whole training set's patches (every patch, no coreset): `full_bank_kth`
  (distance to the k-th nearest, k = 1 is PatchCore without a coreset, larger k reads density) and
  `mahalanobis` (to the training patches' Gaussian, covariance shrunk by 1 % of its mean eigenvalue).

It also reports how often band-like patches (above the probe's 10th percentile of band patches, probe
fitted on all test patches) occur in good test tiles and in the training tiles, and in how many training
tiles. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engine import mvtec  # noqa: E402
from common.engine.metrics import image_auroc as auroc  # noqa: E402
from common.engine.patchcore import PatchCore  # noqa: E402

GOOD, BAND, REST = 0, 1, 2
BAND_SHARE = 0.75  # a cell at least this much inside the mask is a band patch
FOLDS = 5
SHRINK = 0.01  # Mahalanobis: covariance + SHRINK x mean eigenvalue
KTH = (1, 64, 1024)


def tile_patches(model: PatchCore, images: list, tests: list[mvtec.TestImage] | None = None
                 ) -> tuple[np.ndarray, ...]:
    """Features (N, D), nearest-bank distances (N,), tile index (N,) and share of the cell inside the
    tile's mask (N,; with `tests`, the images' own entries) of every patch of `images` whose cell lies
    wholly inside the image (none of the batch padding)."""
    feats, dists, tiles, shares = [], [], [], []
    for batch in model._batches(images):
        f, d, _, _, (h, w) = model.nearest(batch)
        padded = (int(batch.tensor.shape[-2]), int(batch.tensor.shape[-1]))
        for i, (pos, geo) in enumerate(zip(batch.positions, batch.geometries, strict=True)):
            inside = _on_grid(np.ones(geo.input_hw, dtype=np.float32), padded, (h, w)) >= 0.99
            share = np.zeros(h * w, dtype=np.float32)
            if tests is not None:
                top, left, bh, bw = geo.box
                mask = mvtec.load_mask(tests[pos], geo.orig_hw)
                region = mask[top: top + bh, left: left + bw].astype(np.float32)
                scaled = F.adaptive_avg_pool2d(torch.from_numpy(region)[None, None], geo.input_hw)[0, 0].numpy()
                share = _on_grid(scaled, padded, (h, w))
            feats.append(f[i][inside])
            dists.append(d[i][inside])
            tiles.append(np.full(int(inside.sum()), pos))
            shares.append(share[inside])
    return tuple(np.concatenate(a) for a in (feats, dists, tiles, shares))


def _on_grid(values: np.ndarray, padded_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """Mean of `values` (the image's part of the padded input, zero beyond) over each grid cell, flat."""
    full = torch.zeros(padded_hw)
    full[: values.shape[0], : values.shape[1]] = torch.from_numpy(values)
    return F.adaptive_avg_pool2d(full[None, None], grid_hw)[0, 0].reshape(-1).numpy()


def fit_probe(x: np.ndarray, y: np.ndarray) -> tuple[torch.nn.Linear, np.ndarray, np.ndarray]:
    """Class-balanced, lightly L2-regularised logistic regression on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.from_numpy((x - mu) / sd), torch.from_numpy(y.astype(np.float32))
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)
    weight = (yt == 0).sum() / (yt == 1).sum().clamp(min=1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(lin(xt)[:, 0], yt, pos_weight=weight)
        loss = loss + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin, mu, sd


def apply_probe(probe: tuple[torch.nn.Linear, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    lin, mu, sd = probe
    with torch.no_grad():
        return lin(torch.from_numpy((x - mu) / sd))[:, 0].numpy()


def probe_cv(x: np.ndarray, y: np.ndarray, tiles: np.ndarray, seed: int = 0) -> np.ndarray:
    """Out-of-fold probe scores, folds by tile."""
    names = np.unique(tiles)
    np.random.default_rng(seed).shuffle(names)
    out = np.zeros(len(y))
    for fold in np.array_split(names, FOLDS):
        held = np.isin(tiles, fold)
        out[held] = apply_probe(fit_probe(x[~held], y[~held]), x[held])
    return out


def band_aurocs(score: np.ndarray, label: np.ndarray) -> dict[str, float]:
    out = {}
    for neg, name in ((GOOD, "vs_good"), (REST, "vs_rest")):
        sel = (label == BAND) | (label == neg)
        out[name] = round(auroc(score[sel], (label[sel] == BAND).astype(int)), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--defect", default="uneven")
    a = p.parse_args()
    model = PatchCore(device="cpu")
    train = mvtec.train_images(a.data, a.category)
    model.fit(train)
    tests = [t for t in mvtec.test_images(a.data, a.category) if t.defect_type in ("good", a.defect)]
    x, dist, tiles, share = tile_patches(model, [t.path for t in tests], tests)
    defective = np.array([t.defect_type != "good" for t in tests])[tiles]
    label = np.where(~defective, GOOD, np.where(share >= BAND_SHARE, BAND, np.where(share <= 0, REST, -1)))
    keep = label >= 0
    x, dist, tiles, label = x[keep], dist[keep], tiles[keep], label[keep]
    scores = {"nearest_bank": dist}
    probe_cv_auroc = {}
    for neg, name in ((GOOD, "vs_good"), (REST, "vs_rest")):
        sel = (label == BAND) | (label == neg)
        cv = probe_cv(x[sel], label[sel] == BAND, tiles[sel])
        probe_cv_auroc[name] = round(auroc(cv, (label[sel] == BAND).astype(int)), 4)

    tx, _, ttiles, _ = tile_patches(model, train)
    knn, _ = faiss.knn(x, tx, max(KTH))
    for k in KTH:
        scores[f"full_bank_kth_{k}"] = np.sqrt(np.maximum(knn[:, k - 1], 0))
    cov = np.cov(tx, rowvar=False)
    precision = np.linalg.inv(cov + SHRINK * np.linalg.eigvalsh(cov).mean() * np.eye(len(cov)))
    centred = x - tx.mean(0)
    scores["mahalanobis"] = np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred))

    sel = (label == BAND) | (label == GOOD)
    probe = fit_probe(x[sel], label[sel] == BAND)
    band_like = np.percentile(apply_probe(probe, x[label == BAND]), 10)
    train_like = apply_probe(probe, tx) > band_like
    per_tile = np.bincount(ttiles, weights=train_like) / np.bincount(ttiles)
    print(json.dumps({
        "patches": {"band": int((label == BAND).sum()), "good": int((label == GOOD).sum()),
                    "rest": int((label == REST).sum()), "train": len(tx)},
        "band_auroc": {"linear_probe": probe_cv_auroc, **{name: band_aurocs(s, label) for name, s in scores.items()}},
        "band_like_share": {"good_test_patches": round(float(np.mean(apply_probe(probe, x[label == GOOD])
                                                                    > band_like)), 4),
                            "train_patches": round(float(train_like.mean()), 4),
                            "train_tiles_over_5pct": int((per_tile > 0.05).sum()),
                            "train_tiles_over_50pct": int((per_tile > 0.5).sum()),
                            "train_tiles": len(per_tile)},
    }))


if __name__ == "__main__":
    main()
