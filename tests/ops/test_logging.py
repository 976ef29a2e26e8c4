"""Logs are structured on request and never carry UIDs, even when a library quotes them."""

from __future__ import annotations

import json
import logging

import pytest

from edge_runtime.cli import setup_logging


@pytest.fixture
def restore_logging():  # noqa: ANN201
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_and_uids_masked(restore_logging, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    setup_logging("info", as_json=True)
    logging.getLogger("pynetdicom.acse").warning("association for 1.2.840.113619.2.55.3.604688119 refused")
    logging.getLogger("edge_runtime.service").info("series %s segmented", "3f9a0c1d2e4b")
    logging.getLogger("edge_runtime.ingest.listener").info("listening on 127.0.0.1:11112")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "association for <uid> refused" and lines[0]["level"] == "warning"
    assert lines[1]["msg"] == "series 3f9a0c1d2e4b segmented" and lines[1]["logger"] == "edge_runtime.service"
    assert lines[2]["msg"] == "listening on 127.0.0.1:11112", "an IPv4 address is not a UID"


def test_library_chatter_that_quotes_values_stays_out(
    restore_logging, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: ANN001
    setup_logging("debug", as_json=False)
    logging.getLogger("pydicom").warning("Invalid value for VR PN: 'DOE^JANE'")
    logging.getLogger("pynetdicom.dsutils").debug("(0010,0010) PN [DOE^JANE]")
    assert "DOE^JANE" not in capsys.readouterr().err
