"""Locally aware patch features (PatchCore paper, section 3.1).

Each stage map is averaged over a 3x3 neighbourhood (anomalib's reading of the paper's aggregation), the
stride-16 map is bilinearly upsampled onto the stride-8 grid, and each stage is brought to an equal
share of the `embed_dim` budget before concatenation:
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
    def __init__(self, extractor: StageExtractor, channels: list[int], embed_dim: int):
        super().__init__()
        self.extractor = extractor
        share = embed_dim // len(channels)
        self.out_channels = [min(c, share) for c in channels]
        self.scales = [math.sqrt(share / c) if c < share else 1.0 for c in channels]
        self.dim = sum(self.out_channels)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/8, W/8, dim) float32 patch features."""
        maps = self.extractor(x)
        grid = maps[0].shape[-2:]
        parts = []
        for fmap, out_c, scale in zip(maps, self.out_channels, self.scales, strict=True):
            fmap = fmap.float()
            fmap = F.avg_pool2d(fmap, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if fmap.shape[-2:] != grid:
                fmap = F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
            fmap = fmap.permute(0, 2, 3, 1)  # channels last: pooling over channels is a 1-D pool
            if fmap.shape[-1] != out_c:
                b, h, w, c = fmap.shape
                fmap = F.adaptive_avg_pool1d(fmap.reshape(-1, 1, c), out_c).reshape(b, h, w, out_c)
            parts.append(fmap * scale if scale != 1.0 else fmap)
        return torch.cat(parts, dim=-1).contiguous()


def probe_channels(extractor: StageExtractor) -> list[int]:
    with torch.inference_mode():
        device = next(extractor.parameters()).device
        return [m.shape[1] for m in extractor(torch.zeros(1, 3, 64, 64, device=device))]
