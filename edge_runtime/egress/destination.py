"""Where results go: named destinations, each a DICOM node (DIMSE C-STORE) or a DICOMweb origin server (STOW-RS),
each with the result formats its receiver reads.

A destination is written three ways, all read here and nowhere else:

- ``AE@host:port``: a DIMSE node receiving the default formats (what the command line always took);
- the compact form, ``TARGET;key=value;...``, for the command line: ``PACS@10.0.0.5:104;formats=binary,sr`` or
  ``dicomweb+https://archive/dicom-web;name=archive;formats=labelmap,sr;token-file=/etc/edge/token``;
- a ``[[destination]]`` table in the TOML file, with the same keys (``kind``, ``address`` or ``url``,
  ``name``, ``formats``, ...).

Secrets never travel on the command line or in the configuration file: a bearer token or a basic-auth password
is named by the environment variable or the file that holds it, checked at start and read again at each send
(so a rotated token file is picked up without a restart).

The outbox records the destination's ``name``; the sender looks the name up among the configured destinations,
so a changed password or CA bundle applies to results already waiting.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_runtime.results.formats import DEFAULT_FORMATS, check_formats

__all__ = [
    "DIMSE",
    "DICOMWEB",
    "KINDS",
    "Destination",
    "DimseNode",
    "Secret",
    "StowTarget",
    "route",
    "wanted_formats",
]

DIMSE = "dimse"
DICOMWEB = "dicomweb"
KINDS = (DIMSE, DICOMWEB)

_NODE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:\[\]-]{0,63}$")
_WEB_PREFIX = "dicomweb+"


@dataclass(frozen=True)
class DimseNode:
    """A C-STORE SCP: its AE title (called AE), host (an IPv6 address is written in brackets) and port; with
    ``tls_ca`` the association runs over TLS and the node's certificate must be signed by that CA
    (``tls_cert``/``tls_key``: our client certificate, for nodes that ask for one)."""

    ae_title: str
    host: str
    port: int
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DimseNode:
        m = _NODE.match(text.strip())
        if not m or not 0 < int(m["port"]) < 65536 or not m["ae"].strip():
            raise ValueError(f"{text!r} is not AE@host:port (AE title up to 16 characters, port 1-65535)")
        return cls(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))

    def __str__(self) -> str:
        """``AE@host:port``, which :meth:`parse` reads back (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class Secret:
    """Where a credential is kept: an environment variable or a file (its content, stripped). Never the value."""

    env: str | None = None
    file: Path | None = None

    def check(self) -> None:
        """Raise ValueError when the credential cannot be read now (at start, so a typo stops the service)."""
        self.read()

    def read(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env, "")
            if not value:
                raise ValueError(f"environment variable {self.env} is not set")
            return value
        if self.file is not None:
            try:
                value = self.file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read {self.file}: {exc.strerror}") from exc
            if not value:
                raise ValueError(f"{self.file} is empty")
            return value
        raise ValueError("no environment variable or file named")

    def __str__(self) -> str:
        return f"${self.env}" if self.env is not None else str(self.file)


@dataclass(frozen=True)
class StowTarget:
    """A DICOMweb origin server that takes STOW-RS at ``url`` (its base: ``url``/studies is posted to).

    Authentication is HTTP basic (``user`` + ``password``) or a bearer ``token``, or none; ``ca_bundle``
    verifies an HTTPS server whose certificate the system store does not know.
    """

    url: str
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{self.url!r} is not an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the URL: use user with password_env or password_file")
        if (self.user is None) != (self.password is None):
            raise ValueError("basic authentication needs both user and password_env (or password_file)")
        if self.user is not None and self.token is not None:
            raise ValueError("choose basic authentication (user, password) or a bearer token, not both")

    def authorization(self) -> str | None:
        """The ``Authorization`` header value, read fresh from the secret's environment variable or file."""
        if self.token is not None:
            return f"Bearer {self.token.read()}"
        if self.user is not None and self.password is not None:
            pair = f"{self.user}:{self.password.read()}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Destination:
    """A named receiver of results: ``target`` says how to reach it, ``formats`` what it receives."""

    name: str
    target: DimseNode | StowTarget
    formats: tuple[str, ...] = field(default=DEFAULT_FORMATS)

    @property
    def kind(self) -> str:
        return DIMSE if isinstance(self.target, DimseNode) else DICOMWEB

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@host:port`` or the compact form ``TARGET;key=value;...`` (see the module's documentation)."""
        target, *options = [part.strip() for part in text.strip().split(";")]
        table: dict[str, Any] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{option!r} in destination {text!r} is not key=value")
            table[key.strip().replace("-", "_")] = value.strip()
        if target.startswith(_WEB_PREFIX):
            table.update(kind=DICOMWEB, url=target[len(_WEB_PREFIX) :])
        else:
            table.update(kind=DIMSE, address=target)
        return cls.from_table(table)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> Destination:
        """A ``[[destination]]`` TOML table (keys with dashes or underscores); a ValueError names what is wrong."""
        values = {str(k).replace("-", "_"): v for k, v in table.items()}
        if secrets := sorted({"password", "token"} & set(values)):
            raise ValueError(
                f"{' and '.join(secrets)} given as a value: secrets are named by where they are kept "
                "(token_env or token_file, password_env or password_file), never written in the configuration"
            )
        kind = str(values.pop("kind", DICOMWEB if "url" in values else DIMSE))
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        formats = check_formats(_listed(values.pop("formats", DEFAULT_FORMATS)))
        if not formats:
            raise ValueError("formats is empty: name at least one")
        name = values.pop("name", None)
        target: DimseNode | StowTarget = _dimse(values) if kind == DIMSE else _stow(values)
        if values:
            raise ValueError(f"unknown key(s) for a {kind} destination: {', '.join(sorted(values))}")
        name = str(name).strip() if name is not None else str(target)
        if not (_NAME.match(name) or name == str(target)):
            raise ValueError(f"name {name!r}: letters, digits and _.-@: only, up to 64 characters")
        return cls(name, target, formats)

    def __str__(self) -> str:
        return self.name if self.name == str(self.target) else f"{self.name} ({self.target})"


def _listed(value: Any) -> list[str]:
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"formats {value!r} is not a list")
    return [str(x) for x in value]


def _path(values: dict[str, Any], key: str) -> Path | None:
    value = values.pop(key, None)
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"{key} {path}: no such file")
    return path


