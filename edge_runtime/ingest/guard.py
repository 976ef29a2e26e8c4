"""The connection guard: what stands between a TCP connection and a DICOM association.

pynetdicom spawns an association thread (and takes an association slot) for every accepted socket, runs the TLS
handshake in its accept loop and leaves sockets blocking. A peer that opens TCP and never speaks, or stops
inside its A-ASSOCIATE-RQ or its TLS handshake, would hold a slot or the whole accept loop for good. The guard
closes those paths before any association exists; the listener only decides which servers to run.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

#: an A-ASSOCIATE-RQ announcing more than this is not waited for; pynetdicom rejects it
_MAX_FIRST_PDU = 1 << 16


@dataclass
class ConnectionGuard:
    """Admission of connections to one server: allowed networks and a cap on those not yet associated."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: connections accepted but not yet associated
    max_pending: int = 64
    stall_timeout: float = 10.0
    first_pdu_timeout: float = 10.0
    tls: ssl.SSLContext | None = None
    _pending: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, client_address: object) -> bool:
        host = _host(client_address)
        if self.allowed_networks:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return False
            if not any(ip in net for net in self.allowed_networks):
                log.warning("connection from %s refused: not in the allowed networks", host)
                return False
        with self._lock:
            if self._pending >= self.max_pending:
                log.warning("connection from %s refused: %d connections waiting to associate", host, self._pending)
                return False
            self._pending += 1
        return True

    def release(self) -> None:
        with self._lock:
            self._pending -= 1


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the accept path closed to slow or silent peers.

    - Accepted sockets get a timeout (pynetdicom leaves them blocking), so a peer that stops mid-PDU is
      dropped instead of holding an association thread forever.
    - The TLS handshake runs in the connection's own thread, under that timeout (pynetdicom runs it in the
      accept loop, where one silent client blocks every other).
    - No association (and so no association slot) exists until a complete first PDU has arrived: a peer that
      opens TCP and never speaks, or stops inside its A-ASSOCIATE-RQ, waits in a bounded pending pool and is
      dropped after ``first_pdu_timeout``.
    - Connections from outside the allowed networks, or beyond the pending cap, are closed before any thread
      is spawned or byte parsed.

    Made by ``AE.make_server(..., server_class=GuardedAssociationServer, guard=...)``, which passes ``guard``
    through to this constructor.
    """

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        self.guard = guard
        super().__init__(*args, **kwargs)
        # pynetdicom has no public way to run a server of our own class and have its AE know it:
        # start_server() takes no server_class, and make_server() does not register the server with the AE,
        # yet AssociationServer.shutdown() removes the server from ae._servers (ValueError if it is not there).
        # So register it here, as start_server() does for its own servers.
        self.ae._servers.append(self)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.settimeout(self.guard.stall_timeout)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: object, client_address: object) -> bool:
        return self.guard.admit(client_address)

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        sock = cast(socket.socket, request)  # a TCP server: get_request() above returns the accepted socket
        try:
            if self.guard.tls is not None:
                sock = self.guard.tls.wrap_socket(sock, server_side=True)
            ready = _wait_for_first_pdu(sock, time.monotonic() + self.guard.first_pdu_timeout)
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket timeouts are OSErrors
            log.warning("connection from %s dropped before association: %s", _host(client_address), exc)
            ready = False
        finally:
            self.guard.release()
        if not ready:
            self.shutdown_request(sock)
            return
        super().process_request_thread(sock, client_address)


def _wait_for_first_pdu(sock: socket.socket, deadline: float) -> bool:
    """Wait until the peer's first PDU is buffered in full (plain TCP) or data flows (TLS)."""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):
            return True  # no MSG_PEEK through TLS; the handshake already proved a live peer
        head = sock.recv(6, socket.MSG_PEEK)
        if not head:
            return False  # closed
        if len(head) == 6:
            need = 6 + int.from_bytes(head[2:6], "big")
            if need > _MAX_FIRST_PDU or len(sock.recv(need, socket.MSG_PEEK)) >= need:
                return True  # complete, or too large for an A-ASSOCIATE-RQ: pynetdicom rejects it
        time.sleep(0.05)  # part of the PDU is buffered: select would return at once
    return False


def _host(client_address: object) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """Server TLS (1.2+, BCP 195 ciphers from the system); with ``ca`` every client must present a cert it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
