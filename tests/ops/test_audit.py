"""The audit trail's hash chain: intact logs verify, and the first edited, removed or reordered line is named."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.ops.audit import AuditLog, canonical, verify


def _write_log(path: Path, n: int = 6) -> None:
    audit = AuditLog(path)
    audit.start({"ae_title": "EDGE", "port": 11112}, version="test")
    for i in range(n - 1):
        audit.record("association", calling_ae=f"CT{i}", peer="127.0.0.1:4000", outcome="accepted")
    audit.close()


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies_and_the_command_says_so(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    result = verify(path)
    assert result.ok and result.lines == 6
    done = subprocess.run(
        [sys.executable, "-m", "edge_runtime", "audit", "verify", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 line(s), chain intact" in done.stdout and result.head in done.stdout


def test_a_restart_continues_the_chain_and_names_changed_keys(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, n=3)
    audit = AuditLog(path)
    audit.start({"ae_title": "EDGE", "port": 104}, version="test")
    audit.close()
    assert verify(path).ok and verify(path).lines == 4
    last = json.loads(_lines(path)[-1])
    assert last["seq"] == 3 and last["changed"] == ["port"]
    assert json.loads(_lines(path)[0])["changed"] is None, "the first start has nothing to compare with"


def test_an_edited_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[3] = lines[3].replace(b'"CT2"', b'"EVIL"')
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert result.bad_line == 4 and "edited" in result.reason and result.lines == 3
    assert main(["audit", "verify", str(path)]) == 1
    assert "line 4:" in capsys.readouterr().out


def test_an_edit_with_its_hash_recomputed_breaks_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    record = json.loads(lines[2])
    record["outcome"] = "rejected"
    record.pop("hash")
    record["hash"] = hashlib.sha256(canonical(record)).hexdigest()
    lines[2] = canonical(record) + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify(path)
    assert result.bad_line == 4 and "line 3" in result.reason


@pytest.mark.parametrize(
    ("change", "bad_line"),
    [
        (lambda lines: lines[:2] + lines[3:], 3),  # a line removed
        (lambda lines: lines[1:], 1),  # the first line removed: the anchor catches it
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2),  # two lines swapped
    ],
    ids=["removed", "first-removed", "reordered"],
)
def test_removed_and_reordered_lines_are_named(tmp_path: Path, change, bad_line: int) -> None:  # noqa: ANN001
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    path.write_bytes(b"".join(change(_lines(path))))
    assert verify(path).bad_line == bad_line


def test_patient_identifiers_only_where_enabled(tmp_path: Path) -> None:
    for allowed in (False, True):
        path = tmp_path / f"audit-{allowed}.jsonl"
        audit = AuditLog(path, patient_data=allowed)
        audit.record("series", series="3f9a0c1d2e4b", instances=3, phi={"patient_id": "PAT-0042"})
        audit.close()
        assert (b"PAT-0042" in path.read_bytes()) is allowed
        assert verify(path).ok


def test_missing_log_is_exit_2(tmp_path: Path) -> None:
    assert main(["audit", "verify", str(tmp_path / "none.jsonl")]) == 2
