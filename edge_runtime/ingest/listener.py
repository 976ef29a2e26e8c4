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

import ipaddress
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from edge_runtime.dicom import (
    COMPRESSED_SYNTAXES,
    IMAGE_STORAGE,
    NATIVE_SYNTAXES,
    SEGMENTATION_CLASSES,
    STATUS_CANNOT_PARSE,
    STATUS_DATASET_MISMATCH,
    STATUS_INVALID_UID,
    STATUS_MISSING_ATTRIBUTE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    VERIFICATION,
)
from edge_runtime.imaging.geometry import SliceGeometry
from edge_runtime.ingest.guard import ConnectionGuard, GuardedAssociationServer, tls_context
from edge_runtime.ingest.part10 import received_parts
from edge_runtime.spool import Spool, SpoolFull, StoredInstance

if TYPE_CHECKING:
    from edge_runtime.config import ListenerSettings

log = logging.getLogger(__name__)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str


@dataclass(frozen=True)
class InstanceInfo:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    geometry: SliceGeometry | None


def inspect_dataset(ds: Dataset, affected_class: str, affected_instance: str) -> InstanceInfo | Refusal:
    """What the listener needs of a received data set, or the status that refuses it. Never raises."""
    try:
        sop_class = ds.get("SOPClassUID")
        sop_uid = ds.get("SOPInstanceUID")
        study_uid = ds.get("StudyInstanceUID")
        series_uid = ds.get("SeriesInstanceUID")
        modality = str(ds.get("Modality", "") or "")
        geometry = SliceGeometry.from_dataset(ds)
        uids = [str(u) if u is not None else "" for u in (sop_class, sop_uid, study_uid, series_uid)]
    except Exception as exc:  # pydicom parses lazily: a malformed element surfaces here
        return Refusal(STATUS_CANNOT_PARSE, f"data set does not parse: {type(exc).__name__}")
    if not all(uids):
        return Refusal(STATUS_MISSING_ATTRIBUTE, "SOP Class, SOP Instance, Study or Series UID missing")
    if not all(valid_uid(u) for u in uids):
        return Refusal(STATUS_INVALID_UID, "a UID in the data set is not a valid DICOM UID")
    if uids[0] != affected_class or uids[1] != affected_instance:
        return Refusal(STATUS_DATASET_MISMATCH, "data set UIDs differ from the command's")
    return InstanceInfo(uids[0], uids[1], uids[2], uids[3], modality, geometry)


def decodable_syntaxes() -> list[str]:
    """Native syntaxes, then the compressed ones for which pydicom has a working decoder installed."""
    from pydicom.pixels import get_decoder

    syntaxes: list[str] = list(NATIVE_SYNTAXES)
    for uid in COMPRESSED_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(uid)
        except NotImplementedError:
            continue
    return syntaxes


@dataclass(frozen=True)
class ListenerConfig:
    """What the listener runs with: the ``[listener]`` settings in the units pynetdicom and the socket layer use,
    plus what the model package decides (the modalities it accepts)."""

    ae_title: str
    host: str
    port: int
    modalities: tuple[str, ...]
    accept_reference_segs: bool = True
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 16
    #: seconds a connection may stay silent (also bounds a peer that stops mid-PDU)
    network_timeout: float = 60.0
    acse_timeout: float = 10.0
    dimse_timeout: float = 60.0
    maximum_pdu_size: int = 131072
    allowed_networks: tuple[str, ...] = ()
    #: a C-STORE data set larger than this aborts its association
    max_instance_bytes: int = 2 * 1024**3
    tls_port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_settings(cls, settings: ListenerSettings, *, modalities: tuple[str, ...]) -> ListenerConfig:
        """The listener's configuration from the service's ``[listener]`` section; timeouts keep their defaults."""
        return cls(
            ae_title=settings.ae_title,
            host=settings.host,
            port=settings.port,
            modalities=modalities,
            allowed_calling_aets=settings.allowed_calling_aets,
            max_associations=settings.max_associations,
            allowed_networks=settings.allowed_networks,
            max_instance_bytes=settings.max_instance_mb * 1024 * 1024,
            tls_port=settings.tls_port,
            tls_cert=str(settings.tls_cert) if settings.tls_cert else None,
            tls_key=str(settings.tls_key) if settings.tls_key else None,
            tls_ca=str(settings.tls_ca) if settings.tls_ca else None,
        )


