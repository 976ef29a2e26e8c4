"""nnU-Net's sliding-window prediction (``nnUNetPredictor.predict_sliding_window_return_logits``) over a runner.

Same windows (``compute_steps_for_sliding_window``: ``ceil((size - tile) / (tile * step)) + 1`` evenly spread
starts, rounded), same padding (centred, constant 0, to at least one tile), same Gaussian (a unit impulse through
``scipy.ndimage.gaussian_filter`` with sigma ``tile / 8``, scaled to a maximum of 10 and stored as float16 as
nnU-Net does, zeros replaced by the smallest weight), same test-time mirroring (the network on every non-empty
combination of the allowed axes flipped, flipped back, averaged with the plain prediction). The blended logits
and the weight sums accumulate in float16 as nnU-Net's do (on every device): near the image borders the weights
are float16 subnormals, where nnU-Net's logits are coarsely rounded, and float32 sums would differ from them
there by up to half a logit. ``accumulate="float32"`` gives the more precise sums instead.
The folds of a package are averaged inside its model graph (one runner call per window gives the mean logits of
every fold); since blending and averaging are both linear this is the sum nnU-Net forms fold after fold.
A 2D configuration runs its ``(Y, X)`` tiles on every slice of the first axis (the runner sees ``(1, Y, X)``
windows).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

from edge_runtime.inference.runner import Runner

#: nnU-Net's Gaussian: sigma = tile * 1/8, maximum 10
SIGMA_SCALE = 1.0 / 8
VALUE_SCALING = 10.0


def compute_steps(image_size: Sequence[int], tile_size: Sequence[int], tile_step_size: float) -> list[list[int]]:
    """``compute_steps_for_sliding_window``, value for value."""
    target = [t * tile_step_size for t in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile_size, strict=True)]
    steps = []
    for dim, n in enumerate(num_steps):
        max_step = image_size[dim] - tile_size[dim]
        actual = max_step / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


@lru_cache(maxsize=4)
def gaussian_weights(tile_size: tuple[int, ...]) -> np.ndarray:
    """``compute_gaussian(tile, 1/8, value_scaling_factor=10, dtype=float16)`` as float32 values."""
    impulse = np.zeros(tile_size)
    impulse[tuple(i // 2 for i in tile_size)] = 1
    g = gaussian_filter(impulse, [i * SIGMA_SCALE for i in tile_size], 0, mode="constant", cval=0)
    g /= np.max(g) / VALUE_SCALING
    half = g.astype(np.float32).astype(np.float16)  # as torch converts float64 to float16: via float32
    zero = half == 0
    if zero.any():
        half[zero] = half[~zero].min()
    weights = half.astype(np.float32)
    weights.setflags(write=False)
    return weights


def pad_to(data: np.ndarray, tile: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``pad_nd_image(data, tile, "constant", value=0)``: centred padding up to ``tile`` on the last axes (the
    larger half after the content), and the slices that undo it."""
    lead = data.ndim - len(tile)
    pads = [(0, 0)] * lead
    for size, t in zip(data.shape[lead:], tile, strict=True):
        diff = max(0, t - size)
        pads.append((diff // 2, diff - diff // 2))
    undo = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, data.shape, strict=True))
    if not any(hi or lo for lo, hi in pads):
        return data, undo
    return np.pad(data, pads, mode="constant", constant_values=0), undo


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's order: each single axis, then each pair, ... (spatial axes, 0-based)."""
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def _windows(shape: Sequence[int], tile: Sequence[int], step: float) -> Iterator[tuple[slice | int, ...]]:
    if len(tile) == len(shape):
        steps = compute_steps(shape, tile, step)
        for start in itertools.product(*steps):
            yield tuple(slice(s, s + t) for s, t in zip(start, tile, strict=True))
        return
    # 2D tiles over a 3D image: every slice of the first axis
    steps = compute_steps(shape[1:], tile, step)
    for d in range(shape[0]):
        for start in itertools.product(*steps):
            yield (d, *(slice(s, s + t) for s, t in zip(start, tile, strict=True)))


def predict_logits(
    data: np.ndarray,
    runner: Runner,
    num_classes: int,
    tile: Sequence[int],
    *,
    tile_step_size: float = 0.5,
    use_gaussian: bool = True,
    mirror_axes: Sequence[int] = (),
    batch_size: int = 1,
    accumulate: str = "float16",
) -> tuple[np.ndarray, int]:
    """``(K, *spatial)`` logits (of the ``accumulate`` dtype) for ``(C, *spatial)`` data, and the number of
    windows."""
    tile = tuple(int(t) for t in tile)
    padded, undo = pad_to(data, tile)
    spatial = padded.shape[1:]
    dtype = np.dtype(accumulate)
    logits = np.zeros((num_classes, *spatial), dtype=dtype)
    counts = np.zeros(spatial, dtype=dtype)
    weights = gaussian_weights(tile) if use_gaussian else np.ones(tile, dtype=np.float32)
    flips = mirror_combinations(mirror_axes)
    # the runner takes 3D windows: a 2D tile becomes (1, Y, X)
    as_3d = len(tile) == 2
    batch: list[np.ndarray] = []
    pending: list[tuple[slice | int, ...]] = []
    windows = 0

    def flush() -> None:
        out = runner.infer(np.stack(batch))
        if as_3d:
            out = out[:, :, 0]
        per_window = len(flips) + 1
        for i, where in enumerate(pending):
            group = out[i * per_window : (i + 1) * per_window]
            pred = group[0].copy()
            for k, axes in enumerate(flips, start=1):
                pred += np.flip(group[k], tuple(a + 1 for a in axes))
            if flips:
                pred /= per_window
            pred *= weights
            every_class = (slice(None), *where)
            # each sum in float32, rounded once to the accumulator's dtype (torch's in-place add on half tensors)
            logits[every_class] = logits[every_class].astype(np.float32) + pred
            counts[where] = counts[where].astype(np.float32) + weights
        batch.clear()
        pending.clear()

    for where in _windows(spatial, tile, tile_step_size):
        every_channel = (slice(None), *where)
        window = padded[every_channel]
        variants = [window] + [np.flip(window, tuple(a + 1 for a in axes)) for axes in flips]
        for v in variants:
            batch.append(np.ascontiguousarray(v[:, None] if as_3d else v, dtype=np.float32))
        pending.append(where)
        windows += 1
        if len(pending) >= max(1, batch_size):
            flush()
    if pending:
        flush()
    logits[...] = logits.astype(np.float32) / counts.astype(np.float32)
    unpadded = (slice(None), *undo[1:])
    return logits[unpadded], windows
