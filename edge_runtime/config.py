"""Typed configuration, built once at start from defaults, an optional TOML file and the command line.

Each key is declared once, below, as a field of the section that uses it: its default, its check, what is
allowed and its help text. That one declaration drives the TOML file, the ``edge-runtime serve`` options and
validation. Keys are flat where people write them (``quiet_seconds = 2`` in TOML, ``--quiet-seconds 2`` on the
command line, and ``config.quiet_seconds`` in code that wants one value); the parts of the service take their
whole section (``config.listener``, ``config.runner``, ``config.series`` ...).

Every problem is reported at once, naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.egress.destination import Destination
from edge_runtime.errors import ConfigError
from edge_runtime.imaging.geometry import IRREGULAR_POLICIES
from edge_runtime.inference.domain import OUT_OF_DOMAIN_POLICIES
from edge_runtime.inference.package import DEFAULT_PACKAGE
from edge_runtime.inference.runner import BACKENDS, DEVICES, PRECISIONS
from edge_runtime.ops.atna import SyslogTarget

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

__all__ = ["Config", "ConfigError", "add_arguments", "build_config", "config_from_args", "load_toml"]

LOG_LEVELS = ("debug", "info", "warning", "error")


# -- checks: each turns a raw value (TOML or command line) into the typed one, or raises ---------------------


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError
    return v.strip()


def _ae_title(v: Any) -> str:
    s = _str(v)
    if len(s) > 16 or "\\" in s or any(ord(c) < 32 for c in s):
        raise ValueError
    return s


def _listed(v: Any) -> list[Any]:
    """A TOML list, or a comma-separated string from the command line."""
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return list(v)


def _ae_list(v: Any) -> tuple[str, ...]:
    return tuple(_ae_title(x) for x in _listed(v))


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, str):
            i = int(v.strip())
        elif isinstance(v, int) and not isinstance(v, bool):
            i = v
        else:
            raise TypeError
        if not lo <= i <= hi:
            raise ValueError
        return i

    return check


def _float_above(lo: float, *, inclusive: bool) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool):
            raise TypeError
        f = float(v)
        if not math.isfinite(f) or f < lo or (f == lo and not inclusive):
            raise ValueError
        return f

    return check


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    raise ValueError


def _choice(allowed: tuple[str, ...], *, fold: bool = False) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        value = str(v).lower() if fold else v
        if value not in allowed:
            raise ValueError
        return str(value)

    return check


def _path(v: Any) -> Path:
    return Path(_str(str(v) if isinstance(v, Path) else v)).expanduser()


def _existing_file(v: Any) -> Path:
    p = _path(v)
    if not p.is_file():
        raise ValueError("no such file")
    return p


def _networks(v: Any) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_network(str(x), strict=False)) for x in _listed(v))


def _destinations(v: Any) -> tuple[Destination, ...]:
    """``AE@host:port`` or the compact form (command line, TOML strings), or ``[[destination]]`` tables."""
    items = [v] if isinstance(v, (str, dict)) else v
    if not isinstance(items, (list, tuple)):
        raise TypeError
    parsed = tuple(
        Destination.parse(x) if isinstance(x, str) else Destination.from_table(x) if isinstance(x, dict) else x
        for x in items
    )
    names = [d.name for d in parsed]
    if shared := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"destinations share a name: {', '.join(shared)}")
    return parsed


# -- one declaration per key ---------------------------------------------------------------------------------


def option(
    default: Any,
    check: Callable[[Any], Any],
    allowed: str,
    help: str | None = None,  # noqa: A002 - argparse's word
    *,
    flag: str = "value",
    metavar: str | None = None,
) -> Any:
    """A configuration key: ``check`` makes the typed value, ``allowed`` says what passes (for error messages),
    ``help`` is the command-line help (default: ``allowed``). ``flag`` is how the command line takes it:
    ``value``, ``bool`` (``true``/``false``), ``switch`` (present means true) or ``append`` (repeatable)."""
    meta = {"check": check, "allowed": allowed, "help": help or allowed, "flag": flag, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ListenerSettings:
    """The DICOM listener (ingest): who may connect, how much, and TLS."""

    ae_title: str = option(
        "EDGE",
        _ae_title,
        "1 to 16 characters, no backslash or control characters",
        "our AE title; senders must call it (default EDGE)",
    )
    host: str = option(
        "0.0.0.0", _str, "a host name or IP address to listen on", "address to listen on (default 0.0.0.0)"
    )
    port: int = option(
        11112, _int_range(0, 65535), "an integer 0-65535 (0 picks a free port)", "port to listen on (default 11112)"
    )
    allowed_calling_aets: tuple[str, ...] = option(
        (), _ae_list, "a list of AE titles", "comma-separated AE titles allowed to send (default: any)"
    )
    max_associations: int = option(16, _int_range(1, 1000), "an integer 1-1000")
    allowed_networks: tuple[str, ...] = option(
        (),
        _networks,
        "a list of networks such as 10.1.0.0/16 or 192.168.4.7",
        "comma-separated networks allowed to connect (default: any)",
    )
    max_instance_mb: int = option(
        2048, _int_range(1, 1024 * 1024), "an integer >= 1 (MiB)", "abort an association sending a larger instance"
    )
    tls_port: int = option(
        0, _int_range(0, 65535), "an integer 1-65535, or 0 for no TLS port", "also listen for DICOM TLS on this port"
    )
    tls_cert: Path | None = option(
        None, _existing_file, "the PEM certificate of this node, an existing file", "PEM certificate for the TLS port"
    )
    tls_key: Path | None = option(
        None, _existing_file, "the PEM private key of this node, an existing file", "PEM private key for the TLS port"
    )
    tls_ca: Path | None = option(
        None,
        _existing_file,
        "a PEM CA bundle; clients must then present a certificate it signed",
        "PEM CA bundle: require client certificates signed by it",
    )
    stow_port: int = option(
        0,
        _int_range(0, 65535),
        "an integer 1-65535, or 0 for no STOW-RS receiver",
        "also receive instances by DICOMweb STOW-RS (POST /studies) on this port (default 0: off)",
    )
    stow_tls: bool = option(
        False,
        _bool,
        "true or false (HTTPS with tls_cert and tls_key; tls_ca then requires client certificates)",
        "serve STOW-RS over HTTPS with tls_cert and tls_key",
        flag="bool",
    )
    stow_token_file: Path | None = option(
        None,
        _existing_file,
        "an existing file holding the bearer token STOW-RS clients must send",
        "file with the bearer token STOW-RS clients must present (default: none)",
    )


@dataclass(frozen=True)
class RunnerSettings:
    """The model package and the backend that runs it."""

    model: Path = option(
        DEFAULT_PACKAGE, _path, "a model package directory", "model package directory (default: the bundled CT model)"
    )
    backend: str = option(
        "onnxruntime", _choice(BACKENDS), f"one of {', '.join(BACKENDS)}", "inference backend (default onnxruntime)"
    )
    device: str = option("cpu", _choice(DEVICES), f"one of {', '.join(DEVICES)}", "cpu, cuda or tensorrt (default cpu)")
    threads: int = option(
        0, _int_range(0, 1024), "an integer >= 0 (0: one per core)", "inference threads (default: one per core)"
    )
    precision: str = option(
        "fp16",
        _choice(PRECISIONS),
        f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}",
        "engine precision for --backend tensorrt: fp32, fp16 (default) or int8",
    )
    rebuild_engine: bool = option(
        False,
        _bool,
        "true or false",
        "rebuild a TensorRT engine whose key (model, TensorRT, GPU, precision) does not match",
        flag="bool",
    )
    triton_url: str = option(
        "127.0.0.1:8001",
        _str,
        "host:port of a Triton gRPC endpoint",
        "Triton gRPC endpoint host:port for --backend triton",
    )
    triton_model: str | None = option(None, _str, "the model name in the Triton repository (default: the package name)")
    triton_shared_memory: bool = option(
        False,
        _bool,
        "true or false (system shared memory; client and server on one host)",
        "pass tensors through system shared memory (Triton on this host)",
        flag="bool",
    )
    fallback_backend: str | None = option(
        None,
        _choice(("onnxruntime",)),
        "onnxruntime (CPU), or unset to fail",
        "if the backend cannot start, run on onnxruntime CPU (logged loudly)",
    )


@dataclass(frozen=True)
class SeriesSettings:
    """When a series is complete, and how its slices become a volume."""

    quiet_seconds: float = option(
        5.0,
        _float_above(0, inclusive=False),
        "a number of seconds > 0",
        "a series is complete after this long without a new instance",
    )
    early_completion: bool = option(
        True,
        _bool,
        "true or false",
        "complete a series when its association is released and its stack is geometrically complete, "
        "before the quiet period (default true)",
        flag="bool",
    )
    study_quiet_seconds: float = option(
        60.0,
        _float_above(0, inclusive=False),
        "a number of seconds > 0",
        "a model of several input series: a study still without every channel's series after this long without "
        "a new instance is refused, naming the channel (default 60)",
    )
    release_grace_seconds: float = option(
        0.5,
        _float_above(0, inclusive=True),
        "a number of seconds >= 0",
        "after a release that leaves a complete stack, wait this long for the sender to come back (default 0.5)",
    )
    irregular_spacing: str = option(
        "resample",
        _choice(IRREGULAR_POLICIES),
        f"one of {', '.join(IRREGULAR_POLICIES)}",
        "resample or refuse unevenly spaced slices (default resample)",
    )
    decode_cache_mb: int = option(
        2048,
        _int_range(0, 1024 * 1024),
        "an integer >= 0 (MiB of slices decoded as they arrive; 0 turns it off)",
        "memory for slices decoded as they arrive (default 2048; 0 decodes at completion)",
    )
    out_of_domain: str = option(
        "refuse",
        _choice(OUT_OF_DOMAIN_POLICIES),
        f"one of {', '.join(OUT_OF_DOMAIN_POLICIES)}",
        "a series outside the model's declared domain: refuse it (default) or segment it and mark the result",
    )
    streaming: bool = option(
        True,
        _bool,
        "true or false",
        "segment a series slab by slab while it arrives, same result as whole-series (default true; needs "
        "decode_cache_mb > 0)",
        flag="bool",
    )


@dataclass(frozen=True)
class StorageSettings:
    """Where received instances and results live, and for how long."""

    spool: Path = option(
        Path("edge-runtime-data/spool"),
        _path,
        "a directory path",
        "spool directory (default ./edge-runtime-data/spool)",
    )
    output: Path = option(
        Path("edge-runtime-data/results"),
        _path,
        "a directory path",
        "results folder (default ./edge-runtime-data/results)",
    )
    min_free_mb: int = option(
        512, _int_range(0, 10**9), "an integer >= 0 (MiB)", "refuse instances (0xA700) below this much free spool space"
    )
    retention_hours: float = option(
        72.0,
        _float_above(0, inclusive=False),
        "a number of hours > 0",
        "delete spooled instances of finished series after this long (default 72)",
    )
    destination: tuple[Destination, ...] = option(
        (),
        _destinations,
        "AE@host:port, a compact destination (AE@host:port;formats=binary,sr or dicomweb+https://host/path;"
        "token-file=FILE;formats=labelmap,sr), or [[destination]] tables",
        "send results here; repeatable: AE@HOST:PORT (DIMSE) or dicomweb+https://HOST/PATH (STOW-RS), "
        "with ;formats=a,b;name=N;... (default: only the output folder)",
        flag="append",
        metavar="DESTINATION",
    )


@dataclass(frozen=True)
class OpsSettings:
    """Health, metrics, the status page and logging."""

    http_host: str = option(
        "127.0.0.1",
        _str,
        "an address for the health and metrics endpoint (default 127.0.0.1)",
        "address of the status page, /healthz, /readyz and /metrics (default 127.0.0.1)",
    )
    http_port: int = option(
        8190,
        _int_range(0, 65535),
        "an integer 1-65535, or 0 to disable the status page, /healthz and /metrics",
        "port of the status page, /healthz, /readyz and /metrics (default 8190; 0 disables)",
    )
    http_token_file: Path | None = option(
        None,
        _existing_file,
        "an existing file holding the access token (16 or more characters)",
        "file with the access token of the status page and /metrics (not /healthz, /readyz); "
        "or set EDGE_RUNTIME_HTTP_TOKEN (default: no token)",
    )
    log_level: str = option("info", _choice(LOG_LEVELS, fold=True), f"one of {', '.join(LOG_LEVELS)}")
    log_json: bool = option(False, _bool, "true or false", "one JSON object per log line", flag="switch")
    audit_log: Path | None = option(
        None,
        _path,
        "a file path (JSON lines, hash-chained)",
        "audit trail of associations, series, results and deliveries (default: audit.jsonl in the spool)",
    )
    audit_patient_data: bool = option(
        False,
        _bool,
        "true or false",
        "write Patient ID and Study/Series UIDs into the audit trail (default false: keyed hashes only)",
        flag="bool",
    )
    audit_syslog: SyslogTarget | None = option(
        None,
        lambda v: SyslogTarget.parse(_str(v)),
        "udp://HOST:PORT or tcp://HOST:PORT",
        "also send DICOM audit messages (PS3.15 A.5) to this syslog receiver (default: none)",
        metavar="URL",
    )
    drift_window: int = option(
        50,
        _int_range(5, 100000),
        "an integer >= 5",
        "series in the rolling window compared with the drift reference (default 50)",
    )
    drift_min_series: int = option(
        20,
        _int_range(1, 100000),
        "an integer >= 1",
        "series the drift window must hold before it may warn (default 20)",
    )


_SECTIONS: dict[str, type] = {
    "listener": ListenerSettings,
    "runner": RunnerSettings,
    "series": SeriesSettings,
    "storage": StorageSettings,
    "ops": OpsSettings,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration, one section per part of the service.

    ``config.port`` reads a key wherever its section keeps it (here ``config.listener.port``), as TOML and the
    command line name it.
    """

    listener: ListenerSettings = field(default_factory=ListenerSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)

    def __getattr__(self, key: str) -> Any:
        section = _KEY_SECTION.get(key)
        if section is None:
            raise AttributeError(f"{type(self).__name__} has no key {key!r}")
        return getattr(object.__getattribute__(self, section), key)


