"""Push a folder of DICOM files to a DICOM node (C-STORE SCU), one association, each file as it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from edge_runtime.dicom import is_success
from edge_runtime.egress.sender import Destination


@dataclass
class PushReport:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)


def push_folder(folder: Path, dest: Destination, *, calling_ae: str = "PUSH", timeout: float = 30.0) -> PushReport:
    report = PushReport()
    files: list[tuple[Path, str, str]] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files.append((path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            report.skipped += 1
    if not files:
        return report
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    contexts = sorted({(c, t) for _, c, t in files})
    for sop_class, syntax in contexts[:128]:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        report.failed = len(files)
        report.failures.append(f"association with {dest} not established")
        return report
    try:
        for path, _, _ in files:
            try:
                status = assoc.send_c_store(str(path))
            except (ValueError, RuntimeError, OSError) as exc:
                report.failed += 1
                report.failures.append(f"{path.name}: {exc}")
                continue
            code = getattr(status, "Status", None)
            if is_success(code):
                report.sent += 1
            else:
                report.failed += 1
                report.failures.append(f"{path.name}: " + ("no response" if code is None else f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return report
