"""Whether a package's pipeline can be streamed, and the record of what streaming did for one series
(:mod:`edge_runtime.inference.streaming`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.tiling import pad_value


def unsupported(package: ModelPackage) -> str | None:
    """Why this package's pipeline cannot be streamed; None when it can."""
    if "nnunet" in package.manifest:
        return "the package's nnU-Net pipeline takes the whole volume"
    if package.input_channels > 1:
        return "the model takes several series (channels) as one input"
    if package.normalization.kind == "zscore":
        return "per-image z-score normalisation needs the whole volume"
    if pad_value(package.normalization) is None:
        return f"{package.normalization.kind} normalisation pads with the image minimum, known only at the end"
    if package.target_spacing is None or package.target_spacing[0] is None:
        return "without a target slice spacing the model grid follows the whole stack"
    return None


@dataclass
class Timeline:
    """What streaming did for one series (``measurements.json`` ``streaming``, and the log)."""

    mode: str = "whole-series"
    #: why the series was segmented whole ("" when streamed)
    reason: str = ""
    #: z-windows (slabs) begun while the series arrived, and their network windows run then
    slabs_streamed: int = 0
    windows_streamed: int = 0
    #: seconds of resampling + inference spent while the series arrived
    streamed_s: float = 0.0
    #: z-windows left for completion
    slabs_at_completion: int = 0

    def summary(self) -> str:
        """One line for the log."""
        total = self.slabs_streamed + self.slabs_at_completion
        if self.mode == "streaming":
            return (
                f"streamed {self.slabs_streamed} of {total} slabs ({self.windows_streamed} windows, "
                f"{self.streamed_s:.2f} s) while it arrived"
            )
        return f"segmented whole at completion: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
