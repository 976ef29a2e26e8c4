"""TotalSegmentator's parts as one torch module, so that one ONNX graph (and one sliding window) serves them all.

Kept apart from :mod:`export.totalsegmentator` so that building ``edge-export``'s command line never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PartsModel(nn.Module):
    """Every part's network in one graph: channel ``p`` of the input goes to part ``p``; the output is the parts'
    logits one after the other (each with its own background channel)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(x[:, i:i + 1]) for i, net in enumerate(self.parts)], dim=1)
