"""A syslog receiver for the audit messages (UDP, or TCP with octet counting)."""

from __future__ import annotations

import socket
import threading

# -- a syslog receiver (audit messages) ----------------------------------------------------------------------


class SyslogReceiver:
    """A syslog receiver: UDP datagrams, or TCP with octet counting (RFC 6587); keeps every message."""

    def __init__(self, transport: str):
        self.transport = transport
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self.got = threading.Semaphore(0)
        if transport == "tcp":
            self.sock.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.transport == "udp":
            while True:
                try:
                    data, _ = self.sock.recvfrom(65536)
                except OSError:
                    return
                self._keep(data)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        buffer = b""
        with conn:
            while chunk := conn.recv(65536):
                buffer += chunk
                while b" " in buffer and len(buffer) >= (n := int(buffer.split(b" ", 1)[0])) + buffer.index(b" ") + 1:
                    start = buffer.index(b" ") + 1
                    self._keep(buffer[start : start + n])
                    buffer = buffer[start + n :]

    def _keep(self, message: bytes) -> None:
        self.messages.append(message)
        self.got.release()

    def wait(self, count: int) -> list[bytes]:
        for _ in range(count):
            assert self.got.acquire(timeout=10), f"{len(self.messages)} of {count} messages arrived"
        return self.messages

    def close(self) -> None:
        self.sock.close()
