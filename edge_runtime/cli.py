"""``edge-runtime``: the service and its companions.

serve   run the DICOM listener daemon (Ctrl-C / SIGTERM stops it cleanly)
push    send a folder of DICOM files to a DICOM node (for demos and tests)
status  list the series in a spool and what became of them
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime.apps.validate import add_parser as add_validate_parser
from edge_runtime.apps.validate import cmd_validate
from edge_runtime.config import Config, ConfigError, build_config, load_toml

log = logging.getLogger("edge_runtime")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


class RedactUids(logging.Filter):
    """Last line of defence for third-party messages: anything shaped like a DICOM UID is masked."""

    _uid = re.compile(r"(?<![\w.])[0-2](\.(0|[1-9][0-9]*)){4,}(?![\w.])")  # 5+ parts: not an IPv4 address

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self._uid.sub("<uid>", message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactUids())
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs data set contents at debug level, pydicom quotes element values in its warnings:
    # route Python warnings through logging and keep the libraries' chatter out of the log.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for noisy, floor in (
        ("pynetdicom", logging.WARNING),
        ("pydicom", logging.ERROR),
        # each decoder plugin that fails logs its traceback at ERROR; the caller reports the failure once, as a
        # refusal with its reason (undecodable-pixels), so these would only repeat it
        ("pydicom.pixels", logging.CRITICAL),
        ("highdicom", logging.WARNING),
    ):
        logging.getLogger(noisy).setLevel(floor)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    p.add_argument("--port", type=int, help="port to listen on (default 11112)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--ae-title", help="our AE title; senders must call it (default EDGE)")
    p.add_argument(
        "--destination",
        action="append",
        metavar="AE@HOST:PORT",
        help="send results here; repeatable (default: only the output folder)",
    )
    p.add_argument("--spool", type=Path, help="spool directory (default ./edge-runtime-data/spool)")
    p.add_argument("--output", type=Path, help="results folder (default ./edge-runtime-data/results)")
    p.add_argument("--model", type=Path, help="model package directory (default: the bundled CT model)")
    p.add_argument("--backend", help="inference backend (default onnxruntime)")
    p.add_argument("--device", help="cpu, cuda or tensorrt (default cpu)")
    p.add_argument("--threads", type=int, help="inference threads (default: one per core)")
    p.add_argument("--precision", help="engine precision for --backend tensorrt: fp32, fp16 (default) or int8")
    p.add_argument(
        "--rebuild-engine",
        choices=("true", "false"),
        help="rebuild a TensorRT engine whose key (model, TensorRT, GPU, precision) does not match",
    )
    p.add_argument("--triton-url", help="Triton gRPC endpoint host:port for --backend triton")
    p.add_argument("--triton-model", help="model name in the Triton repository (default: the package name)")
    p.add_argument(
        "--triton-shared-memory",
        choices=("true", "false"),
        help="pass tensors through system shared memory (Triton on this host)",
    )
    p.add_argument("--fallback-backend", help="if the backend cannot start, run on onnxruntime CPU (logged loudly)")
    p.add_argument("--quiet-seconds", type=float, help="a series is complete after this long without a new instance")
    p.add_argument(
        "--early-completion",
        choices=("true", "false"),
        help="complete a series when its association is released and its stack is geometrically "
        "complete, before the quiet period (default true)",
    )
    p.add_argument(
        "--release-grace-seconds",
        type=float,
        help="after a release that leaves a complete stack, wait this long for the sender to come back (default 0.5)",
    )
    p.add_argument("--allowed-calling-aets", help="comma-separated AE titles allowed to send (default: any)")
    p.add_argument("--max-associations", type=int)
    p.add_argument("--allowed-networks", help="comma-separated networks allowed to connect (default: any)")
    p.add_argument("--max-instance-mb", type=int, help="abort an association sending a larger instance")
    p.add_argument("--tls-port", type=int, help="also listen for DICOM TLS on this port")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate for the TLS port")
    p.add_argument("--tls-key", type=Path, help="PEM private key for the TLS port")
    p.add_argument("--tls-ca", type=Path, help="PEM CA bundle: require client certificates signed by it")
    p.add_argument("--irregular-spacing", help="resample or refuse unevenly spaced slices (default resample)")
    p.add_argument(
        "--decode-cache-mb",
        type=int,
        help="memory for slices decoded as they arrive (default 2048; 0 decodes at completion)",
    )
    p.add_argument(
        "--retention-hours",
        type=float,
        help="delete spooled instances of finished series after this long (default 72)",
    )
    p.add_argument("--min-free-mb", type=int, help="refuse instances (0xA700) below this much free spool space")
    p.add_argument("--http-host", help="address of /healthz, /readyz and /metrics (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="port of /healthz, /readyz and /metrics (default 8190; 0 disables)")
    p.add_argument("--log-level")
    p.add_argument("--log-json", action="store_const", const=True, help="one JSON object per log line")


def config_from_args(args: argparse.Namespace) -> Config:
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for key in (
        "port",
        "host",
        "ae_title",
        "destination",
        "spool",
        "output",
        "model",
        "backend",
        "device",
        "threads",
        "precision",
        "rebuild_engine",
        "triton_url",
        "triton_model",
        "triton_shared_memory",
        "fallback_backend",
        "quiet_seconds",
        "early_completion",
        "release_grace_seconds",
        "allowed_calling_aets",
        "max_associations",
        "allowed_networks",
        "max_instance_mb",
        "tls_port",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "irregular_spacing",
        "decode_cache_mb",
        "min_free_mb",
        "retention_hours",
        "http_host",
        "http_port",
        "log_level",
        "log_json",
    ):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    return build_config(values)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_json)
    from edge_runtime.inference.package import PackageError
    from edge_runtime.inference.runner import RunnerError
    from edge_runtime.service import Service

    try:
        service = Service(config)
    except (PackageError, RunnerError, ImportError) as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-runtime: cannot start: {exc}", file=sys.stderr)
        return 2
    service.run_forever()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from edge_runtime.apps.push import push_folder
    from edge_runtime.egress.sender import Destination

    setup_logging("info", False)
    try:
        dest = Destination.parse(args.destination)
    except ValueError as exc:
        print(f"edge-runtime push: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = push_folder(args.folder, dest, calling_ae=args.calling_ae)
    dt = time.perf_counter() - t0
    print(f"{report.sent} sent, {report.failed} failed, {report.skipped} skipped (not DICOM) in {dt:.2f} s")
    for line in report.failures[:20]:
        print(f"  {line}")
    return 0 if report.failed == 0 and report.sent > 0 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from edge_runtime.spool.store import Spool

    spool = Spool(args.spool, min_free_bytes=0)
    rows = spool.all_series()
    print(f"{'series':<14}{'state':<12}{'instances':>10}  reason")
    for r in rows:
        print(f"{r.key_hash:<14}{r.state.value:<12}{r.instance_count:>10}  {r.reason or ''}")
    counts = spool.outbox_counts()
    print(f"outbox: {counts.get('pending', 0)} pending, {counts.get('sent', 0)} sent")
    spool.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Edge inference runtime for medical imaging")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the DICOM listener daemon")
    _serve_args(serve)
    push = sub.add_parser("push", help="send a folder of DICOM files to a node")
    push.add_argument("folder", type=Path)
    push.add_argument("destination", metavar="AE@HOST:PORT")
    push.add_argument("--calling-ae", default="PUSH")
    status = sub.add_parser("status", help="list the series in a spool")
    status.add_argument("--spool", type=Path, default=Config().spool)
    add_validate_parser(sub)
    args = parser.parse_args(argv)
    return {"serve": cmd_serve, "push": cmd_push, "status": cmd_status, "validate": cmd_validate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