class Listener:
    """Owns the pynetdicom server; stores through ``spool`` and calls ``on_stored(series_id, path)`` after each
    new instance."""

    def __init__(
        self,
        config: ListenerConfig,
        spool: Spool,
        on_stored: Callable[[int, Path], None] | None = None,
        on_released: Callable[[set[int], str], None] | None = None,
        on_status: Callable[[int], None] | None = None,
        on_association: Callable[[dict[str, str]], None] | None = None,
    ):
        self.config = config
        self.spool = spool
        self.on_stored = on_stored
        self.on_released = on_released
        self.on_status = on_status
        #: told of every association accepted, rejected, released or aborted (the audit trail)
        self.on_association = on_association
        #: series that received new instances, per association still open
        self._touched: dict[int, set[int]] = {}
        #: open associations: calling AE title and when they were accepted (monotonic)
        self._opened: dict[int, tuple[str, float]] = {}
        self._touched_lock = threading.Lock()
        self.servers: list[GuardedAssociationServer] = []
        self._threads: list[threading.Thread] = []
        #: bytes received per association since its last C-STORE, to cap the size of one instance
        self._received: dict[int, int] = {}
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
            for sop_class in IMAGE_STORAGE.get(modality, ()):
                ae.add_supported_context(sop_class, syntaxes)
        if cfg.accept_reference_segs:
            for sop_class in SEGMENTATION_CLASSES:
                ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)
        return ae

    def start(self) -> None:
        cfg = self.config
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_DATA_RECV, self._on_data),
        ]
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks)
        ports: list[tuple[int, ssl.SSLContext | None]] = [(cfg.port, None)]
        if cfg.tls_port:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("a TLS port needs tls_cert and tls_key")
            ports.append((cfg.tls_port, tls_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)))
        for port, tls in ports:
            guard = ConnectionGuard(
                networks,
                max_pending=4 * cfg.max_associations + 16,
                stall_timeout=min(cfg.network_timeout, 10.0),
                first_pdu_timeout=cfg.acse_timeout,
                tls=tls,
            )
            server = cast(  # make_server() returns an instance of server_class, and passes guard to it
                GuardedAssociationServer,
                self.ae.make_server(
                    (cfg.host, port), evt_handlers=handlers, server_class=GuardedAssociationServer, guard=guard
                ),
            )
            thread = threading.Thread(target=server.serve_forever, name=f"dicom-listener-{port}", daemon=True)
            thread.start()
            self.servers.append(server)
            self._threads.append(thread)
            log.info(
                "listening as %s on %s:%d%s",
                cfg.ae_title,
                cfg.host,
                server.server_address[1],
                " (TLS)" if tls else "",
            )

    def sender_activity(self, calling_ae: str, series_id: int, since: float) -> str:
        """What ``calling_ae``'s open associations are doing: ``"this-series"`` if one has sent instances of
        ``series_id``, ``"new"`` if one opened after ``since`` (monotonic) and may be about to, else ``"none"``."""
        with self._touched_lock:
            open_now = [(key, t) for key, (ae, t) in self._opened.items() if ae == calling_ae]
            if any(series_id in self._touched.get(key, ()) for key, _ in open_now):
                return "this-series"
        return "new" if any(t > since for _, t in open_now) else "none"

    def serving(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def port(self) -> int:
        return int(self.servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        return int(self.servers[1].server_address[1]) if len(self.servers) > 1 else None

    def stop(self) -> None:
        """Stop accepting; associations in progress are aborted by pynetdicom's shutdown."""
        for server in self.servers:
            server.shutdown()
        self.servers.clear()

    def _on_data(self, event: evt.Event) -> None:
        key = id(event.assoc)
        total = self._received.get(key, 0) + len(event.data)
        self._received[key] = total
        if total > self.config.max_instance_bytes:
            log.warning(
                "association from %s aborted: instance larger than %d bytes",
                event.assoc.requestor.ae_title.strip(),
                self.config.max_instance_bytes,
            )
            self._received.pop(key, None)
            event.assoc.abort()

    def _on_store(self, event: evt.Event) -> int:
        status = self._store(event)
        if self.on_status is not None:
            self.on_status(status)
        return status

    def _store(self, event: evt.Event) -> int:
        t0 = time.perf_counter()
        self._received.pop(id(event.assoc), None)
        request = cast(C_STORE, event.request)  # the EVT_C_STORE handler: always a C-STORE request
        try:
            ds = event.dataset
        except Exception as exc:  # pydicom raises many types on malformed input
            log.warning(
                "C-STORE refused (0x%04X): data set does not parse: %s",
                STATUS_CANNOT_PARSE,
                type(exc).__name__,
            )
            return STATUS_CANNOT_PARSE
        checked = inspect_dataset(ds, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        if isinstance(checked, Refusal):
            log.warning("C-STORE refused (0x%04X): %s", checked.status, checked.reason)
            return checked.status
        called = event.assoc.acceptor.ae_title.strip()
        calling = event.assoc.requestor.ae_title.strip()
        head, body = received_parts(event)  # the file as received: no copy, no re-encoding
        try:
            stored = self.store_instance(
                (head, body), checked, called=called, calling=calling, syntax=str(event.context.transfer_syntax)
            )
        finally:
            body.release()
        if stored is None:
            return STATUS_OUT_OF_RESOURCES
        log.debug(
            "stored instance of series %s from %s%s in %.1f ms",
            stored.key_hash,
            calling,
            " (duplicate)" if stored.duplicate else "",
            1000 * (time.perf_counter() - t0),
        )
        if not stored.duplicate:
            with self._touched_lock:
                self._touched.setdefault(id(event.assoc), set()).add(stored.series_id)
        return STATUS_SUCCESS

    def store_instance(
        self,
        encoded: bytes | Sequence[bytes | memoryview],
        checked: InstanceInfo,
        *,
        called: str,
        calling: str,
        syntax: str,
    ) -> StoredInstance | None:
        """Make one checked instance (a Part 10 encoding, whole or in parts) durable in the spool and announce it
        (``on_stored``); None when the spool refused it (out of resources: the 0xA700 the caller answers). The one
        way in for C-STORE and for STOW-RS (:mod:`edge_runtime.ingest.stow`)."""
        try:
            stored = self.spool.store(
                encoded,
                called_ae=called,
                calling_ae=calling,
                study_uid=checked.study_uid,
                series_uid=checked.series_uid,
                sop_uid=checked.sop_uid,
                sop_class=checked.sop_class,
                transfer_syntax=syntax,
                modality=checked.modality,
                geometry=checked.geometry,
            )
        except SpoolFull as exc:
            log.error("instance refused (0x%04X): %s", STATUS_OUT_OF_RESOURCES, exc)
            return None
        except OSError as exc:
            log.error("instance refused (0x%04X): spool write failed: %s", STATUS_OUT_OF_RESOURCES, exc.strerror)
            return None
        if not stored.duplicate and self.on_stored is not None and stored.path is not None:
            self.on_stored(stored.series_id, stored.path)
        return stored

    def _association_event(self, event: evt.Event, outcome: str, reason: str = "") -> None:
        if self.on_association is not None:
            rq = event.assoc.requestor
            self.on_association(
                {
                    "calling_ae": str(rq.ae_title).strip(),
                    "called_ae": str(getattr(rq.primitive, "called_ae_title", "") or "").strip(),
                    "peer": f"{rq.address}:{rq.port}",
                    "outcome": outcome,
                    **({"reason": reason} if reason else {}),
                }
            )

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom rejects before our handlers see the request; say why as its acceptor decided it."""
        rq = event.assoc.requestor
        called = str(getattr(rq.primitive, "called_ae_title", "") or "").strip()
        if called != self.config.ae_title:
            reason = "called AE title is not ours"
        elif self.config.allowed_calling_aets and str(rq.ae_title).strip() not in self.config.allowed_calling_aets:
            reason = "calling AE title not allowed"
        else:
            reason = f"more than {self.config.max_associations} associations"
        self._association_event(event, "rejected", reason)

    def _on_accepted(self, event: evt.Event) -> None:
        self._association_event(event, "accepted")
        with self._touched_lock:
            self._opened[id(event.assoc)] = (event.assoc.requestor.ae_title.strip(), time.monotonic())

    def _on_released(self, event: evt.Event) -> None:
        """A sender that releases properly has said: that is all I have for now (evidence, not proof)."""
        self._received.pop(id(event.assoc), None)
        with self._touched_lock:
            self._opened.pop(id(event.assoc), None)
            series = self._touched.pop(id(event.assoc), set())
        if series and self.on_released is not None:
            self.on_released(series, event.assoc.requestor.ae_title.strip())

    def _on_aborted(self, event: evt.Event) -> None:
        self._association_event(event, "aborted")
        self._received.pop(id(event.assoc), None)
        with self._touched_lock:
            self._opened.pop(id(event.assoc), None)
            self._touched.pop(id(event.assoc), None)
