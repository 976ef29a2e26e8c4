"""Channels resampled onto the first channel's grid in patient coordinates: trilinear interpolation reproduces
a linear function of position exactly, whatever the other grid's spacing, extent, slice positions or
orientation; outside the other volume the value is its lowest."""

from __future__ import annotations

import numpy as np

from edge_runtime.imaging.multichannel import resample_onto, same_grid, stack_channels
from edge_runtime.imaging.volume import Volume


def ramp(points: np.ndarray) -> np.ndarray:
    return 3.0 * points[..., 0] - 2.0 * points[..., 1] + 0.5 * points[..., 2] + 1000.0


def volume(shape, spacing, origin, row=(1, 0, 0), col=(0, 1, 0), positions=None) -> Volume:
    row_d, col_d = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row_d, col_d)
    positions = np.arange(shape[0]) * spacing[0] if positions is None else np.asarray(positions, float)
    k, i, j = np.meshgrid(positions, np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    points = (
        np.asarray(origin, float)
        + k[..., None] * normal
        + i[..., None] * spacing[1] * col_d
        + j[..., None] * spacing[2] * row_d
    )
    return Volume(
        ramp(points).astype(np.float32), spacing, positions, np.asarray(origin, float), row_d, col_d, [], True
    )


def test_linear_function_is_reproduced_on_the_reference_grid() -> None:
    reference = volume((6, 10, 12), (3.0, 2.0, 2.0), (-10.0, -8.0, -7.0))
    # coarser, larger, irregular slices, and rotated 90 degrees in plane (rows along y)
    other = volume(
        (7, 16, 16),
        (4.0, 2.5, 2.5),
        (25.0, -25.0, -12.0),
        row=(0, 1, 0),
        col=(-1, 0, 0),
        positions=[0, 4, 8, 13, 17, 21, 25],
    )
    assert not same_grid(reference, other)
    out = resample_onto(reference, other)
    np.testing.assert_allclose(out, reference.array, rtol=0, atol=1e-2)


def test_outside_the_other_volume_is_its_lowest_value_and_same_grid_is_not_resampled() -> None:
    reference = volume((4, 8, 8), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    small = volume((4, 4, 4), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    out = resample_onto(reference, small)
    assert out[:, 6:, 6:].min() == out[:, 6:, 6:].max() == small.array.min()
    np.testing.assert_allclose(out[:, :4, :4], small.array, atol=1e-3)
    stacked = stack_channels([reference, reference])
    assert stacked.shape == (2, 4, 8, 8) and np.array_equal(stacked[0], stacked[1])
