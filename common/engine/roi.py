"""Region of interest: the part of each image that is inspected (the part, not the conveyor, fixture or a
burned-in timestamp).

The region is a mask drawn on an image of the product (white: inspect), scaled to each image's own size,
so it also fits images of other resolutions. It covers the whole image, so it does not combine with a
center crop (which already limits what is inspected).

Three things happen outside the region:
- The model input there is set to the mean colour (0 after normalisation), for the training images and
  the scored ones alike. A CNN feature sees far beyond its own patch (before this, a dark blob 40 pixels to
  the right of the region raised patches inside it above the threshold). The edge it draws is in every
  training image, so it is nominal.
- Patch distances are set to 0 before the image score is taken (so its patches lie inside; the top fraction
  it averages is a fraction of the inside patches) and before the
  map is smoothed (so a defect just outside does not bleed into the region's edge).
- The map is 0 there, so no mask pixel lies outside.

Scaled to another size (the model input, a feature grid, an image of another resolution), a pixel or patch
counts as inside when at least half of its cell is; when no cell is, the cells with the largest share are,
so a thin region (a seam) stays whole in the model input and every image keeps a score. A feature grid's
cells are `stride` input pixels wide, so on an input side that is not a multiple of the stride the last cell
reaches past the image (`scoring.grid_span`): its share is of its part on the image.
"""

from __future__ import annotations

import numpy as np

from common.engine.scoring import grid_span
from common.images import decode_image

_CACHE_SIZE = 64  # image and grid sizes remembered (one of each for a fixed camera; tiles of many sizes cycle)


class RegionOfInterest:
    """A boolean (H, W) mask, True where images are inspected, scaled to each image's geometry."""

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != bool:
            raise ValueError(f"a region of interest is a 2-d boolean mask, got {mask.shape} {mask.dtype}")
        if not mask.any():
            raise ValueError("the region of interest has no pixel to inspect (draw it white on black)")
        self.mask = np.array(mask)  # its own memory, read-only: returned as is for images of its size
        self.mask.setflags(write=False)
        self._images: dict[tuple[int, int], np.ndarray] = {}
        self._grids: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_image(cls, data: bytes) -> RegionOfInterest:
        """From an image file: pixels brighter than mid-grey are inspected (any mode; an alpha channel is
        composited over black, as images are decoded, so transparent pixels are not inspected)."""
        grey = decode_image(data).astype(np.uint16).sum(axis=2)
        return cls(grey > 3 * 127)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def over_image(self, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) boolean: the region over an image of that size (the model input or the original image)."""
        if self.mask.shape == tuple(hw):
            return self.mask
        return self._scaled(self._images, tuple(hw), tuple(hw), None)

    def on_grid(self, grid_hw: tuple[int, int], input_hw: tuple[int, int] | None = None,
                stride: int | None = None) -> np.ndarray:
        """(h, w) boolean: which patches of a feature grid over the whole image are inside. `input_hw` and
        `stride` (the model input's size and the grid's stride) place the cells as `scoring.grid_span`
        does; without them the grid spans the image exactly."""
        return self._scaled(self._grids, tuple(grid_hw), tuple(input_hw or grid_hw), stride)

    def _scaled(self, cache: dict, cells_hw: tuple[int, int], input_hw: tuple[int, int],
                stride: int | None) -> np.ndarray:
        """The mask on `cells_hw` cells: a cell is inside when at least half of its part on the image is;
        when none is, the cells with the largest share are. Taken from the mask at its own resolution, so a
        thin region (a seam a few pixels wide on a large image) never vanishes however small the grid or
        the model input."""
        key = (cells_hw, input_hw, stride)
        found = cache.get(key)
        if found is None:
            rows, cols = (_cell_edges(c, side, n, stride)
                          for c, side, n in zip(cells_hw, self.mask.shape, input_hw, strict=True))
            share = _cell_shares(self.mask, rows, cols)
            found = self._remember(cache, key, share >= min(0.5, float(share.max())))
        return found

    @staticmethod
    def _remember(cache: dict, key: tuple, value: np.ndarray) -> np.ndarray:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        value = np.array(value)  # its own memory, read-only
        value.setflags(write=False)
        cache[key] = value
        return value


def _cell_edges(cells: int, side: int, n_input: int, stride: int | None) -> tuple[np.ndarray, np.ndarray]:
    """First and past-the-last mask pixel (of `side`) of each of `cells` cells over an input side of
    `n_input` pixels: the cell's part on the image, widened to whole pixels (adaptive average pooling's
    floor and ceil, which these are when the grid spans the input exactly)."""
    i = np.arange(cells, dtype=np.int64)
    span, whole = grid_span(cells, n_input, stride), cells * n_input  # cell i: from i * span / whole of the side
    start = np.minimum(i * span * side // whole, side - 1)
    end = -(-np.minimum((i + 1) * span, whole) * side // whole)
    return start, np.maximum(end, start + 1)


def _cell_shares(mask: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
                 cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The share of each cell (rows x cols, as `_cell_edges`) that is True, from running sums; in float32,
    divided as torch's adaptive average pooling does, so where a grid spans the input exactly the cells
    inside are those it gave."""
    down = np.zeros((mask.shape[0] + 1, mask.shape[1]), dtype=np.int32)
    np.cumsum(mask, axis=0, out=down[1:])
    by_row = down[rows[1]] - down[rows[0]]  # (cells_h, W) sums over each cell's rows
    across = np.zeros((by_row.shape[0], by_row.shape[1] + 1), dtype=np.int64)
    np.cumsum(by_row, axis=1, out=across[:, 1:])
    sums = across[:, cols[1]] - across[:, cols[0]]
    heights, widths = (rows[1] - rows[0]).astype(np.float32), (cols[1] - cols[0]).astype(np.float32)
    return sums.astype(np.float32) / heights[:, None] / widths
