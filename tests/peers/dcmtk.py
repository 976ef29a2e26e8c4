"""DCMTK as the scanner (``storescu``) and as the PACS (``storescp``), and dicom3tools' ``dciodvfy`` as judge."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pydicom

from edge_runtime.dicom import SegmentationStorage
from tests.peers.base import dcmtk_env, free_port, require_tool, stop_process, wait_port

# -- DCMTK as the scanner and as the PACS ------------------------------------------------------------------


def storescu(
    port: int,
    paths: list[Path],
    ae_title: str = "EDGE",
    extra: list[str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """DCMTK storescu as calling AE ``SCANNER``: every file in one association, at full speed."""
    cmd = [
        require_tool("storescu"),
        "-aec",
        ae_title,
        "-aet",
        "SCANNER",
        *(extra or []),
        "127.0.0.1",
        str(port),
        *map(str, paths),
    ]
    return subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check)


class StoreSCP:
    """DCMTK storescp as the PACS: every received object lands in ``folder``.

    ``fork``: one child per association (concurrent senders); ``options``: more storescp options (``+uf``:
    a file per received object, so a second delivery is seen); ``log``: storescp's output (else discarded).
    It runs in a process group of its own, so :meth:`stop` ends its forked children with it.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "PACS",
        port: int | None = None,
        *,
        fork: bool = True,
        options: tuple[str, ...] = (),
        log: Path | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [require_tool("storescp"), *options, "-od", str(folder), "-aet", ae_title]
        cmd += ["--fork"] if fork else []
        out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [*cmd, str(self.port)], env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]  # the child has its own descriptor
        wait_port(self.port, 30, self.proc)

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self, sop_class: str) -> dict[str, list[Path]]:
        """Files of one SOP class received so far, by the source SeriesInstanceUID they reference."""
        found: dict[str, list[Path]] = {}
        for f in sorted(self.folder.iterdir()):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                if ds.get("SOPClassUID") != sop_class:
                    continue
                refs = referenced_series(ds)
            except Exception:
                continue  # storescp may still be writing it
            for ref in refs:
                found.setdefault(ref, []).append(f)
        return found

    def segs(self) -> dict[str, list[Path]]:
        return self.received(SegmentationStorage)

    def wait_for(self, sop_class: str, series_uid: str, timeout: float = 120.0) -> Path:
        """The first object of ``sop_class`` for the series, once storescp has written all of it."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.received(sop_class).get(series_uid)
            if got and _written(got[0]):
                return got[0]
            time.sleep(0.2)
        raise TimeoutError(f"no {sop_class} object for the series after {timeout} s")

    def wait_for_seg(self, series_uid: str, timeout: float = 120.0) -> Path:
        return self.wait_for(SegmentationStorage, series_uid, timeout)

    def stop(self) -> None:
        stop_process(self.proc, 10, group=True)


def _written(path: Path, settle: float = 0.3) -> bool:
    """Whether storescp has finished ``path``: its size holds still for ``settle`` seconds, the whole file parses,
    and an image's native pixel data are as long as its size says (pydicom reads a truncated file without
    complaint, as far as it goes, so a header can look complete while the rest is still arriving)."""
    try:
        size = path.stat().st_size
        time.sleep(settle)
        if path.stat().st_size != size:
            return False
        ds = pydicom.dcmread(path)
        if not _has_pixels(ds.SOPClassUID):
            return True
        if "PixelData" not in ds:
            return False
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return len(ds.PixelData) > 0
        samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.SamplesPerPixel)
        return len(ds.PixelData) >= -(-samples * int(ds.BitsAllocated) // 8)
    except Exception:
        return False


def _has_pixels(sop_class: pydicom.uid.UID) -> bool:
    """Whether objects of ``sop_class`` carry pixel data (the classes without that these tests meet are named)."""
    return not any(w in sop_class.name for w in (" SR ", "Key Object", "Structure Set", "Real World Value Mapping"))


def referenced_series(ds: pydicom.Dataset) -> list[str]:
    """The source series a result references: a SEG's ReferencedSeriesSequence, else an SR's evidence
    (which names the source series and the SEG's)."""
    if "ReferencedSeriesSequence" in ds:
        return [str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)]
    return sorted(
        str(s.SeriesInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    )


def wait_for_measurements(output: Path, seg: Path, timeout: float = 60.0) -> list[Path]:
    """The ``measurements.json`` files in a service's output folder that describe ``seg`` (a SEG received by a
    PACS), once there is one: the SEG leaves before the rest of its result is written (SEG first)."""
    uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    end = time.monotonic() + timeout
    while True:
        found = []
        for path in output.glob("*/measurements.json"):
            try:
                if json.loads(path.read_text()).get("seg_sop_instance_uid") == uid:
                    found.append(path)
            except (OSError, ValueError):
                continue
        if found or time.monotonic() >= end:
            return found
        time.sleep(0.1)


def wait_for_seg(folder: Path, seen: set[str], series_uid: str, timeout: float) -> tuple[Path, float, float]:
    """Poll a storescp folder for a new SEG that references ``series_uid``, opening only new files.

    Returns (path, first seen epoch, mtime epoch): the mtime is when storescp finished writing the file.
    DCMTK names files ``<modality prefix>.<SOP Instance UID>`` ("SG." for Segmentation Storage, "SR3." for
    Comprehensive 3D SR), so the poll is a directory listing; files that are not a SEG of this series are
    remembered in ``seen`` and never opened again.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for entry in os.scandir(folder):
            if entry.name in seen or entry.name.startswith(("SR", ".")):
                continue
            first_seen = time.time()
            size = -1
            while True:  # storescp may still be writing it
                st = os.stat(entry.path)
                if st.st_size == size and time.time() - st.st_mtime > 0.05:
                    break
                size = st.st_size
                time.sleep(0.01)
            try:
                ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
                sop_class = str(ds.SOPClassUID)
                ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) if sop_class == SegmentationStorage else ""
            except Exception:
                continue  # still being written (storescp paused longer than the stability window): look again
            seen.add(entry.name)
            if ref == series_uid:
                return Path(entry.path), first_seen, os.stat(entry.path).st_mtime
        time.sleep(0.01)
    raise TimeoutError(f"no SEG for the series at storescp after {timeout:.0f} s")
