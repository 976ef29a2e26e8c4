"""``edge-runtime audit verify [PATH]``: check the hash chain of an audit log (see :mod:`edge_runtime.ops.audit`).

Exit status 0 when every line holds (the head hash is printed, to be noted elsewhere: a chain cannot show that
its newest lines were cut off), 1 naming the first line that does not, 2 when the log cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edge_runtime.config import StorageSettings
from edge_runtime.ops.audit import verify

#: where ``serve`` keeps its audit log unless ``audit_log`` says otherwise
DEFAULT_AUDIT_LOG = StorageSettings().spool / "audit.jsonl"


def add_parser(subparsers: Any) -> None:
    """Add ``audit`` (with its one action, ``verify``) to ``edge-runtime``'s subparsers."""
    p = subparsers.add_parser("audit", help="check the audit trail", description="Check the audit trail.")
    actions = p.add_subparsers(dest="action", required=True)
    v = actions.add_parser("verify", help="check the hash chain of an audit log")
    v.add_argument("path", type=Path, nargs="?", default=DEFAULT_AUDIT_LOG, help=f"default {DEFAULT_AUDIT_LOG}")


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        result = verify(args.path)
    except OSError as exc:
        print(f"edge-runtime audit: cannot read {args.path}: {exc.strerror}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"{args.path}: line {result.bad_line}: {result.reason}; the {result.lines} line(s) before it hold")
        return 1
    print(f"{args.path}: {result.lines} line(s), chain intact; head {result.head}")
    return 0
