"""nnU-Net's preprocessing of one case (``DefaultPreprocessor.run_case_npy``) without a segmentation.

Order as nnU-Net runs it: transpose to the plans' axis order, crop to the non-zero region, normalise each channel
with its scheme, resample to the configuration's spacing. :class:`Case` keeps what the way back needs (the shapes
before and after cropping, the bounding box and the spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_fill_holes

from edge_runtime.inference.nnunet.resampling import compute_new_shape, resample
from edge_runtime.inference.nnunet.settings import ChannelNormalization, NnunetSettings


@dataclass(frozen=True)
class Case:
    """Where one case's preprocessing went: what the way back needs."""

    #: spacing in nnU-Net's (transposed) axis order
    spacing: tuple[float, ...]
    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, ...]


def preprocess(image: np.ndarray, spacing: Sequence[float], settings: NnunetSettings,
               previous: np.ndarray | None = None) -> tuple[np.ndarray, Case]:
    """The network's input and the way back. ``image`` is ``(C, *spatial)`` in the axis order nnU-Net's image
    reader gives (SimpleITK: z, y, x), with ``spacing`` in that order. ``previous``: a cascade stage's input, the
    previous stage's label map on the image's grid, appended as one-hot channels (:mod:`.cascade`)."""
    forward = settings.transpose_forward
    # no copy yet: the crop below copies (once, into nnU-Net's axis order), and only that copy is written
    data = image.astype(np.float32, copy=False).transpose([0, *[i + 1 for i in forward]])
    spacing_t = tuple(float(spacing[i]) for i in forward)
    shape_before = tuple(data.shape[1:])
    mask = nonzero_mask(data)
    bbox = bounding_box(mask)
    where = tuple(slice(lo, hi) for lo, hi in bbox)
    every_channel = (slice(None), *where)
    data = data[every_channel].copy(order="C")
    mask = mask[where]
    target = target_spacing(settings, spacing_t)
    new_shape = compute_new_shape(data.shape[1:], spacing_t, target)
    for c in range(data.shape[0]):
        data[c] = normalize(data[c], settings.normalization[c], mask)
    data = resample(data, new_shape, spacing_t, target, settings.resampling_data, settings.anisotropy_threshold)
    if settings.previous_stage is not None:
        if previous is None:
            raise ValueError(f"a {settings.configuration} stage needs the label map of its previous stage")
        from edge_runtime.inference.nnunet.cascade import previous_stage_channels

        one_hot = previous_stage_channels(previous, forward, where, mask, new_shape, spacing_t, target,
                                          settings.previous_stage, settings.anisotropy_threshold)
        data = np.concatenate([data, one_hot])
    return data, Case(spacing_t, shape_before, bbox, tuple(mask.shape))


def target_spacing(settings: NnunetSettings, spacing: Sequence[float]) -> tuple[float, ...]:
    """The configuration's spacing; a 2D configuration keeps the case's own spacing along the first axis."""
    if len(settings.spacing) < len(spacing):
        return (float(spacing[0]), *settings.spacing)
    return settings.spacing


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """``create_nonzero_mask``: non-zero in any channel, holes filled."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    if mask.all():  # nothing to fill (a CT's air is -1000, not 0); binary_fill_holes would still sweep the volume
        return mask
    return np.asarray(binary_fill_holes(mask))


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``get_bbox_from_mask``: [low, high) per axis of the mask's True voxels (the whole array when none)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[axis]))
    return tuple(box)


def normalize(image: np.ndarray, norm: ChannelNormalization, mask: np.ndarray) -> np.ndarray:
    """One channel, float32, as nnU-Net's ``ImageNormalization`` subclasses compute it."""
    eps = 1e-8
    image = image.astype(np.float32, copy=False)
    if norm.scheme == "CTNormalization":
        np.clip(image, norm.lower, norm.upper, out=image)
        image -= norm.mean
        image /= max(norm.std, eps)
    elif norm.scheme == "ZScoreNormalization":
        if norm.use_mask:
            inside = image[mask]
            mean, std = inside.mean(), inside.std()
            image[mask] = (inside - mean) / max(std, eps)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, eps)
    elif norm.scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif norm.scheme == "RGBTo01Normalization":
        image /= 255.0
    return image
