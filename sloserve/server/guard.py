"""ASGI gate in front of the routes: Host check (DNS rebinding), API keys, and JSON-only request bodies."""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from sloserve.server.errors import error_body

# Liveness and scraping stay open, as load balancers and Prometheus carry no key (vLLM leaves them open too).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(slots=True)
class GuardSettings:
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    allowed_hosts: frozenset[str] | None = None  # None: any Host header


def loopback_hosts(bind_host: str) -> frozenset[str] | None:
    """A server bound to loopback only answers to loopback names: a rebound DNS name is refused."""
    return _LOOPBACK_NAMES if bind_host in _LOOPBACK_NAMES else None


class RequestGuard:
    """Refuses, with an OpenAI error body, what a browser page or a stranger could send.

    - Host: a page on evil.example whose DNS name is rebound to 127.0.0.1 sends `Host: evil.example`.
    - Authorization: `Bearer <key>`, compared in constant time, on every path but OPEN_PATHS.
    - Content-Type: a page can post `text/plain` (or no type at all, with a Blob) without a CORS
      preflight; requiring `application/json` makes every cross-site post need the preflight.
    """

    def __init__(self, app, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings
        self._keys = [key.encode() for key in settings.api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _reject(send, *refusal)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str, str, dict] | None:
        allowed = self.settings.allowed_hosts
        if allowed is not None and _host_name(headers.get(b"host", b"")) not in allowed:
            return 400, "the Host header names a host this server does not serve", "invalid_host", {}
        if self._keys and scope["path"] not in OPEN_PATHS and not self._authorized(headers.get(b"authorization")):
            return 401, "a valid API key is required: send `Authorization: Bearer <key>`", "invalid_api_key", \
                {"www-authenticate": "Bearer"}
        if scope["method"] == "POST" and not _is_json(headers.get(b"content-type", b"")):
            return 415, "the request body must be sent as Content-Type: application/json", "unsupported_media_type", {}
        return None

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Every key is compared, so the time taken says nothing about which one came close.
        return sum(secrets.compare_digest(token, key) for key in self._keys) > 0


def api_key_of(scope) -> str | None:
    """The bearer token a request carried (already checked by RequestGuard when keys are configured)."""
    header = dict(scope.get("headers") or ()).get(b"authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(b" ")
    return token.strip().decode("latin-1") if scheme.lower() == b"bearer" else None


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:8000
        return text[: text.find("]") + 1]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def _reject(send, status: int, message: str, code: str, extra: dict[str, str]) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