def _keys() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """(section name, field) for every key, in declaration order."""
    for name, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield name, f


_KEY_SECTION = {f.name: section for section, f in _keys()}


def load_toml(path: Path) -> dict[str, Any]:
    """The keys of a TOML file (``ae-title`` and ``ae_title`` alike)."""
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
    problems = [
        f"unknown key {key!r}; allowed keys: {', '.join(sorted(_KEY_SECTION))}"
        for key in sorted(set(values) - set(_KEY_SECTION))
    ]
    typed: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for section, f in _keys():
        value = values.get(f.name)
        if value is None:
            continue
        try:
            typed[section][f.name] = f.metadata["check"](value)
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            problems.append(f"{f.name} = {value!r} is not allowed: {f.metadata['allowed']}{detail}")
    listener = typed["listener"]
    if listener.get("tls_port") and not (listener.get("tls_cert") and listener.get("tls_key")):
        problems.append("tls_port is set: tls_cert and tls_key are required")
    if listener.get("stow_tls") and not (listener.get("tls_cert") and listener.get("tls_key")):
        problems.append("stow_tls is true: tls_cert and tls_key are required")
    if problems:
        raise ConfigError(problems)
    return Config(**{name: _SECTIONS[name](**kwargs) for name, kwargs in typed.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per key, grouped by section, with its help; plus ``--config FILE``."""
    parser.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    groups = {name: parser.add_argument_group(name, (cls.__doc__ or "").strip()) for name, cls in _SECTIONS.items()}
    for section, f in _keys():
        flag, meta, group = f.metadata["flag"], f.metadata, groups[section]
        name = "--" + f.name.replace("_", "-")
        # numbers are parsed as numbers, so an error message shows the value as it was meant (port = 99999)
        convert: Callable[[str], Any] = type(f.default) if type(f.default) in (int, float) else str
        if flag == "bool":
            group.add_argument(name, choices=("true", "false"), help=meta["help"])
        elif flag == "switch":
            group.add_argument(name, action="store_const", const=True, help=meta["help"])
        elif flag == "append":
            group.add_argument(name, action="append", metavar=meta["metavar"], help=meta["help"])
        else:
            group.add_argument(name, type=convert, metavar=meta["metavar"], help=meta["help"])


def config_from_args(args: argparse.Namespace) -> Config:
    """The TOML file named by ``--config``, overridden by the options given on the command line."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for key in _KEY_SECTION:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return build_config(values)
