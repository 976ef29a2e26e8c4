"""TensorRT engines for a model package: file names, the engine key, optimisation profiles and the builder.

An engine is only valid for the model, TensorRT version, GPU and precision it was built for. Beside each engine
file a sidecar JSON (``<engine>.json``) records that key (:class:`EngineKey`) plus the engine's own sha256;
the TensorRT runner compares it with the package and the machine before loading and says which part differs.

Building needs only ``tensorrt`` (and ``pycuda`` to name the GPU): no torch, so a device can (re)build its own
engine from the package's ONNX model. ``export/engine.py`` (the workstation CLI) and
``edge_runtime.inference.runner.tensorrt.runner`` both call :func:`build_engine`.

Files in the package folder (not listed in the manifest: they belong to one GPU, not to the model)::

    model.fp16.sm87.engine        serialised engine
    model.fp16.sm87.engine.json   its key
    tensorrt.sm87.timing-cache    TensorRT's timing cache (shared by precisions; speeds up rebuilds)
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import EngineError, EngineKeyMismatch
from edge_runtime.inference.package import ModelPackage, sha256_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
KEY_FORMAT = 1
DEFAULT_WORKSPACE_BYTES = 4 << 30
#: TensorRT comes from JetPack or NVIDIA's index, pycuda from PyPI (it builds against a CUDA toolkit)
INSTALL_HINT = "TensorRT itself comes with JetPack, or: pip install tensorrt --extra-index-url https://pypi.nvidia.com"


@dataclass(frozen=True)
class EngineKey:
    """What an engine is valid for. Two keys match when every field is equal."""

    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str

    #: field -> words for messages
    LABELS = {
        "model_sha256": "model sha256",
        "tensorrt_version": "TensorRT version",
        "gpu_name": "GPU",
        "compute_capability": "compute capability",
        "precision": "precision",
    }

    def differences(self, current: EngineKey) -> list[str]:
        """One line per field that differs: what the engine was built for, and what is here now."""
        out = []
        for name, label in self.LABELS.items():
            built, now = getattr(self, name), getattr(current, name)
            if built != now:
                out.append(f"{label}: engine built for {built!r}, this package/machine has {now!r}")
        return out

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        missing = [k for k in cls.LABELS if not isinstance(data.get(k), str)]
        if missing:
            raise EngineError(f"engine key lacks {', '.join(missing)}")
        return cls(**{k: data[k] for k in cls.LABELS})


@dataclass(frozen=True)
class EngineInfo:
    """A sidecar: the key, the engine file's own hash and how it was built."""

    key: EngineKey
    engine_sha256: str
    input_name: str
    profile: dict[str, list[int]]
    build_seconds: float
    built_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": KEY_FORMAT,
            "key": self.key.to_dict(),
            "engine_sha256": self.engine_sha256,
            "input": self.input_name,
            "profile": self.profile,
            "build_seconds": self.build_seconds,
            "built_at": self.built_at,
        }

    @classmethod
    def read(cls, path: Path) -> EngineInfo:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"cannot read the engine key {path.name}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
            raise EngineError(f"{path.name} is not an engine key of format {KEY_FORMAT}")
        return cls(
            key=EngineKey.from_dict(data.get("key", {})),
            engine_sha256=str(data.get("engine_sha256", "")),
            input_name=str(data.get("input", "")),
            profile={k: list(v) for k, v in data.get("profile", {}).items()},
            build_seconds=float(data.get("build_seconds", 0.0)),
            built_at=str(data.get("built_at", "")),
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def sm_tag(compute_capability: str) -> str:
    """``"8.7"`` -> ``"sm87"``."""
    return "sm" + compute_capability.replace(".", "")


def engine_path(package_dir: Path, precision: str, compute_capability: str) -> Path:
    check_precision(precision)
    return Path(package_dir) / f"model.{precision}.{sm_tag(compute_capability)}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def timing_cache_path(package_dir: Path, compute_capability: str) -> Path:
    return Path(package_dir) / f"tensorrt.{sm_tag(compute_capability)}.timing-cache"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise EngineError(f"precision is {precision!r}; allowed: {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class ProfileShapes:
    """One TensorRT optimisation profile for the package's input: whole patches, batch ``min..max``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def profile_shapes(package: ModelPackage, max_batch: int | None = None) -> ProfileShapes:
    """Batch 1 .. ``max_batch`` (default twice the manifest's batch size), tuned for the manifest's batch
    size; spatial sizes fixed at the patch size (the sliding window only ever sends whole patches)."""
    batch = package.batch_size
    top = max_batch if max_batch is not None else 2 * batch
    if top < batch:
        raise EngineError(f"max batch {top} is below the manifest's batch size {batch}")
    tail = (package.input_channels, *package.patch_size)
    return ProfileShapes((1, *tail), (batch, *tail), (top, *tail))


# ---------------------------------------------------------------------------------------------------
# needs tensorrt / pycuda from here on
# ---------------------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """``tensorrt``, or :class:`edge_runtime.extras.MissingDependencyError` naming the extra."""
    from edge_runtime.extras import MissingDependencyError, require

    try:
        return require("tensorrt", feature="TensorRT engines", extra="tensorrt", package="tensorrt")
    except MissingDependencyError as exc:
        raise MissingDependencyError(f"{exc}. {INSTALL_HINT}") from exc


@functools.cache
def tensorrt_logger() -> Any:
    """The one ``trt.Logger`` of this process, for every builder and runtime.

    TensorRT keeps a single logger pointer per process: a builder or runtime made with another logger while
    one exists gets a warning and the first logger, which must therefore outlive them all."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def import_pycuda() -> Any:
    from edge_runtime.extras import require

    return require(
        "pycuda.driver", feature="TensorRT engines (GPU buffers and streams)", extra="tensorrt", package="pycuda"
    )


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device``."""
    cuda = import_pycuda()
    cuda.init()
    if device >= cuda.Device.count():
        raise EngineError(f"CUDA device {device} requested; this machine has {cuda.Device.count()}")
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return str(dev.name()), f"{major}.{minor}"


def current_key(package: ModelPackage, precision: str, device: int = 0) -> EngineKey:
    trt = import_tensorrt()
    name, cc = gpu_identity(device)
    return EngineKey(package.model_sha256, str(trt.__version__), name, cc, precision)


def build_engine(
    package: ModelPackage,
    precision: str,
    *,
    device: int = 0,
    max_batch: int | None = None,
    timing_cache: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    progress: bool = True,
    out: Path | None = None,
) -> tuple[Path, EngineInfo]:
    """Build and save the engine for ``package`` (its ``model.onnx``) at ``precision``; returns its path and
    sidecar. ``int8`` needs an explicitly quantised model (Q/DQ nodes, e.g. from ``edge-export quantize``):
    there is no calibrator here. The timing cache is read from and written back to ``timing_cache`` (default:
    ``tensorrt.smXY.timing-cache`` in the package)."""
    check_precision(precision)
    trt = import_tensorrt()
    key = current_key(package, precision, device)
    engine = out or engine_path(package.root, precision, key.compute_capability)
    cache_file = timing_cache or timing_cache_path(package.root, key.compute_capability)
    shapes = profile_shapes(package, max_batch)

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(package.model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {package.model_path.name}: " + "; ".join(errors))
    quantised = any(
        network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
        for i in range(network.num_layers)
    )
    if precision == "int8" and not quantised:
        raise EngineError(
            f"int8 needs an explicitly quantised model (Q/DQ nodes); {package.model_path.name} has none. "
            "Make one with: edge-export quantize PACKAGE --out DIR, then build the engine in DIR"
        )
    if precision != "int8" and quantised:
        raise EngineError(f"{package.model_path.name} holds Q/DQ nodes: build it with --precision int8")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers left unquantised may run in fp16
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # weakly typed network with Q/DQ: explicit quantisation
    profile = builder.create_optimization_profile()
    profile.set_shape(package.input_name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)

    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting an empty one", cache_file.name)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    if progress:
        monitor = make_progress_monitor(trt)
        config.progress_monitor = monitor

    log.info(
        "building %s engine for %s on %s (sm %s)", precision, package.identity, key.gpu_name, key.compute_capability
    )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(f"TensorRT failed to build the {precision} engine (see its log above)")
    engine.write_bytes(bytes(serialized))
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(
        key=key,
        engine_sha256=sha256_file(engine),
        input_name=package.input_name,
        profile=shapes.to_dict(),
        build_seconds=round(seconds, 2),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    info.write(sidecar_path(engine))
    log.info("wrote %s (%.1f s) and %s", engine.name, seconds, cache_file.name)
    return engine, info


def make_progress_monitor(trt: Any, stream: Any = None) -> Any:
    """A ``trt.IProgressMonitor`` printing phases and steps (to stderr by default)."""
    import sys
    import threading

    out = stream or sys.stderr

    class PrintProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several threads
            self._steps: dict[str, int] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._steps[phase_name] = num_steps
                print(f"{'  ' * depth}[TensorRT] {phase_name} (0/{num_steps})", file=out, flush=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                total = self._steps.get(phase_name, 0)
                if total and (step + 1 == total or total <= 20 or (step + 1) % max(1, total // 10) == 0):
                    depth = self._depth.get(phase_name, 0)
                    print(f"{'  ' * depth}[TensorRT] {phase_name} ({step + 1}/{total})", file=out, flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)
                self._depth.pop(phase_name, None)

    return PrintProgress()


def check_engine(package: ModelPackage, engine: Path, current: EngineKey) -> EngineInfo:
    """The engine's sidecar if it matches ``current`` and the engine file is intact; else
    :class:`EngineKeyMismatch` listing every difference (or :class:`EngineError` if a file is missing)."""
    side = sidecar_path(engine)
    if not engine.is_file():
        raise EngineError(
            f"no TensorRT engine {engine.name} in {package.root} for {current.precision} on {current.gpu_name}; "
            f"build it with: edge-export engine {package.root} --precision {current.precision} "
            "(or pass rebuild=True)"
        )
    if not side.is_file():
        raise EngineError(f"{engine.name} has no key file {side.name}: rebuild the engine")
    info = EngineInfo.read(side)
    differences = info.key.differences(current)
    actual = sha256_file(engine)
    if info.engine_sha256 and actual != info.engine_sha256:
        differences.append(f"engine file: sha256 {actual}, its key says {info.engine_sha256} (corrupt or replaced)")
    if differences:
        raise EngineKeyMismatch(engine, differences)
    return info
