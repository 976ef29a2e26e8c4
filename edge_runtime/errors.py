"""Every error the project raises, in one tree.

::

    EdgeRuntimeError                     the root: ``except EdgeRuntimeError`` catches everything of ours
    ├── StartupError                     the service (or a command) cannot start as configured
    │   ├── ConfigError                  configuration values, every problem listed
    │   ├── PackageError                 a model package that does not load or verify
    │   ├── MissingDependencyError       an optional dependency is missing; names the extra to install
    │   ├── BackendUnavailable           the requested backend or provider is not on this machine
    │   ├── EngineError                  a TensorRT engine cannot be built or loaded
    │   │   └── EngineKeyMismatch        an engine built for another model, TensorRT, GPU or precision
    │   └── ExportError                  ``edge-export``: a model, a loader, a parity gate or a Triton repository
    ├── RunnerError                      inference failed, or a batch does not fit the model
    ├── SeriesRefused(code, detail)      one series cannot be processed; the others go on
    │   ├── VolumeError                  the slices do not make a volume under the geometry policy
    │   ├── ReferenceRejected            a reference SEG cannot be compared with our result
    │   └── UndecodablePixels            a reference SEG's pixel data that no decoder here handles
    ├── DecoderFailed                    the isolated decoder child crashed, ran out of memory or time
    ├── SpoolFull                        too little free space in the spool (also an ``OSError``)
    └── ValidationError                  ``edge-runtime validate`` has nothing it can validate

The second bases (``ValueError``, ``ImportError``, ``OSError`` ...) keep each error catchable by what it also is.
A :class:`SeriesRefused` carries a short ``code`` (``out-of-domain``, ``gantry-tilt``...) that becomes the
series' recorded reason and the ``reason`` label of the failure metric, and a ``detail`` for people; neither
carries patient data.
"""

from __future__ import annotations

from pathlib import Path


class EdgeRuntimeError(Exception):
    """The root of every error raised by ``edge_runtime``, ``export`` and ``phantom``."""


# -- cannot start ----------------------------------------------------------------------------------------


class StartupError(EdgeRuntimeError):
    """The service or a command cannot start as configured; the message says what to change."""


class ConfigError(StartupError, ValueError):
    """Configuration values that are not allowed; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class PackageError(StartupError, ValueError):
    """A model package that is missing, malformed or fails verification; lists every problem."""

    def __init__(self, root: Path, problems: list[str]):
        self.root = root
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"model package {root} is not usable:\n{lines}")


class MissingDependencyError(StartupError, ImportError):
    """An optional dependency needed for a feature is not installed."""


class EngineError(StartupError, RuntimeError):
    """A TensorRT engine cannot be built, loaded or trusted."""


class EngineKeyMismatch(EngineError):
    """An engine built for another model, TensorRT version, GPU or precision; ``differences`` names each."""

    def __init__(self, engine: Path, differences: list[str]):
        self.engine = engine
        self.differences = differences
        lines = "\n".join(f"  - {d}" for d in differences)
        super().__init__(
            f"TensorRT engine {engine.name} does not match this package and machine:\n{lines}\n"
            "Rebuild it (edge-export engine PACKAGE --precision P, or the runner's rebuild=True)."
        )


class ExportError(StartupError):
    """``edge-export`` cannot turn a model into a package: the message says what was found and expected."""


# -- inference ---------------------------------------------------------------------------------------------


class RunnerError(EdgeRuntimeError, RuntimeError):
    """Inference failed, or a batch does not fit the model."""


class BackendUnavailable(RunnerError, StartupError):
    """The requested backend or execution provider is not available on this machine."""


# -- one series --------------------------------------------------------------------------------------------


class SeriesRefused(EdgeRuntimeError, ValueError):
    """One series cannot be processed. ``code`` is short and stable; ``detail`` says what was found."""

    def __init__(self, code: str, detail: str):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")

    @property
    def reason(self) -> str:
        """The reason recorded for the series: ``code: detail``."""
        return f"{self.code}: {self.detail}"


class VolumeError(SeriesRefused):
    """The slices do not make a volume under the stated policy."""


class ReferenceRejected(SeriesRefused):
    """A reference cannot be compared (no result of ours for its series, nothing matches, bad geometry)."""


class UndecodablePixels(SeriesRefused):
    """A SEG's Pixel Data cannot be decoded here (e.g. RLE Lossless with 1 bit allocated, which neither
    pydicom's nor pylibjpeg-rle's decoder supports)."""

    def __init__(self, detail: str):
        super().__init__("undecodable-pixels", detail)


# -- resources ---------------------------------------------------------------------------------------------


class DecoderFailed(EdgeRuntimeError, RuntimeError):
    """The decoder child crashed, was killed, ran out of memory or time."""


class SpoolFull(EdgeRuntimeError, OSError):
    """Less free space in the spool than configured: instances are refused with 0xA700 until there is more."""


# -- applications ------------------------------------------------------------------------------------------


class ValidationError(EdgeRuntimeError, ValueError):
    """``edge-runtime validate`` cannot run: nothing to validate, or arguments that do not fit."""
