"""Where results go: a DICOM node written ``AE@host:port``, as the configuration and the command line name it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP: its AE title (called AE), host (an IPv6 address is written in brackets) and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = _DESTINATION.match(text.strip())
        if not m or not 0 < int(m["port"]) < 65536 or not m["ae"].strip():
            raise ValueError(f"destination {text!r} is not AE@host:port (AE title up to 16 characters, port 1-65535)")
        return cls(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))

    def __str__(self) -> str:
        """``AE@host:port``, which :meth:`parse` reads back (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"
