"""A hand-built CT segmenter: smoothed HU thresholds for lung and bone, written as a PyTorch module.

It has no learned weights. It exists so that the runtime segments a CT out of the box and so that the export
path (module -> ONNX -> package) is exercised end to end; the trained phantom U-Net replaces it.

Input: CT normalised as HU / 1024 (the manifest's ``ct_window`` -1024..1024, mean 0, std 1024), shape
(N, 1, Z, Y, X). Output: logits (N, 3, Z, Y, X) for background, lung and bone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HU_SCALE = 1024.0


class ThresholdSegmenter(nn.Module):
    def __init__(self, lung_hu: tuple[float, float] = (-950.0, -400.0), bone_hu: float = 250.0,
                 sharpness: float = 40.0):
        super().__init__()
        self.lung_low = lung_hu[0] / HU_SCALE
        self.lung_high = lung_hu[1] / HU_SCALE
        self.bone = bone_hu / HU_SCALE
        self.k = sharpness

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        smooth = F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)
        in_lung = torch.sigmoid(self.k * (smooth - self.lung_low)) * torch.sigmoid(self.k * (self.lung_high - smooth))
        # Lung needs most of a 5x5x5 neighbourhood in range: the partial-volume shell at the skin is not lung.
        lung = F.avg_pool3d(in_lung, 5, stride=1, padding=2, count_include_pad=False)
        bone = torch.sigmoid(self.k * (smooth - self.bone))
        background = torch.full_like(lung, 0.5)
        return 10.0 * torch.cat([background, lung, bone], dim=1)
