"""Grey levels for the pictures a person looks at (overlay images, status-page thumbnails): one display window.

CT: the soft-tissue window (level 40, width 400 HU), where most segmented organs are told apart. Other
modalities have no absolute scale, so each plane is stretched from its 1st to its 99th percentile.
"""

from __future__ import annotations

import numpy as np

#: CT display window (level, width) in HU
CT_WINDOW = (40.0, 400.0)


def grey_levels(plane: np.ndarray, modality: str) -> np.ndarray:
    """``plane`` as float32 grey levels in 0..1 through the display window of ``modality``."""
    pixels = plane.astype(np.float32)
    if modality.upper() == "CT":
        level, width = CT_WINDOW
        lo, hi = level - width / 2, level + width / 2
    else:
        lo, hi = (float(v) for v in np.percentile(pixels, (1, 99)))
    return np.clip((pixels - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
