"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE of the image types the model can use.

The C-STORE handler only checks, persists and returns a status; all other work happens elsewhere. Success
(0x0000) is returned only once the instance is durable in the spool and indexed. Statuses (PS3.4 B.2.3):

======  ==========================================================================
0x0000  stored durably (or already stored: a re-sent SOP Instance UID)
0xA700  refused, out of resources: spool below its free-space watermark, or a write failed
0xA900  the data set's SOP Class/Instance UID differ from the command's
0xC210  cannot understand: the data set does not parse
0xC220  cannot understand: Study, Series or SOP Instance UID missing
0xC221  cannot understand: a UID is not a valid DICOM UID
======  ==========================================================================

SOP classes the model cannot use are rejected at association negotiation, so a sender learns at once.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from .spool import Spool, SpoolFull
from .volume import SliceGeometry

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_MISSING_ATTRIBUTE = 0xC220
STATUS_INVALID_UID = 0xC221

STORAGE_CLASSES = {
    "CT": (
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    ),
    "MR": (
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    ),
}
VERIFICATION = "1.2.840.10008.1.1"

#: uncompressed syntaxes first: pynetdicom accepts the first of ours that the requestor proposed
NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
)
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


def decodable_syntaxes() -> list[str]:
    """Native syntaxes, then the compressed ones for which pydicom has a working decoder installed."""
    from pydicom.pixels import get_decoder

    syntaxes = list(NATIVE_SYNTAXES)
    for uid in COMPRESSED_SYNTAXES:
        try:
            if get_decoder(UID(uid)).is_available:
                syntaxes.append(uid)
        except NotImplementedError:
            continue
    return syntaxes


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str
    host: str
    port: int
    modalities: tuple[str, ...]
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    #: seconds a connection may stay silent (also bounds a peer that stops mid-PDU)
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    maximum_pdu_size: int = 131072


class TimeoutAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, but accepted sockets get a timeout, so a silent peer cannot hold a slot forever."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        client.settimeout(self.ae.network_timeout)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


class Listener:
    """Owns the pynetdicom server; stores through ``spool`` and calls ``on_stored(series_id)`` after each store."""

    def __init__(
        self,
        config: ListenerConfig,
        spool: Spool,
        on_stored: Callable[[int], None] | None = None,
        on_released: Callable[[set[int]], None] | None = None,
        on_status: Callable[[int], None] | None = None,
    ):
        self.config = config
        self.spool = spool
        self.on_stored = on_stored
        self.on_released = on_released
        self.on_status = on_status
        #: series that received new instances, per association still open
        self._touched: dict[int, set[int]] = {}
        self._touched_lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.network_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.maximum_pdu_size = cfg.maximum_pdu_size
        ae.require_called_aet = True
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
        syntaxes = decodable_syntaxes()
        for modality in cfg.modalities:
            for sop_class in STORAGE_CLASSES.get(modality, ()):
                ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self.server = self.ae.make_server(
            (self.config.host, self.config.port), evt_handlers=handlers, server_class=TimeoutAssociationServer
        )
        # make_server() does not register the server with its AE, yet shutdown() expects it there.
        self.ae._servers.append(self.server)
        self._thread = threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True)
        self._thread.start()
        log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.server.server_address[1])

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop accepting; associations in progress are aborted by pynetdicom's shutdown."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _on_store(self, event: evt.Event) -> int:
        status = self._store(event)
        if self.on_status is not None:
            self.on_status(status)
        return status

    def _store(self, event: evt.Event) -> int:
        t0 = time.perf_counter()
        request = event.request
        try:
            ds = event.dataset
            sop_class = ds.get("SOPClassUID")
            sop_uid = ds.get("SOPInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
            series_uid = ds.get("SeriesInstanceUID")
            modality = str(ds.get("Modality", "") or "")
            geometry = SliceGeometry.from_dataset(ds)
        except Exception as exc:  # pydicom raises many types on malformed input
            log.warning("C-STORE refused (0x%04X): data set does not parse: %s", STATUS_CANNOT_PARSE,
                        type(exc).__name__)
            return STATUS_CANNOT_PARSE
        if not all((sop_class, sop_uid, study_uid, series_uid)):
            log.warning("C-STORE refused (0x%04X): SOP Class, SOP Instance, Study or Series UID missing",
                        STATUS_MISSING_ATTRIBUTE)
            return STATUS_MISSING_ATTRIBUTE
        if not all(valid_uid(str(u)) for u in (sop_class, sop_uid, study_uid, series_uid)):
            log.warning("C-STORE refused (0x%04X): a UID in the data set is not a valid DICOM UID", STATUS_INVALID_UID)
            return STATUS_INVALID_UID
        if str(sop_class) != str(request.AffectedSOPClassUID) or str(sop_uid) != str(request.AffectedSOPInstanceUID):
            log.warning("C-STORE refused (0x%04X): data set UIDs differ from the command's", STATUS_DATASET_MISMATCH)
            return STATUS_DATASET_MISMATCH
        called = event.assoc.acceptor.ae_title.strip()
        calling = event.assoc.requestor.ae_title.strip()
        try:
            stored = self.spool.store(
                event.encoded_dataset(),
                called_ae=called,
                calling_ae=calling,
                study_uid=str(study_uid),
                series_uid=str(series_uid),
                sop_uid=str(sop_uid),
                sop_class=str(sop_class),
                transfer_syntax=str(event.context.transfer_syntax),
                modality=modality,
                geometry=geometry.to_json() if geometry is not None else None,
            )
        except SpoolFull as exc:
            log.error("C-STORE refused (0x%04X): %s", STATUS_OUT_OF_RESOURCES, exc)
            return STATUS_OUT_OF_RESOURCES
        except OSError as exc:
            log.error("C-STORE refused (0x%04X): spool write failed: %s", STATUS_OUT_OF_RESOURCES, exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        log.debug(
            "stored instance of series %s from %s%s in %.1f ms", stored.key_hash, calling,
            " (duplicate)" if stored.duplicate else "", 1000 * (time.perf_counter() - t0),
        )
        if not stored.duplicate:
            with self._touched_lock:
                self._touched.setdefault(id(event.assoc), set()).add(stored.series_id)
            if self.on_stored is not None:
                self.on_stored(stored.series_id)
        return STATUS_SUCCESS

    def _on_released(self, event: evt.Event) -> None:
        """A sender that releases properly has said: that is all I have for now (evidence, not proof)."""
        with self._touched_lock:
            series = self._touched.pop(id(event.assoc), set())
        if series and self.on_released is not None:
            self.on_released(series)

    def _on_aborted(self, event: evt.Event) -> None:
        with self._touched_lock:
            self._touched.pop(id(event.assoc), None)
