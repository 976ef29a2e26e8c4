"""The optional access token of the HTTP server: every path but ``/healthz`` and ``/readyz`` needs it when set.

The token comes from a file (``http_token_file``; systemd's ``LoadCredential=`` puts one in place) or from the
environment (``EDGE_RUNTIME_HTTP_TOKEN``), never from the command line, which every user of the box can read.
A client presents it in one of three ways:

- ``Authorization: Bearer <token>`` (Prometheus: ``authorization: {credentials_file: ...}``; curl ``-H``);
- ``?token=<token>`` once in a browser: the answer is a redirect to the same page without it, setting a cookie
  that holds a keyed hash of the token (not the token), ``HttpOnly`` and ``SameSite=Strict``;
- that cookie, on every later request of the browser.

Comparisons take constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from edge_runtime.errors import ConfigError
from edge_runtime.ops.web.server import Request, Response

TOKEN_ENV = "EDGE_RUNTIME_HTTP_TOKEN"
COOKIE = "edge_runtime_session"
MIN_LENGTH = 16


@dataclass(frozen=True)
class AccessToken:
    secret: str

    @classmethod
    def configured(cls, token_file: Path | None, environ: Mapping[str, str]) -> AccessToken | None:
        """The token of ``token_file`` (whitespace around it ignored), else of the environment, else None."""
        if token_file is not None:
            try:
                secret, where = token_file.read_text(encoding="utf-8").strip(), f"http_token_file {token_file}"
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError([f"http_token_file {token_file} cannot be read: {exc}"]) from exc
        elif environ.get(TOKEN_ENV):
            secret, where = environ[TOKEN_ENV].strip(), TOKEN_ENV
        else:
            return None
        if len(secret) < MIN_LENGTH or any(c.isspace() or not c.isprintable() for c in secret):
            raise ConfigError(
                [
                    f"the access token in {where} must be {MIN_LENGTH} or more printable characters without spaces "
                    f"(it has {len(secret)}); e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
                ]
            )
        return cls(secret)

    @property
    def cookie_value(self) -> str:
        """What the browser keeps: a keyed hash, so the cookie store never holds the token itself."""
        return hmac.new(self.secret.encode(), b"edge-runtime status page session", hashlib.sha256).hexdigest()

    def gate(self, request: Request) -> Response | None:
        """None when ``request`` carries the token; otherwise the redirect that sets the cookie, or a 401."""
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(credentials.strip(), self.secret):
            return None
        if _same(_cookie(request.headers.get("cookie", "")), self.cookie_value):
            return None
        if _same(request.query.get("token", ""), self.secret):
            rest = urlencode({k: v for k, v in request.query.items() if k != "token"})
            cookie = f"{COOKIE}={self.cookie_value}; Path=/; HttpOnly; SameSite=Strict"
            # back to this server only: a path a browser could read as another host ("//x", "/\\x") goes home
            path = request.path if request.path.startswith("/") and not request.path.startswith(("//", "/\\")) else "/"
            location = path + (f"?{rest}" if rest else "")
            return Response(303, b"", "text/plain", (("Location", location), ("Set-Cookie", cookie)))
        return Response(
            401,
            b"an access token is required: open this page once as /?token=TOKEN, "
            b"or send the header Authorization: Bearer TOKEN\n",
            "text/plain; charset=utf-8",
            (("WWW-Authenticate", 'Bearer realm="edge-runtime"'),),
        )


def _same(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _cookie(header: str) -> str:
    try:
        morsel = SimpleCookie(header).get(COOKIE)
    except CookieError:
        return ""
    return morsel.value if morsel is not None else ""
