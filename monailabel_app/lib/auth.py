"""Bearer-token access control for every route of the server (API, static files, docs).

Tokens come from ``FETALHC_API_TOKEN`` (or a file named by ``FETALHC_API_TOKEN_FILE``) and the admin
token from ``FETALHC_ADMIN_TOKEN`` / ``FETALHC_ADMIN_TOKEN_FILE``; clients send
``Authorization: Bearer <token>``. Compared in constant time.

- No token configured: only loopback clients are served (403 for others, including clients a reverse
  proxy forwards with ``X-Forwarded-For``), so a server started on all interfaces is still private.
- Tokens configured: 401 without a valid token, on every route and from every address.
- Admin routes (destructive or bulk: datastore deletes, dataset export, logs, train, model files, batch
  infer, reload) need the admin token (403 otherwise); with no admin token set they are refused to
  token holders.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)
API_ENV, ADMIN_ENV = "FETALHC_API_TOKEN", "FETALHC_ADMIN_TOKEN"
MIN_LENGTH = 16
ANY = "*"
# (method, path prefix): MONAI Label's own RBAC marks these admin, plus the dataset export and train.
ADMIN_ROUTES = [("DELETE", "/datastore"), ("GET", "/datastore/dataset"), (ANY, "/logs"), ("POST", "/train"),
                ("DELETE", "/train"), (ANY, "/model"), ("POST", "/batch"), ("DELETE", "/batch"),
                ("POST", "/reload")]


class TokenError(RuntimeError):
    pass


def token_from_env(name: str, environ=None) -> str | None:
    """``NAME`` or the first line of the file named by ``NAME_FILE``; None when neither is set."""
    environ = os.environ if environ is None else environ
    value, path = environ.get(name), environ.get(f"{name}_FILE")
    if value and path:
        raise TokenError(f"set either {name} or {name}_FILE, not both")
    if path:
        try:
            value = open(path, encoding="utf-8").read().strip()
        except OSError as exc:
            raise TokenError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise TokenError(f"{name}_FILE: {path} is empty")
    value = (value or "").strip() or None
    if value and len(value) < MIN_LENGTH:
        logger.warning(f"{name} is shorter than {MIN_LENGTH} characters: use a long random token "
                       "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return value


def is_loopback(host) -> bool:
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def is_admin_route(method: str, path: str) -> bool:
    path = "/" + path.strip("/")
    return any(m in (ANY, method) and (path == p or path.startswith(p + "/")) for m, p in ADMIN_ROUTES)


@dataclass
class Policy:
    api: str | None = None
    admin: str | None = None

    @classmethod
    def from_env(cls, environ=None) -> "Policy":
        return cls(token_from_env(API_ENV, environ), token_from_env(ADMIN_ENV, environ))

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)

    def check(self, method: str, path: str, client_host, authorization: str | None) -> tuple[int, str] | None:
        """None to let the request through, else (status, reason)."""
        if not self.enabled:
            if is_loopback(client_host):
                return None
            return 403, (f"this server answers only on this computer (loopback) until authentication is set up: "
                         f"start it with {API_ENV} (and {ADMIN_ENV}) set, see monailabel_app/README.md")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, "authentication required: send 'Authorization: Bearer <token>'"
        given_b = given.strip().encode()
        # Both comparisons always run, in constant time: timing tells nothing about either token.
        admin_ok = hmac.compare_digest(given_b, (self.admin or "\0").encode()) and bool(self.admin)
        api_ok = hmac.compare_digest(given_b, (self.api or "\0").encode()) and bool(self.api)
        if not (admin_ok or api_ok):
            return 401, "invalid token"
        if is_admin_route(method, path) and not admin_ok:
            return 403, (f"{method} {path} needs the admin token" +
                         ("" if self.admin else f"; {ADMIN_ENV} is not set, so this route is disabled"))
        return None


POLICY = Policy()
PREFIX = ""  # MONAI_LABEL_API_STR: MONAI Label's routes may all sit under a prefix


def configure(policy: Policy, prefix: str = "") -> Policy:
    global POLICY, PREFIX
    POLICY, PREFIX = policy, "/" + prefix.strip("/") if prefix.strip("/") else ""
    if policy.enabled:
        logger.info(f"authentication on: bearer token required on every route"
                    f"{'' if policy.admin else f'; admin routes disabled ({ADMIN_ENV} not set)'}")
    else:
        logger.warning(f"no {API_ENV}: serving loopback clients only; set a token to serve a network")
    return policy


class AuthMiddleware:
    """ASGI middleware applying :data:`POLICY` to every HTTP and websocket request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        for strip in (root, PREFIX):
            if strip and path.startswith(strip):
                path = path[len(strip):]
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        client = (scope.get("client") or (None,))[0]
        denied = POLICY.check(scope.get("method", "GET"), path, client, auth)
        if denied is None:
            return await self.app(scope, receive, send)
        status, reason = denied
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        logger.warning(f"{status} {scope.get('method')} {path} from {client}: {reason}")
        headers = {"WWW-Authenticate": 'Bearer realm="FetalHC"'} if status == 401 else {}
        await JSONResponse({"detail": reason}, status_code=status, headers=headers)(scope, receive, send)
