"""``edge-runtime``: the service and its companions.

serve     run the DICOM listener daemon (Ctrl-C / SIGTERM stops it cleanly)
push      send a folder of DICOM files to a DICOM node (for demos and tests)
status    list the series in a spool and what became of them
validate  segment cases with references offline and report agreement
audit     check the hash chain of the audit trail (``audit verify [PATH]``)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.apps.audit import add_parser as add_audit_parser
from edge_runtime.apps.audit import cmd_audit
from edge_runtime.apps.validate import add_parser as add_validate_parser
from edge_runtime.apps.validate import cmd_validate
from edge_runtime.config import StorageSettings, add_arguments, config_from_args
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.ops.logs import JsonFormatter, RedactUids, setup_logging
from edge_runtime.ops.systemd import termination_requested

__all__ = ["JsonFormatter", "RedactUids", "main", "setup_logging"]

log = logging.getLogger("edge_runtime")


def cmd_serve(args: argparse.Namespace) -> int:
    """Build the configuration, start the service and block until SIGTERM; 2 when it cannot start."""
    stop = termination_requested()
    try:
        config = config_from_args(args)
        setup_logging(config.ops.log_level, config.ops.log_json)
        from edge_runtime.service import Service

        service = Service(config)
        service.start()
    except EdgeRuntimeError as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine refused: a port in use, a folder we may not write
        print(f"edge-runtime: cannot start: {exc}", file=sys.stderr)
        return 2
    while not stop.wait(1.0):
        pass
    service.stop()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from edge_runtime.apps.push import push_folder
    from edge_runtime.egress.destination import DimseNode

    setup_logging("info", False)
    try:
        dest = DimseNode.parse(args.destination)
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
    from edge_runtime.apps.status import print_status

    return print_status(args.spool)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Edge inference runtime for medical imaging")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("serve", help="run the DICOM listener daemon"))
    push = sub.add_parser("push", help="send a folder of DICOM files to a node")
    push.add_argument("folder", type=Path)
    push.add_argument("destination", metavar="AE@HOST:PORT")
    push.add_argument("--calling-ae", default="PUSH")
    status = sub.add_parser("status", help="list the series in a spool")
    status.add_argument("--spool", type=Path, default=StorageSettings().spool)
    add_validate_parser(sub)
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    commands = {"serve": cmd_serve, "push": cmd_push, "status": cmd_status, "validate": cmd_validate}
    commands["audit"] = cmd_audit
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
