"""Locally aware patch features (PatchCore paper, section 3.1).

Each stage map is averaged over a 3x3 neighbourhood (anomalib's reading of the paper's aggregation), the
stride-16 map is bilinearly upsampled onto the stride-8 grid (by the ratio of the strides, anchored at the
top left; the grid is the finest stage's, whatever order the layers are listed in), and each stage is
brought to an equal share of the `embed_dim` budget before concatenation:
- a stage with more channels than its share is reduced by adaptive average pooling over channels;
- a stage with fewer channels keeps them and is scaled by sqrt(share / channels): repeating its channels
  up to the share would multiply its squared L2 distances by share / channels, so the scaling gives the
  same distances at a fraction of the memory and kNN cost.
The reference code instead keeps the 3x3 neighbourhood's values (it pools the flattened C x 3 x 3 vector
to its embedding size); README.md says what that measured and why it is not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.engine.backbones import StageExtractor


class PatchFeatures(nn.Module):
    def __init__(self, extractor: StageExtractor, stages: list[tuple[int, int]], embed_dim: int):
        """`stages`: (channels, stride) of each of the extractor's stages (`probe_stages`)."""
        super().__init__()
        self.extractor = extractor
        channels = [c for c, _ in stages]
        strides = [s for _, s in stages]
        self.stride = min(strides)  # the patch grid's: the finest stage's
        self.finest = strides.index(self.stride)
        self.factors = [max(1, s // self.stride) for s in strides]  # onto the finest grid
        share = embed_dim // len(channels)
        self.out_channels = [min(c, share) for c in channels]
        self.scales = [math.sqrt(share / c) if c < share else 1.0 for c in channels]
        self.dim = sum(self.out_channels)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/s, W/s, dim) float32 patch features (s = `stride`, rounded up), the stages
        concatenated in the order they are listed."""
        maps = self.extractor(x)
        grid = maps[self.finest].shape[-2:]
        parts = []
        for fmap, out_c, scale, factor in zip(maps, self.out_channels, self.scales, self.factors, strict=True):
            fmap = fmap.float()
            fmap = F.avg_pool2d(fmap, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if fmap.shape[-2:] != grid:
                fmap = _onto_grid(fmap, grid, factor)
            fmap = fmap.permute(0, 2, 3, 1)  # channels last: pooling over channels is a 1-D pool
            if fmap.shape[-1] != out_c:
                b, h, w, c = fmap.shape
                fmap = F.adaptive_avg_pool1d(fmap.reshape(-1, 1, c), out_c).reshape(b, h, w, out_c)
            parts.append(fmap * scale if scale != 1.0 else fmap)
        return torch.cat(parts, dim=-1).contiguous()


def _onto_grid(fmap: torch.Tensor, grid: torch.Size, factor: int) -> torch.Tensor:
    """A deeper stage's map upsampled onto the finer grid by `factor`, the ratio of their strides,
    anchored at the top left and cut (or edge-padded) to the grid. An input side that is not a multiple of
    the deeper stride gives the deeper map a last, partly padded cell (e.g. 37 cells at stride 8, 19 at
    stride 16); stretching the map onto the grid would shift its cells against the finer ones by up to
    one cell."""
    if factor > 1:
        fmap = F.interpolate(fmap, scale_factor=factor, mode="bilinear", align_corners=False)
    short_h, short_w = max(0, grid[0] - fmap.shape[-2]), max(0, grid[1] - fmap.shape[-1])
    if short_h or short_w:
        fmap = F.pad(fmap, (0, short_w, 0, short_h), mode="replicate")
    return fmap[..., : grid[0], : grid[1]]


def probe_stages(extractor: StageExtractor) -> list[tuple[int, int]]:
    """(channels, stride) of each stage the extractor returns, from one pass over a 64 x 64 input."""
    side = 64
    with torch.inference_mode():
        device = next(extractor.parameters()).device
        return [(m.shape[1], side // m.shape[-2]) for m in extractor(torch.zeros(1, 3, side, side, device=device))]
