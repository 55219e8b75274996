"""The server's ASGI middlewares: the request body limit, and the loopback guard of `--no-auth`."""

from __future__ import annotations

from urllib.parse import urlsplit

from tunery.serve.common import ApiError, error_response, is_loopback


class BodyLimit:
    """ASGI middleware: refuse request bodies over the limit (by Content-Length, or while streaming
    when there is none). File uploads are exempt here; they enforce their own, larger limit."""

    def __init__(self, app, max_bytes: int, exempt: tuple[str, ...] = ("/v1/files",)):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(), code="request_too_large")
            return message

        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"Request body is larger than the server's limit of {self.max_bytes // (1 << 20)} MB."

    async def _reject(self, send):
        await _send_error(send, 413, self._message(), "request_too_large")


class LoopbackGuard:
    """ASGI middleware for `--no-auth`, where any request acts as the local user: a web page the
    user visits must not drive the server. It refuses Host headers that are not loopback (DNS
    rebinding: a page's own name resolved to 127.0.0.1) and state-changing requests whose Origin is
    not the server itself (cross-site form posts and multipart uploads, which browsers send without
    a CORS preflight)."""

    SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

    def __init__(self, app, bound_host: str):
        self.app = app
        self.bound_host = bound_host.lower()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get(b"host", "")
        if host and not self._local_host(host):
            return await _send_error(
                send,
                403,
                f"Host {host!r} is not this server: with --no-auth only loopback names are accepted.",
                "invalid_host",
            )
        if scope.get("method", "GET") not in self.SAFE_METHODS and not self._same_origin(headers, host):
            return await _send_error(
                send,
                403,
                "Cross-origin requests cannot change this server: with --no-auth only pages it serves "
                "may post to it.",
                "cross_origin_request",
            )
        return await self.app(scope, receive, send)

    def _local_host(self, host: str) -> bool:
        name = host.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        name = name.rstrip(".")
        return is_loopback(name) or name == self.bound_host

    @staticmethod
    def _same_origin(headers: dict[bytes, str], host: str) -> bool:
        origin = headers.get(b"origin")
        if origin is None:
            # Browsers always send Origin on cross-site posts; Sec-Fetch-Site covers the rest.
            return headers.get(b"sec-fetch-site", "same-origin") in ("same-origin", "none")
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


async def _send_error(send, status: int, message: str, code: str) -> None:
    resp = error_response(status, message, code=code)
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})
