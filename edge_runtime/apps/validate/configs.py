"""The model configurations a validation compares: a package on a backend and device, loaded once per run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import ValidationError

if TYPE_CHECKING:
    from edge_runtime.inference.package import ModelPackage
    from edge_runtime.inference.runner import Runner

#: the names of the configurations, in order; two at most
CONFIG_IDS = ("A", "B")


@dataclass(frozen=True)
class ModelConfig:
    """One model package on one backend and device."""

    package: Path | None = None  # None: the bundled package
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 0
    triton_url: str | None = None

    def runner_options(self) -> dict[str, Any]:
        if self.backend == "onnxruntime":
            return {"device": self.device, "threads": self.threads}
        if self.backend == "triton":
            return {"url": self.triton_url} if self.triton_url else {}
        return {"device": self.device}


@dataclass
class LoadedConfig:
    """A configuration with its package loaded and its runner open (see :func:`close_configs`)."""

    id: str
    config: ModelConfig
    package: ModelPackage
    runner: Runner

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "package": {
                "name": self.package.name,
                "version": self.package.version,
                "path": str(self.package.root),
                "model_sha256": self.package.model_sha256,
                "labels": [
                    {"value": lab.value, "name": lab.name, "type": f"{lab.type.scheme}:{lab.type.value}"}
                    for lab in self.package.labels
                ],
            },
            "backend": self.config.backend,
            "device": self.config.device,
            "threads": self.config.threads or None,
            "runner": self.runner.describe(),
        }


def configs_from_lists(
    models: Sequence[Path | None] | None = None,
    backends: Sequence[str] | None = None,
    devices: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    triton_urls: Sequence[str] | None = None,
) -> list[ModelConfig]:
    """One or two configurations from options each given 0, 1 or n times (n = 1 or 2)."""
    lists: dict[str, list[Any]] = {
        "--model": list(models or []),
        "--backend": list(backends or []),
        "--device": list(devices or []),
        "--threads": list(threads or []),
        "--triton-url": list(triton_urls or []),
    }
    n = max([1, *(len(v) for v in lists.values())])
    if n > 2:
        raise ValidationError("at most two configurations: give --model, --backend, --device, --threads at most twice")
    for option, values in lists.items():
        if len(values) not in (0, 1, n):
            raise ValidationError(f"{option} is given {len(values)} times; give it once or {n} times")

    def pick(option: str, i: int, default: Any) -> Any:
        values = lists[option]
        return default if not values else values[i if len(values) > 1 else 0]

    return [
        ModelConfig(
            package=pick("--model", i, None),
            backend=pick("--backend", i, "onnxruntime"),
            device=pick("--device", i, "cpu"),
            threads=int(pick("--threads", i, 0)),
            triton_url=pick("--triton-url", i, None),
        )
        for i in range(n)
    ]


def open_configs(configs: Sequence[ModelConfig]) -> list[LoadedConfig]:
    """Load each configuration's package and open its runner; all or none (``PackageError``, ``RunnerError``)."""
    from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
    from edge_runtime.inference.runner import load_runner

    loaded: list[LoadedConfig] = []
    try:
        for cid, config in zip(CONFIG_IDS, configs, strict=False):
            package = ModelPackage.load(config.package or DEFAULT_PACKAGE)
            runner = load_runner(package, config.backend, **config.runner_options())
            loaded.append(LoadedConfig(cid, config, package, runner))
    except BaseException:
        close_configs(loaded)
        raise
    return loaded


def close_configs(loaded: Sequence[LoadedConfig]) -> None:
    """Close the runners :func:`open_configs` opened."""
    for item in loaded:
        item.runner.close()
