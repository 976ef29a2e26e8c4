"""Typed configuration, built once at start from defaults, an optional TOML file and the command line.

The TOML file takes the same keys as the command-line options (``quiet_seconds`` or ``quiet-seconds``).
Every problem is reported at once, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_runtime.egress.sender import Destination
from edge_runtime.errors import ConfigError
from edge_runtime.imaging.volume import IRREGULAR_POLICIES
from edge_runtime.inference.package import DEFAULT_PACKAGE
from edge_runtime.inference.runner import BACKENDS, DEVICES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    ae_title: str = "EDGE"
    host: str = "0.0.0.0"
    port: int = 11112
    destination: tuple[Destination, ...] = ()
    spool: Path = Path("edge-runtime-data/spool")
    output: Path = Path("edge-runtime-data/results")
    model: Path = DEFAULT_PACKAGE
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 0
    #: native TensorRT backend: engine precision, and whether to rebuild an engine whose key does not match
    precision: str = "fp16"
    rebuild_engine: bool = False
    triton_url: str = "127.0.0.1:8001"
    triton_model: str | None = None
    triton_shared_memory: bool = False
    #: when the configured backend cannot start: run on this local backend instead (logged loudly), or fail
    fallback_backend: str | None = None
    quiet_seconds: float = 5.0
    early_completion: bool = True
    #: after a release that leaves a complete stack, wait this long for the sender to come back before finishing
    release_grace_seconds: float = 0.5
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    allowed_networks: tuple[str, ...] = ()
    max_instance_mb: int = 2048
    tls_port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    irregular_spacing: str = "resample"
    min_free_mb: int = 512
    #: spooled instances of finished series are deleted after this long (results stay in the output folder)
    retention_hours: float = 72.0
    decode_cache_mb: int = 2048
    http_host: str = "127.0.0.1"
    http_port: int = 8190
    log_level: str = "info"
    log_json: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_KEYS = {f.name for f in fields(Config)} - {"extra"}


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"config file {path}: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path} is not valid TOML: {exc}"]) from exc
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(values: dict[str, Any]) -> Config:
    """Validate raw values (from TOML and/or the command line) into a :class:`Config`."""
    problems: list[str] = []
    out: dict[str, Any] = {}
    unknown = sorted(set(values) - _KEYS)
    for key in unknown:
        problems.append(f"unknown key {key!r}; allowed keys: {', '.join(sorted(_KEYS))}")

    def take(key: str, check, allowed: str) -> None:  # noqa: ANN001
        if key not in values or values[key] is None:
            return
        value = values[key]
        try:
            out[key] = check(value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            problems.append(f"{key} = {value!r} is not allowed: {allowed}{detail}")

    take("ae_title", _ae_title, "1 to 16 characters, no backslash or control characters")
    take("host", _str, "a host name or IP address to listen on")
    take("port", lambda v: _int_range(v, 0, 65535), "an integer 0-65535 (0 picks a free port)")
    take("destination", _destinations, "AE@host:port, or a list of them")
    take("spool", _path, "a directory path")
    take("output", _path, "a directory path")
    take("model", _path, "a model package directory")
    take("backend", lambda v: _choice(v, BACKENDS), f"one of {', '.join(BACKENDS)}")
    take("device", lambda v: _choice(v, DEVICES), f"one of {', '.join(DEVICES)}")
    take("triton_url", _str, "host:port of a Triton gRPC endpoint")
    take("triton_model", _str, "the model name in the Triton repository (default: the package name)")
    take("triton_shared_memory", _bool, "true or false (system shared memory; client and server on one host)")
    take("fallback_backend", lambda v: _choice(v, ("onnxruntime",)), "onnxruntime (CPU), or unset to fail")
    take("precision", lambda v: _choice(v, ("fp32", "fp16", "int8")), "fp32, fp16 or int8")
    take("rebuild_engine", _bool, "true or false")
    take("threads", lambda v: _int_range(v, 0, 1024), "an integer >= 0 (0: one per core)")
    take("quiet_seconds", _positive_float, "a number of seconds > 0")
    take("early_completion", _bool, "true or false")
    take("release_grace_seconds", lambda v: _nonnegative_float(v), "a number of seconds >= 0")
    take("allowed_calling_aets", _ae_list, "a list of AE titles")
    take("allowed_networks", _networks, "a list of networks such as 10.1.0.0/16 or 192.168.4.7")
    take("max_instance_mb", lambda v: _int_range(v, 1, 1024 * 1024), "an integer >= 1 (MiB)")
    take("tls_port", lambda v: _int_range(v, 0, 65535), "an integer 1-65535, or 0 for no TLS port")
    take("tls_cert", _existing_file, "the PEM certificate of this node, an existing file")
    take("tls_key", _existing_file, "the PEM private key of this node, an existing file")
    take("tls_ca", _existing_file, "a PEM CA bundle; clients must then present a certificate it signed")
    take("max_associations", lambda v: _int_range(v, 1, 1000), "an integer 1-1000")
    take(
        "irregular_spacing",
        lambda v: _choice(v, IRREGULAR_POLICIES),
        f"one of {', '.join(IRREGULAR_POLICIES)}",
    )
    take(
        "decode_cache_mb",
        lambda v: _int_range(v, 0, 1024 * 1024),
        "an integer >= 0 (MiB of slices decoded as they arrive; 0 turns it off)",
    )
    take("retention_hours", _positive_float, "a number of hours > 0")
    take("min_free_mb", lambda v: _int_range(v, 0, 10**9), "an integer >= 0 (MiB)")
    take("http_host", _str, "an address for the health and metrics endpoint (default 127.0.0.1)")
    take(
        "http_port",
        lambda v: _int_range(v, 0, 65535),
        "an integer 1-65535, or 0 to disable /healthz /metrics",
    )
    take("log_level", lambda v: _choice(str(v).lower(), LOG_LEVELS), f"one of {', '.join(LOG_LEVELS)}")
    take("log_json", _bool, "true or false")
    if out.get("tls_port") and not (out.get("tls_cert") and out.get("tls_key")):
        problems.append("tls_port is set: tls_cert and tls_key are required")
    if problems:
        raise ConfigError(problems)
    return Config(**out)


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError
    return v.strip()


def _ae_title(v: Any) -> str:
    s = _str(v)
    if len(s) > 16 or "\\" in s or any(ord(c) < 32 for c in s):
        raise ValueError
    return s


def _ae_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return tuple(_ae_title(x) for x in v)


def _int_range(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, str):
        i = int(v.strip())
    elif isinstance(v, int) and not isinstance(v, bool):
        i = v
    else:
        raise TypeError
    if not lo <= i <= hi:
        raise ValueError
    return i


def _positive_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError
    return f


def _nonnegative_float(v: Any) -> float:
    if isinstance(v, bool):
        raise TypeError
    f = float(v)
    if not math.isfinite(f) or f < 0:
        raise ValueError
    return f


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise ValueError


def _choice(v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ValueError
    return str(v)


def _path(v: Any) -> Path:
    return Path(_str(str(v) if isinstance(v, Path) else v)).expanduser()


def _networks(v: Any) -> tuple[str, ...]:
    import ipaddress

    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return tuple(str(ipaddress.ip_network(str(x), strict=False)) for x in v)


def _existing_file(v: Any) -> Path:
    p = _path(v)
    if not p.is_file():
        raise ValueError("no such file")
    return p


def _destinations(v: Any) -> tuple[Destination, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return tuple(Destination.parse(x) if isinstance(x, str) else x for x in v)
