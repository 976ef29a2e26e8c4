"""Region-based nnU-Net models (BraTS-style): sigmoid outputs, one channel per region, painted into a label map.

A region is a set of labels (dataset.json ``"labels": {"whole tumor": [1, 2, 3], "tumor core": [2, 3], ...}``);
the network gives one sigmoid per region and nnU-Net's ``LabelManager.convert_probabilities_to_segmentation``
turns them into labels: for each region ``i`` in order, voxels whose probability exceeds 0.5 are set to
``regions_class_order[i]``, later regions painting over earlier ones. The probabilities are computed in float32
from the (possibly float16) logits, as nnU-Net's ``apply_inference_nonlin`` does (``logits.float()`` then
``torch.sigmoid``), so the 0.5 threshold falls on the same voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: nnU-Net's threshold on a region's sigmoid
THRESHOLD = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Float32 sigmoid of every region's logits (a new array; float16 logits are widened first)."""
    out = np.negative(logits, dtype=np.float32)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def paint_regions(probabilities: np.ndarray, class_order: Sequence[int], dtype: type = np.uint8) -> np.ndarray:
    """The label map of ``(R, *spatial)`` region probabilities: region ``i`` paints ``class_order[i]`` where its
    probability is above 0.5, in order (``LabelManager.convert_probabilities_to_segmentation``)."""
    if probabilities.shape[0] != len(class_order):
        raise ValueError(f"{probabilities.shape[0]} region channels for {len(class_order)} entries of "
                         "regions_class_order")
    labels: np.ndarray = np.zeros(probabilities.shape[1:], dtype=dtype)
    for region, value in enumerate(class_order):
        labels[probabilities[region] > THRESHOLD] = value
    return labels


def label_probabilities(region_probs: np.ndarray, class_order: Sequence[int], num_labels: int) -> np.ndarray:
    """Per-label probabilities ``(num_labels, *spatial)`` for a FRACTIONAL SEG and the confidence: label ``c``
    takes the sigmoid of the region that paints it (the last such region, as painting goes), background one minus
    the largest region probability. A region model has no per-label softmax; this is the closest reading."""
    out = np.zeros((num_labels, *region_probs.shape[1:]), dtype=np.float32)
    for region, value in enumerate(class_order):
        out[value] = region_probs[region]
    out[0] = 1.0 - region_probs.max(axis=0)
    return out
