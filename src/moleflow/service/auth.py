"""Bearer-token authentication of the service, and who may start it without one.

The token comes from MOLEFLOW_API_TOKEN or `--token-file PATH` (the file wins; its content stripped).
With a token, every request needs `Authorization: Bearer <token>` (401 with `WWW-Authenticate: Bearer`
otherwise), except:
- GET /health, for load balancers and probes; it tells no data, only that the service is up;
- GET /, the operator's page: a static page without data, which a browser must be able to open in order
  to ask for the token; all its data comes from /tasks and /predict, which need the token.

A service bound to anything but loopback (127.0.0.0/8, ::1, localhost) without a token refuses to start
unless `--no-auth` says so on purpose, and then warns.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from moleflow.config import ConfigError
from moleflow.service.limits import refuse

TOKEN_ENV = "MOLEFLOW_API_TOKEN"
OPEN_PATHS = frozenset({"/health", "/"})


def read_token(token_file: Path | None) -> tuple[str | None, str]:
    """-> (the token or None, where it came from). A missing or empty token file is a ConfigError."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {token_file} ({exc.__class__.__name__}: "
                              f"{getattr(exc, 'strerror', None) or exc})") from None
        if not token:
            raise ConfigError(f"the token file {token_file} is empty; put the token in it, or leave --token-file out")
        return token, f"--token-file {token_file}"
    token = os.environ.get(TOKEN_ENV, "").strip()
    return (token, TOKEN_ENV) if token else (None, "")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def auth_lines(host: str, token: str | None, source: str, no_auth: bool) -> list[str]:
    """What `serve` prints about authentication before it starts (never the token); ConfigError when
    it must not start: a non-loopback host without a token, or --no-auth beside a token."""
    if no_auth and token is not None:
        raise ConfigError(f"--no-auth contradicts the token from {source}; give one or the other")
    if token is not None:
        return [f"auth: on (Bearer token from {source}; /health and the page / are open)"]
    if is_loopback(host):
        return [f"auth: off (no {TOKEN_ENV} or --token-file; only this machine can connect to {host})"]
    if not no_auth:
        raise ConfigError(f"--host {host} lets other machines connect, and no token is set: set {TOKEN_ENV} or "
                          "--token-file PATH, or pass --no-auth to serve without authentication")
    return [f"warning: auth is off (--no-auth) and the service listens on {host}: anyone who reaches this "
            "machine can use it"]


class BearerAuth:
    """Pure ASGI middleware: the token is checked before any route runs or any body is read."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            await self.app(scope, receive, send)
            return
        if header:
            detail, challenge = "the bearer token was refused", b'Bearer error="invalid_token"'
        else:
            detail, challenge = "this service needs a token: send the header 'Authorization: Bearer <token>'", b"Bearer"
        await refuse(send, 401, detail, [(b"www-authenticate", challenge)])
