"""Push a folder of DICOM files to a DICOM node (C-STORE SCU), one association, each file as it is.

The association and the C-STORE requests are the sender's (:class:`edge_runtime.egress.sender.StoreSCU`); what
push adds is the folder walk, a presentation context per (SOP Class, transfer syntax) found, and a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from edge_runtime.egress.destination import DimseNode
from edge_runtime.egress.sender import StoreSCU

#: the most presentation contexts one association may propose (PS3.8 9.3.2.2: odd context IDs 1-255)
MAX_CONTEXTS = 128


@dataclass
class PushReport:
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)


def push_folder(folder: Path, dest: DimseNode, *, calling_ae: str = "PUSH", timeout: float = 30.0) -> PushReport:
    """Send every DICOM file below ``folder`` to ``dest``, each in its own transfer syntax; files that are not
    DICOM are skipped and counted. Every file is tried, whatever became of the one before."""
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
    contexts = [(sop_class, [syntax]) for sop_class, syntax in sorted({(c, t) for _, c, t in files})]
    with StoreSCU.open(dest, calling_ae=calling_ae, contexts=contexts[:MAX_CONTEXTS], timeout=timeout) as scu:
        if not scu.established:
            report.failed = len(files)
            report.failures.append(f"association with {dest} not established")
            return report
        for path, sop_class, _ in files:
            if not scu.accepts(sop_class):
                report.failed += 1
                report.failures.append(f"{path.name}: SOP class {sop_class} not accepted by {dest}")
                continue
            result = scu.store(path)
            if result.success:
                report.sent += 1
                continue
            report.failed += 1
            if result.error is not None:
                report.failures.append(f"{path.name}: {result.error}")
            else:
                code = result.status
                report.failures.append(f"{path.name}: " + ("no response" if code is None else f"status 0x{code:04X}"))
    return report