def _secret(values: dict[str, Any], stem: str) -> Secret | None:
    env, file = values.pop(f"{stem}_env", None), values.pop(f"{stem}_file", None)
    if env is None and file is None:
        return None
    if env is not None and file is not None:
        raise ValueError(f"give {stem}_env or {stem}_file, not both")
    secret = Secret(env=str(env)) if env is not None else Secret(file=Path(str(file)).expanduser())
    try:
        secret.check()
    except ValueError as exc:
        raise ValueError(f"{stem}: {exc}") from exc
    return secret


def _dimse(values: dict[str, Any]) -> DimseNode:
    address = values.pop("address", None)
    if address is None:
        try:
            address = f"{values.pop('ae_title')}@{values.pop('host')}:{values.pop('port')}"
        except KeyError as exc:
            raise ValueError(
                f"a dimse destination needs address = 'AE@host:port' (or ae_title, host and port): {exc} missing"
            ) from None
    node = DimseNode.parse(str(address))
    tls = {key: _path(values, key) for key in ("tls_ca", "tls_cert", "tls_key")}
    if (tls["tls_cert"] is None) != (tls["tls_key"] is None):
        raise ValueError("tls_cert and tls_key go together")
    if tls["tls_cert"] is not None and tls["tls_ca"] is None:
        raise ValueError("a client certificate (tls_cert) needs tls_ca to verify the node")
    return DimseNode(node.ae_title, node.host, node.port, **tls)


def _stow(values: dict[str, Any]) -> StowTarget:
    url = values.pop("url", None)
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a dicomweb destination needs url = 'https://host/dicom-web'")
    user = values.pop("user", None)
    return StowTarget(
        url.strip().rstrip("/"),
        user=str(user) if user is not None else None,
        password=_secret(values, "password"),
        token=_secret(values, "token"),
        ca_bundle=_path(values, "ca_bundle"),
    )


def wanted_formats(destinations: Sequence[Destination]) -> tuple[str, ...]:
    """The formats to write for a result: the union of what the destinations receive (the defaults if none)."""
    if not destinations:
        return DEFAULT_FORMATS
    return check_formats({f for d in destinations for f in d.formats})


def route(
    destinations: Sequence[Destination], objects: Mapping[str, Collection[Path]]
) -> tuple[dict[str, list[Path]], list[str]]:
    """What each destination (by name) is to receive of ``objects`` (format -> files written for it), and the
    formats that were asked for but have no file (a writer that produced nothing: e.g. no probabilities)."""
    missing = sorted({f for d in destinations for f in d.formats if not objects.get(f)})
    plan = {d.name: [path for f in d.formats for path in objects.get(f, ())] for d in destinations}
    return plan, missing
