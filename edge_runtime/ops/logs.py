"""Logging for the daemon and its commands: one line (or one JSON object) per record, patient data kept out.

Modules log through ``logging.getLogger(__name__)`` like a library; only the entry point
(:func:`edge_runtime.cli.main`) installs handlers, with :func:`setup_logging`.
"""

from __future__ import annotations

import json
import logging
import re
import sys


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
