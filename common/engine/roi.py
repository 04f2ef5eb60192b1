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
so a thin region (a seam) stays whole in the model input and every image keeps a score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
        """From an image file: pixels brighter than mid-grey (any mode, alpha ignored) are inspected."""
        grey = decode_image(data).astype(np.uint16).sum(axis=2)
        return cls(grey > 3 * 127)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def over_image(self, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) boolean: the region over an image of that size (the model input or the original image)."""
        if self.mask.shape == tuple(hw):
            return self.mask
        return self._scaled(self._images, hw)

    def on_grid(self, grid_hw: tuple[int, int]) -> np.ndarray:
        """(h, w) boolean: which patches of a feature grid over the whole image are inside."""
        return self._scaled(self._grids, grid_hw)

    def _scaled(self, cache: dict, hw: tuple[int, int]) -> np.ndarray:
        """The mask at `hw`: a cell is inside when at least half of it is; when none is, the cells with the
        largest share are. Taken from the mask at its own resolution, so a thin region (a seam a few pixels
        wide on a large image) never vanishes however small the grid or the model input."""
        found = cache.get(hw)
        if found is None:
            share = F.adaptive_avg_pool2d(torch.from_numpy(self.mask.astype(np.float32))[None, None],
                                          hw)[0, 0].numpy()  # the share of each cell inside
            found = self._remember(cache, hw, share >= min(0.5, float(share.max())))
        return found

    @staticmethod
    def _remember(cache: dict, key: tuple[int, int], value: np.ndarray) -> np.ndarray:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        value = np.array(value)  # its own memory, read-only
        value.setflags(write=False)
        cache[key] = value
        return value
