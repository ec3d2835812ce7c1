"""ASGI middleware: request ids, the request body limit, request metrics, and API-key authentication.

Plain ASGI (not BaseHTTPMiddleware) so that streaming and cancellation pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rmserve.logs import ACCESS_LOGGER
from rmserve.metrics import Metrics

access_log = logging.getLogger(ACCESS_LOGGER)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID = "x-request-id"


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with a JSON body (the API's error shape) straight from middleware."""
    body = json.dumps(payload).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def _form_encoded_json(headers: dict[bytes, bytes], body: bytes) -> bool:
    """A JSON object sent without a JSON content type (``curl -d`` sends form encoding) is read as JSON."""
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    return content_type in (b"", b"application/x-www-form-urlencoded") and body.lstrip()[:1] == b"{"


class RequestContextMiddleware:
    """Tags each HTTP request with an id (echoed in ``x-request-id``), enforces ``max_request_bytes``
    (413), reads a JSON object body as JSON even when sent form-encoded (as ``curl -d`` does), and
    counts requests and their latency by model, endpoint and status.

    Routes put the model's name in ``scope["state"]["model"]`` for the metrics label.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_request_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
                await self._too_large(send_with_id, int(length))
                return
            buffered = await self._buffer_body(receive, send_with_id)
            if buffered is None:
                return
            body, body_receive = buffered
            if _form_encoded_json(headers, body):
                scope["headers"] = [
                    (k, b"application/json" if k == b"content-type" else v) for k, v in scope["headers"]
                ] + ([] if b"content-type" in headers else [(b"content-type", b"application/json")])
            await self.app(scope, body_receive, send_with_id)
        finally:
            path = scope.get("path", "")
            model = scope["state"].get("model", "")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(model, path, str(status)).inc()
            if model:
                self.metrics.request_duration.labels(model, path).observe(elapsed)
            if model and status == 200:
                self.metrics.input_tokens.labels(model).inc(scope["state"].get("input_tokens", 0))
            access = {
                "request_id": request_id, "method": scope.get("method", ""), "path": path, "status": status,
                "model": model, "duration_ms": round(elapsed * 1000, 3),
            }  # fmt: skip
            access_log.info("request", extra={"access": access})

    async def _buffer_body(self, receive: Receive, send: Send) -> tuple[bytes, Receive] | None:
        """Read the whole body (bounded), then replay it; None if it was too large (413 sent) or cut off."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending the whole body: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                await self._too_large(send, size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return body, replay

    async def _too_large(self, send: Send, size: int) -> None:
        error = {
            "type": "payload_too_large",
            "message": f"the request body has {size}+ bytes, over the limit of {self.max_request_bytes}; "
            "split the inputs over several requests (or raise --max-request-bytes).",
        }
        await send_json(send, 413, {"error": error})


OPEN_PATHS = frozenset({"/health", "/ready"})
UNAUTHORIZED = {
    "error": {
        "type": "unauthorized",
        "message": "missing or invalid API key; send the header 'Authorization: Bearer <key>' with a key this "
        "server accepts (RMSERVE_API_KEY).",
    }
}


class ApiKeyMiddleware:
    """Every HTTP route but ``/health`` and ``/ready`` needs ``Authorization: Bearer <key>`` with one of ``keys``.

    The presented key is compared with every accepted key in constant time (``hmac.compare_digest``,
    no early exit), and every failure gets the same 401, so an answer never tells which part was wrong.
    Keys are never logged.
    """

    def __init__(self, app: ASGIApp, *, keys: tuple[bytes, ...]) -> None:
        if not keys:
            raise ValueError("ApiKeyMiddleware needs at least one key.")
        self.app = app
        self.keys = keys

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        matched = False
        for key in self.keys:  # no early exit: the time does not depend on which key matches
            matched |= hmac.compare_digest(token, key)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_json(send, 401, UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
