"""Datasets in the MVTec AD folder layout: train/good, test/<type>, ground_truth/<type>/<stem>_mask.png (a
mask may have any image suffix, in any case: `masks_by_stem`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.images import IMAGE_SUFFIXES, list_image_files, open_image

MASK_SUFFIXES = tuple(f"_mask{suffix}" for suffix in IMAGE_SUFFIXES)  # in order of preference


@dataclass(frozen=True)
class TestImage:
    path: Path
    defect_type: str  # "good" for nominal images
    mask_path: Path | None  # None: no defect pixels

    @property
    def label(self) -> int:
        return int(self.defect_type != "good")


def train_images(root: str | Path, category: str) -> list[Path]:
    folder = Path(root) / category / "train" / "good"
    if not folder.is_dir():
        raise FileNotFoundError(f"no training folder {folder}")
    return list_image_files(folder)


def test_images(root: str | Path, category: str) -> list[TestImage]:
    base = Path(root) / category
    if not (base / "test").is_dir():
        raise FileNotFoundError(f"no test folder {base / 'test'}")
    items = []
    for type_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        masks = {} if type_dir.name == "good" else _masks_in(base / "ground_truth" / type_dir.name)
        items.extend(TestImage(path, type_dir.name, masks.get(path.stem)) for path in list_image_files(type_dir))
    if not items:
        raise FileNotFoundError(f"no test images under {base / 'test'} (test/good/, test/<defect type>/)")
    return items


def masks_by_stem(names: Iterable[str]) -> dict[str, str]:
    """The defect masks among `names` (file names, or keys under one prefix), by the stem of their image:
    `<stem>_mask<suffix>` for any image suffix, in any case (`000_mask.PNG`, `000_mask.tif`); where a stem
    has several, the first of `MASK_SUFFIXES` (.png first)."""
    found: dict[str, tuple[int, str]] = {}
    for name in names:
        lower = name.lower()
        rank = next((i for i, suffix in enumerate(MASK_SUFFIXES) if lower.endswith(suffix)), None)
        if rank is not None:
            stem = name[: -len(MASK_SUFFIXES[rank])]
            found[stem] = min(found.get(stem, (rank, name)), (rank, name))
    return {stem: name for stem, (_, name) in found.items()}


def _masks_in(folder: Path) -> dict[str, Path]:
    """The mask files of a ground-truth folder by their image's stem (`masks_by_stem`); none if it is missing."""
    if not folder.is_dir():
        return {}
    masks = masks_by_stem(p.name for p in folder.iterdir() if p.is_file())
    return {stem: folder / name for stem, name in masks.items()}


def load_mask(item: TestImage, hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask at (H, W) (`read_mask`); a missing mask is all False."""
    if item.mask_path is None:
        return np.zeros(hw, dtype=bool)
    return read_mask(item.mask_path, hw)


def read_mask(source: bytes | str | Path, hw: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean defect mask of a mask image, at (H, W) `hw` (resized, nearest, if needed) or its own size.

    Defect pixels are those >= 128 of 255 (MVTec's 0/255, robust to a JPEG mask's ringing); a mask whose
    values stay below 128 is a 0/1 (label-index) mask, whose defect pixels are the non-zero ones."""
    with open_image(source) as m:
        values = np.asarray(m.convert("L"))
    mask = values >= (128 if values.max() >= 128 else 1)
    return mask if hw is None else resize_mask(mask, hw)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A boolean mask at (H, W) `hw`, resized by nearest neighbour if it is another size."""
    if mask.shape == tuple(hw):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8)).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
    return np.asarray(resized).astype(bool)
