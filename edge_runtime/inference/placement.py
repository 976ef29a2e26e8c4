"""A series' decoded slices laid side by side as they arrive, so that its volume is a view, not a copy.

A series that arrives in acquisition order arrives in spatial order, from one end. :class:`ArrivalStack` copies
each decoded slice, as it comes, into the next row of one array (from its end for a series acquired downwards,
so that the rows are in spatial order either way); the decode-ahead cache then holds that row in place of its own
copy. At completion the volume loader finds the slices of the stack side by side and takes the rows as the
volume (:func:`edge_runtime.imaging.volume.load_volume`), instead of copying the whole series once more on the
critical path. The array is reserved, not written: memory is taken as rows are written, a slice at a time.
A slice out of order ends the placing; the rows placed stay valid, and the loader copies as before.
"""

from __future__ import annotations

import numpy as np

#: rows reserved for one series at most (address space: only the rows written take memory)
MAX_ROWS = 2048


class ArrivalStack:
    """Rows of one array filled one slice at a time, upwards or (``down``) from the last row downwards."""

    def __init__(self, shape: tuple[int, ...], max_voxels: int, *, down: bool):
        rows = max(1, min(MAX_ROWS, max_voxels // max(1, shape[0] * shape[1])))
        self._buf = np.empty((rows, *shape), dtype=np.float32)
        self.down, self.n = down, 0

    def place(self, pixels: np.ndarray) -> np.ndarray | None:
        """Copy one slice into the next row; the row (a view), or None when the stack is full."""
        rows = self._buf.shape[0]
        if self.n >= rows or pixels.shape != self._buf.shape[1:]:
            return None
        row = self._buf[rows - 1 - self.n] if self.down else self._buf[self.n]
        row[...] = pixels
        self.n += 1
        return row
